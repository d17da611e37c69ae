"""Token-level fidelity of a cross-family pair (issue 16): the teacher-forced KL and top-1 agreement on aligned spans.
With one tokenizer (given as a second object) it must equal today's token fidelity; across vocabularies it must equal
a span-by-span restatement with Python dictionaries; `kdscope fidelity` reads the student with its own tokenizer."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from kdscope.cli import app
from kdscope.fidelity import aligned_token_fidelity, token_fidelity
from kdscope.models import build_tiny_model, save_model, tiny_config, tiny_tokenizer
from kdscope.xtok import align_text, token_spelling
from xtok_tokenizers import sentencepiece_tokenizer

PROMPTS = ["### Instruction:\nadd 2 and 3\n### Response:\n", "### Instruction:\nIs 4 > 2? naïve 東京\n### Response:\n",
           "Q: 12 * 34?\nA:"]
OUTPUTS = ["2 + 3 = 5. The answer is 5", "true 🙂", " 408, because 12 * 34 = 408"]


def test_identical_tokenizers_give_todays_token_fidelity() -> None:
    teacher, tok = build_tiny_model("tiny-qwen-s", seed=1)
    student = copy.deepcopy(teacher)
    torch.manual_seed(0)
    with torch.no_grad():  # sharp next-token distributions; the student's a perturbed copy: top-1 agrees partly
        for param in teacher.parameters():
            param.normal_(0.0, 0.3)
        for param, same in zip(student.parameters(), teacher.parameters(), strict=True):
            param.copy_(same + 0.15 * torch.randn_like(same))
    today = token_fidelity(teacher, student, tok, PROMPTS, OUTPUTS, batch_size=2)
    assert 0 < today["top1_agreement"] < 1 and today["kl_teacher_student"] > 0.01
    # the student's own copy of the same vocabulary keeps today's path; the aligned path gives the same numbers
    assert token_fidelity(teacher, student, tok, PROMPTS, OUTPUTS, batch_size=2,
                          student_tokenizer=tiny_tokenizer()) == today
    aligned = aligned_token_fidelity(teacher, student, tok, tiny_tokenizer(), PROMPTS, OUTPUTS, batch_size=2)
    assert aligned["tokens"] == today["tokens"] == aligned["one_to_one_spans"]
    assert aligned["kl_teacher_student"] == pytest.approx(today["kl_teacher_student"], rel=1e-5, abs=1e-6)
    assert aligned["top1_agreement"] == today["top1_agreement"]
    same = aligned_token_fidelity(teacher, teacher, tok, tiny_tokenizer(), PROMPTS, OUTPUTS)
    assert same["kl_teacher_student"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0


def _restated(teacher: Any, student: Any, t_tok: Any, s_tok: Any, prompt: str, output: str) -> tuple[float, int, int,
                                                                                                        int]:
    """(sum of span KLs, top-1 agreements, spans, 1:1 spans) of one item, span by span."""
    s_ids, t_ids, alignment = align_text(prompt + output, s_tok, t_tok)
    t_prompt = len(t_tok(prompt)["input_ids"])
    with torch.no_grad():
        lq = F.log_softmax(student(torch.tensor([s_ids])).logits[0].double(), -1)
        lp = F.log_softmax(teacher(torch.tensor([t_ids])).logits[0].double(), -1)
    s_spell, t_spell = token_spelling(s_tok), token_spelling(t_tok)

    def key(spell: Any, i: int) -> Any:
        return spell.keys[i] if i < len(spell.keys) else None

    shared = {k for k in s_spell.keys if k is not None} & {k for k in t_spell.keys if k is not None}
    kl, agree, spans, ones = 0.0, 0, 0, 0
    for span in alignment.spans:
        (a, b), (c, d) = span.student, span.teacher
        if c < t_prompt or a < 1:
            continue
        spans += 1
        if span.one_to_one:
            p: Counter = Counter()
            q: Counter = Counter()
            for i in range(lp.shape[-1]):
                k = key(t_spell, i)
                p[k if k in shared else "tail"] += math.exp(float(lp[c - 1, i]))
            for i in range(lq.shape[-1]):
                k = key(s_spell, i)
                q[k if k in shared else "tail"] += math.exp(float(lq[a - 1, i]))
            kl += sum(pk * math.log(pk / q[k]) for k, pk in p.items() if pk > 0)
            t_top, s_top = key(t_spell, int(lp[c - 1].argmax())), key(s_spell, int(lq[a - 1].argmax()))
            agree += int(t_top == s_top and t_top in shared)
            ones += 1
        else:
            big_p = math.exp(sum(float(lp[i - 1, t_ids[i]]) for i in range(c, d)))
            big_q = math.exp(sum(float(lq[i - 1, s_ids[i]]) for i in range(a, b)))
            kl += big_p * math.log(big_p / big_q) + (1 - big_p) * math.log((1 - big_p) / (1 - big_q))
    return kl, agree, spans, ones


def test_different_tokenizers_match_a_span_by_span_restatement() -> None:
    teacher, t_tok = build_tiny_model("tiny-qwen-xs", seed=0)
    s_tok = sentencepiece_tokenizer()
    torch.manual_seed(3)
    student = AutoModelForCausalLM.from_config(tiny_config("tiny-llama-s", len(s_tok), s_tok.eos_token_id,
                                                           s_tok.pad_token_id))
    teacher.eval()
    student.eval()
    got = token_fidelity(teacher, student, t_tok, PROMPTS, OUTPUTS, batch_size=2, student_tokenizer=s_tok)
    parts = [_restated(teacher, student, t_tok, s_tok, p, o) for p, o in zip(PROMPTS, OUTPUTS)]
    spans, ones = sum(x[2] for x in parts), sum(x[3] for x in parts)
    assert got["tokens"] == spans and got["one_to_one_spans"] == ones and 0 < ones < spans  # some spans merge
    assert math.isfinite(got["kl_teacher_student"]) and got["kl_teacher_student"] > 0
    assert got["kl_teacher_student"] == pytest.approx(sum(x[0] for x in parts) / spans, rel=1e-4)
    assert got["top1_agreement"] == pytest.approx(sum(x[1] for x in parts) / ones)


def test_cli_fidelity_of_a_cross_family_pair(tmp_path: Path) -> None:
    """`kdscope fidelity --teacher-model --student-model` with a student on another tokenizer: agreement from the
    answers, token-level fidelity on aligned spans (the student's own tokenizer, not the teacher's)."""
    s_tok = sentencepiece_tokenizer()
    torch.manual_seed(4)
    student = AutoModelForCausalLM.from_config(tiny_config("tiny-llama-s", len(s_tok), s_tok.eos_token_id,
                                                           s_tok.pad_token_id))
    save_model(student, s_tok, tmp_path / "student-model")
    records = [{"task": "gsm8k", "index": i, "prompt": p, "output": o, "pred": float(i), "correct": i == 0}
               for i, (p, o) in enumerate(zip(PROMPTS, OUTPUTS))]
    runs = {}
    for name in ("teacher", "student"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        (runs[name] / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    res = CliRunner().invoke(app, ["fidelity", "--teacher", str(runs["teacher"]), "--student", str(runs["student"]),
                                   "--teacher-model", "builtin:tiny-qwen-xs", "--student-model",
                                   str(tmp_path / "student-model"), "--out", str(tmp_path / "fid")])
    assert res.exit_code == 0, res.output
    token = json.loads((tmp_path / "fid" / "fidelity.json").read_text())["tasks"]["gsm8k"]["token"]
    teacher, t_tok = build_tiny_model("tiny-qwen-xs", seed=0)
    expected = aligned_token_fidelity(teacher, student.eval(), t_tok, s_tok, PROMPTS, OUTPUTS)
    assert token["one_to_one_spans"] == expected["one_to_one_spans"] > 0
    assert token["kl_teacher_student"] == pytest.approx(expected["kl_teacher_student"], rel=1e-5)
