"""Per-item JSONL records of an evaluation run: resume, summaries, and the study's result-table row.

Every evaluation writes one JSON object per item and flushes it per batch, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

from ..data import read_records
from ..errors import InputError, where
from ..prompts import Example
from ..tasks import get_task


def score_records(task_name: str, path: Path | str, field: str = "output") -> dict[str, Any]:
    """Re-score saved generations: each record carries ``answer`` and the generated text in ``field``."""
    task = get_task(task_name)
    records = read_records(path)
    correct = 0
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InputError(f"{where(path, i)}: expected an object, got {type(rec).__name__}")
        if rec.get("answer") is None:
            raise InputError(f"{where(path, i, 'answer')}: missing; every record needs the gold 'answer'")
        if rec.get(field) is None:
            raise InputError(f"{where(path, i, field)}: missing; use --field to name the text field")
        try:
            correct += task.score(str(rec[field]), str(rec["answer"]))
        except ValueError as e:
            raise InputError(f"{where(path, i, 'answer')}: {e} for task {task.name}") from None
    n = len(records)
    return {"task": task.name, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0}



def read_done(out_jsonl: Path | str) -> dict[int, dict[str, Any]]:
    """Records already written, by item index. A torn last line (an interrupted write) is ignored."""
    path = Path(out_jsonl)
    if not path.is_file():
        return {}
    done: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("index"), int):
            done[rec["index"]] = rec
    return done


def open_for_append(path: Path) -> Any:
    """Append mode; a torn last line from an interrupted run is terminated so new records start on their own line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    fh = path.open("a", encoding="utf-8")
    if torn:
        fh.write("\n")
    return fh


def json_prediction(pred: float | str) -> float | str | None:
    """Parsed answers for JSON: a missing answer (``inf`` / ``""``) is stored as null."""
    if isinstance(pred, float) and math.isinf(pred):
        return None
    if isinstance(pred, str):
        return pred or None
    return pred


def select_items(examples: Sequence[Example], limit: int | None) -> list[Example]:
    return list(examples[:limit] if limit else examples)



def summarize(task_name: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{task, n, correct, accuracy}``, with ``accuracy_clean`` for generative records and ``acc``/``acc_norm`` for
    likelihood records."""
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    summary: dict[str, Any] = {"task": task_name, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0}
    if records and all("correct_clean" in r for r in records):  # generative records (older runs lack the field)
        summary["accuracy_clean"] = sum(bool(r["correct_clean"]) for r in records) / n
    if records and "correct_norm" in records[0]:
        summary["acc"] = summary["accuracy"]
        summary["acc_norm"] = sum(bool(r["correct_norm"]) for r in records) / n
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Summary row in the study's result-table layout
# --------------------------------------------------------------------------------------------------------------------
def summary_row(summaries: Sequence[dict[str, Any]], student: str, teacher: str = "-", method: str = "SFT") -> dict[str, Any]:
    """One row like the study's ``*_results_main.csv``: Teacher, Student, Method, one column per task (the study's
    column name), Average; accuracies in percent, two decimals."""
    row: dict[str, Any] = {"Teacher": teacher, "Student": student, "Method": method}
    values = []
    for s in summaries:
        value = round(100.0 * s["accuracy"], 2)
        row[get_task(s["task"]).study_folder] = value
        values.append(100.0 * s["accuracy"])
    row["Average"] = round(sum(values) / len(values), 2) if values else 0.0
    return row


def write_summary_csv(path: Path | str, row: dict[str, Any]) -> Path:
    """Append ``row`` to a summary CSV (header written when the file is new; a different header is an error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(row)
    if path.is_file() and path.stat().st_size > 0:
        with path.open(encoding="utf-8", newline="") as fh:
            header = next(csv.reader(fh), [])
        if header != columns:
            raise InputError(f"{path}: existing columns {header} differ from {columns}; use another --out folder")
        mode = "a"
    else:
        mode = "w"
    with path.open(mode, encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        if mode == "w":
            writer.writeheader()
        writer.writerow(row)
    return path

