"""Multiple-choice items parsed from the study's instructions."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdscope.data import convert_hf_rows, load_task
from kdscope.errors import InputError
from kdscope.evaluation import LOGLIK_TASKS, parse_choice_item

from eval_helpers import STUDY_FOLDERS, olmo_folder


def test_choice_parser_on_every_real_test_item(shared_data: Path) -> None:
    for task, folder in STUDY_FOLDERS.items():
        for i, ex in enumerate(load_task(task, shared_data / "dataset")):
            item = parse_choice_item(task, ex, source=f"{folder} {i}")
            n = 5 if task == "aqua" else 2 if task == "boolq" else len(ex.instruction.rpartition("Answer format:")[2].split("/"))
            assert len(item.choices) == n and all(item.choices) and item.question, (task, i)
            assert item.labels[item.gold] == ex.answer.strip()


@pytest.mark.parametrize(
    ("task", "folder", "texts"),
    [
        ("hellaswag", ("hellaswag", "none", "validation"), lambda r: list(r["endings"])),
        ("arc_easy", ("ai2_arc", "ARC-Easy", "validation"), lambda r: list(r["choices"]["text"])),
        ("piqa", ("piqa", "plain_text", "validation"), lambda r: [r["sol1"], r["sol2"]]),
        ("siqa", ("social_i_qa", "none", "validation"), lambda r: [r["answerA"], r["answerB"], r["answerC"]]),
        ("winogrande", ("winogrande", "winogrande_xl", "validation"), lambda r: [r["option1"], r["option2"]]),
        ("openbookqa", ("openbookqa", "main", "validation"), lambda r: list(r["choices"]["text"])),
    ],
)
def test_choice_parser_recovers_hf_choice_texts(task: str, folder: tuple[str, ...], texts) -> None:
    import datasets

    rows = datasets.load_from_disk(str(olmo_folder(*folder))).select(range(300))
    for row, ex in zip(rows, convert_hf_rows(task, rows)):
        assert list(parse_choice_item(task, ex).choices) == texts(row)  # whitespace kept, as lm-eval scores it


def test_parser_rejects_a_non_choice_task(shared_data: Path) -> None:
    ex = load_task("gsm8k", shared_data / "dataset", limit=1)[0]
    with pytest.raises(InputError):
        parse_choice_item("gsm8k", ex)
    assert "gsm8k" not in LOGLIK_TASKS
