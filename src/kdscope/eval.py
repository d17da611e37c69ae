"""Evaluation: scoring saved generations with the study's rules (and, below, generative / likelihood evaluation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import read_records
from .errors import InputError, where
from .tasks import get_task


def score_records(task_name: str, path: Path | str, field: str = "output") -> dict[str, Any]:
    """Re-score saved generations: each record carries ``answer`` and the generated text in ``field``."""
    task = get_task(task_name)
    records = read_records(path)
    correct = 0
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InputError(f"{where(path, i)}: expected an object, got {type(rec).__name__}")
        for key in ("answer", field):
            if key not in rec or rec[key] is None:
                raise InputError(f"{where(path, i, key)}: missing; use --field to name the text field")
        try:
            correct += task.score(str(rec[field]), str(rec["answer"]))
        except ValueError as e:
            raise InputError(f"{where(path, i, 'answer')}: {e} for task {task.name}") from None
    n = len(records)
    return {"task": task.name, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0}
