"""The `kdscope` command line: a thin typer layer over the pipeline modules, one module per group of commands."""

from __future__ import annotations

# importing a module registers its commands on `app`, in this order in `kdscope --help`
from . import evaluate  # noqa: F401  (tasks, score, eval, fidelity)
from . import train  # noqa: F401  (train sft|kd, cache-teacher)
from . import study  # noqa: F401  (run, demo, status)
from . import analysis  # noqa: F401  (stats, report)
from .common import app

__all__ = ["app", "run"]


def run() -> None:  # pragma: no cover - entry point for `python -m kdscope.cli`
    app(prog_name="kdscope")
