"""The `kdscope` command line: a thin typer layer over the pipeline modules.

Every command turns an `InputError` into a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer

from . import __version__
from .errors import InputError

app = typer.Typer(
    help="kdscope: run, measure and explain knowledge-distillation studies of causal language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
F = TypeVar("F", bound=Callable[..., object])


def user_errors(fn: F) -> F:
    """Report bad input as one line on stderr with exit code 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdscope {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Distil teachers into students, evaluate them on the study's 14 tasks, and analyse the results."""


@app.command("tasks")
@user_errors
def tasks_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="A study dataset folder (<task>/test.json); adds item counts."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the study's 14 tasks: domain, answer type, scoring rule, and loaded size when --data is given."""
    from .data import find_task_file, load_examples
    from .tasks import TASKS

    rows = []
    for task in TASKS.values():
        row: dict[str, object] = {
            "task": task.name,
            "domain": task.domain,
            "answer_type": task.answer_type,
            "study_folder": task.study_folder,
            "answers": "/".join(task.choices) or "number (last, +-0.001)",
            "study_test_size": task.test_size,
        }
        if data is not None:
            found = find_task_file(data, task.name)
            row["loaded"] = len(load_examples(found)) if found else None
        rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kdscope tasks")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row.values()))
    Console().print(table)


@app.command("score")
@user_errors
def score_cmd(
    task: str = typer.Option(..., "--task", help="Task name or alias (e.g. gsm8k, ARC-Easy)."),
    predictions: Path = typer.Option(..., "--predictions", help="JSON list or JSONL with 'answer' and a text field."),
    field: str = typer.Option("output", "--field", help="Field holding the generated text (the study saved 'output_pred')."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object."),
) -> None:
    """Re-score saved generations with the study's exact parsing and correctness rule."""
    from .eval import score_records

    try:
        summary = score_records(task, predictions, field)
    except KeyError as e:
        raise InputError(str(e.args[0])) from None
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"{summary['task']}: {summary['correct']}/{summary['n']} correct, accuracy {summary['accuracy']:.4f}")


def run() -> None:  # pragma: no cover - entry point for `python -m kdscope`
    app(prog_name="kdscope")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
