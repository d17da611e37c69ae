"""Loaders of examples: study JSON, JSONL, HuggingFace datasets and the built-in generated tasks.

Every example is converted into the study's instruction format ``{instruction, input, output, answer}``
(`kdscope.prompts.Example`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError, where
from .prompts import Example
from .synthetic import DOMAIN_TASKS, generate_domain
from .tasks import Task, get_task

REQUIRED_FIELDS = ("instruction", "answer")


# --------------------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------------------
def _example_from_row(row: Any, path: Path | str, i: int) -> Example:
    if not isinstance(row, dict):
        raise InputError(f"{where(path, i)}: expected an object with 'instruction' and 'answer', got {type(row).__name__}")
    for field in REQUIRED_FIELDS:
        if field not in row or row[field] is None:
            raise InputError(f"{where(path, i, field)}: missing; every item needs 'instruction' and 'answer'")
    for field in ("instruction", "input", "output"):
        if field in row and row[field] is not None and not isinstance(row[field], str):
            raise InputError(f"{where(path, i, field)}: must be a string, got {type(row[field]).__name__}")
    return Example(
        instruction=row["instruction"],
        answer=str(row["answer"]),
        input=row.get("input") or "",
        output=row.get("output") or "",
    )


def read_text_file(path: Path) -> str:
    """The file as text; a file that is not UTF-8 (e.g. saved as Latin-1) is refused with where the bad byte is."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not part of the data
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)  # counted in bytes: the line cannot be decoded
        raise InputError(f"{path}: not UTF-8 text (line {line}, column {column}: byte {raw[e.start:e.start + 1]!r}); "
                         "save the file as UTF-8") from None


def read_records(path: Path | str) -> list[Any]:
    """Read a JSON list or a JSONL file into raw records, with one-line errors naming file and row (or line).

    A file without a single record is refused: every caller (training, evaluation, scoring) needs at least one, and
    an empty result would otherwise pass as "0 of 0 correct".
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a .json list or a .jsonl file")
    text = read_text_file(path)
    no_rows = f"{path}: the file has no rows; give a JSON list of objects or one JSON object per line"
    if not text.strip():
        raise InputError(no_rows)
    if path.suffix == ".jsonl" or (text.lstrip()[:1] == "{" and "\n{" in text.strip()):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {number}: invalid JSON ({e.msg} at column {e.colno}); "
                                 "one object per line") from None
            except RecursionError:
                raise InputError(f"{path} line {number}: JSON nested too deeply; one flat object per line") from None
        if not rows:
            raise InputError(no_rows)
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                         "expected a list of objects") from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply; expected a list of objects") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    if not data:
        raise InputError(no_rows)
    return data


def load_examples(path: Path | str) -> list[Example]:
    """Load study-format examples from a JSON list or JSONL file."""
    return [_example_from_row(row, path, i) for i, row in enumerate(read_records(path))]


def validate_examples(examples: Iterable[Example], task: Task, source: str) -> None:
    """Check that every gold answer is a valid answer of ``task``."""
    for i, ex in enumerate(examples):
        try:
            task.gold(ex.answer)
        except ValueError as e:
            raise InputError(f"{where(source, i, 'answer')}: {e} for task {task.name}") from None


def find_task_file(data_dir: Path | str, task_name: str, split: str = "test") -> Path | None:
    """Locate ``<data_dir>/<folder>/<split>.json`` under the canonical name or any alias of the task."""
    task = get_task(task_name)
    root = Path(data_dir)
    for folder in dict.fromkeys((task.study_folder, task.name, *task.aliases)):
        for suffix in (".json", ".jsonl"):
            candidate = root / folder / f"{split}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def load_task(task_name: str, source: Path | str, split: str = "test", limit: int | None = None) -> list[Example]:
    """Load a task's examples from a study data folder, a single JSON/JSONL file, or a HuggingFace dataset.

    ``source`` may be: a folder holding ``<task>/test.json`` (study layout), a file, a ``save_to_disk`` folder, or
    ``hf:<hub id>[:<config>]`` for the hub.
    """
    task = get_task(task_name)
    src = str(source)
    path = Path(src)
    if src.startswith("hf:") or (path.is_dir() and (path / "dataset_info.json").is_file()):
        examples = load_hf_task(task.name, src.removeprefix("hf:"), split=split)
        file_label = src
    elif path.is_file():
        examples, file_label = load_examples(path), str(path)
    elif path.is_dir():
        found = find_task_file(path, task.name, split)
        if found is None:
            raise InputError(
                f"{path}: no {split}.json for task {task.name} (looked in {task.study_folder}/ and {task.name}/); "
                "point --data at the study's dataset folder or at a file"
            )
        examples, file_label = load_examples(found), str(found)
    else:
        raise InputError(f"{src}: not a file, folder or hf:<id>; give the study's dataset folder or a JSON/JSONL file")
    validate_examples(examples, task, file_label)
    return examples[:limit] if limit else examples


# --------------------------------------------------------------------------------------------------------------------
# HuggingFace datasets -> study instruction format
# --------------------------------------------------------------------------------------------------------------------
def _choices_line(stem: str, options: list[str], sep: str = " ") -> str:
    return sep.join(f"{stem}{i}: {opt}" for i, opt in enumerate(options, 1))


def _format(question: str, stem: str, options: list[str], lead: str, sep: str = " ") -> str:
    fmt = "/".join(f"{stem.lower()}{i}" for i in range(1, len(options) + 1))
    return f"{lead}: {question}\n\n{_choices_line(stem, options, sep)}\n\nAnswer format: {fmt}"


def _hf_hellaswag(row: dict[str, Any]) -> Example:
    ctx = f"{row['activity_label']}: {row['ctx']}"
    instruction = _format(ctx, "Ending", list(row["endings"]), "Please choose the correct ending to complete the given sentence")
    return Example(instruction, f"ending{int(row['label']) + 1}", output=f"the correct answer is ending{int(row['label']) + 1}")


def _hf_arc_like(row: dict[str, Any], question_key: str) -> Example:
    labels = list(row["choices"]["label"])
    answer = f"answer{labels.index(row['answerKey']) + 1}"
    instruction = _format(row[question_key], "Answer", list(row["choices"]["text"]), "Please choose the correct answer to the question")
    return Example(instruction, answer, output=f"the correct answer is {answer}")


def _hf_boolq(row: dict[str, Any]) -> Example:
    answer = "true" if row["answer"] else "false"
    instruction = f"Please answer the following question with true or false, question: {row['question']}?\n\nAnswer format: true/false"
    return Example(instruction, answer, output=f"the correct answer is {answer}")


def _hf_piqa(row: dict[str, Any]) -> Example:
    answer = f"solution{int(row['label']) + 1}"
    instruction = _format(row["goal"], "Solution", [row["sol1"], row["sol2"]], "Please choose the correct solution to the question", sep="\n\n")
    return Example(instruction, answer, output=f"the correct answer is {answer}")


def _hf_siqa(row: dict[str, Any]) -> Example:
    answer = f"answer{int(row['label'])}"
    question = f"{row['context']} {row['question']}"
    options = [row["answerA"], row["answerB"], row["answerC"]]
    instruction = _format(question, "Answer", options, "Please choose the correct answer to the question")
    return Example(instruction, answer, output=f"the correct answer is {answer}")


def _hf_winogrande(row: dict[str, Any]) -> Example:
    answer = f"option{int(row['answer'])}"
    instruction = (
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        f"{row['sentence']}\n\nOption1: {row['option1']} Option2: {row['option2']} Answer format: option1/option2"
    )
    return Example(instruction, answer, output=f"the correct answer is {answer}")


_HF_CONVERTERS = {
    "hellaswag": _hf_hellaswag,
    "arc_easy": lambda r: _hf_arc_like(r, "question"),
    "arc_challenge": lambda r: _hf_arc_like(r, "question"),
    "openbookqa": lambda r: _hf_arc_like(r, "question_stem"),
    "boolq": _hf_boolq,
    "piqa": _hf_piqa,
    "siqa": _hf_siqa,
    "winogrande": _hf_winogrande,
}
HF_TASKS = tuple(_HF_CONVERTERS)


def convert_hf_rows(task_name: str, rows: Iterable[dict[str, Any]], source: str = "dataset") -> list[Example]:
    """Convert rows of the task's HuggingFace dataset into study-format examples."""
    task = get_task(task_name)
    convert = _HF_CONVERTERS.get(task.name)
    if convert is None:
        raise InputError(f"task {task.name} has no HuggingFace converter; supported: {', '.join(HF_TASKS)}")
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(convert(row))
        except (KeyError, ValueError, TypeError) as e:
            raise InputError(f"{where(source, i)}: cannot convert a {task.name} row ({type(e).__name__}: {e}); is this the right dataset?") from None
    return out


def load_hf_task(task_name: str, source: str, split: str = "validation") -> list[Example]:
    """Load a HuggingFace dataset (a ``save_to_disk`` folder, or a hub id ``name[:config]``) as study examples."""
    import datasets  # slow to import; only hub and save_to_disk sources need it

    path = Path(source)
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split if split in ds else next(iter(ds))]
        else:  # hub id; needs network
            name, _, config = source.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split if split != "test" else "validation")
    except (OSError, ValueError, KeyError) as e:  # not a save_to_disk folder, a garbled one, offline, no such split
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"{source}: cannot load the dataset ({first}); give a save_to_disk folder, a cached hub id, "
                         "the study's dataset folder or a JSON/JSONL file") from None
    return convert_hf_rows(task_name, ds, source)


SYNTHETIC_PREFIX = "synthetic:"


def load_training_data(source: str | Path, seed: int = 0) -> list[Example]:
    """Training examples from a study-format JSON/JSONL file, or ``synthetic:<domain>[:<n per task>]`` (built-in)."""
    src = str(source)
    if src.startswith(SYNTHETIC_PREFIX):
        domain, _, n = src.removeprefix(SYNTHETIC_PREFIX).partition(":")
        if domain not in DOMAIN_TASKS:
            raise InputError(f"{src}: unknown synthetic domain {domain!r}; use {' or '.join(DOMAIN_TASKS)}")
        if n and not (n.isascii() and n.isdigit() and int(n) > 0):
            raise InputError(f"{src}: the item count must be a positive integer, e.g. synthetic:math:500")
        return generate_domain(domain, int(n or 500), seed)
    examples = load_examples(src)
    empty = [i for i, ex in enumerate(examples) if not ex.output]
    if len(empty) == len(examples):
        raise InputError(f"{src}: every 'output' is empty; training needs the target response in 'output'")
    if empty:  # the study's Math10K copy has a few; its code trained on them as they are, and so do we
        warnings.warn(f"{src}: {len(empty)} rows with an empty 'output' (first: {where('', empty[0]).strip()})",
                      stacklevel=2)
    return examples
