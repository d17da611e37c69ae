"""kdscope.cache.build_teacher_signal: one wiring of the teacher signal for `train kd` and the study's KD job.

Vocabulary alignment with tiny models of different logit widths, noise runs always online (the study's noise model),
GKD's fallback, the trainer's temperature check, and the study graph's rule that noise runs read no cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from kdscope.cache import CachedTeacher, TeacherCache, build_teacher_signal, cache_key, encode_sequences
from kdscope.cli import app
from kdscope.errors import InputError
from kdscope.models import build_tiny_model, save_model, tiny_config
from kdscope.study import Study, expand
from kdscope.synthetic import generate_domain
from kdscope.teacher import OnlineTeacher, common_vocab_width, logit_width
from kdscope.train import TrainSettings, collate, prepare_student, train
from kdscope.prompts import encode_example

EXAMPLES = generate_domain("math", 8, seed=0)
STYLE, MAX_LENGTH, K = "study", 64, 16
PADDING_ROWS = 8
PADDING_LOGIT = 50.0
"""Bias of the wide teacher's padding rows: far above every real logit, so a padding row that is not cut off takes
the top-1 slot and most of the normaliser's mass."""


def _wide_teacher(tok: Any) -> torch.nn.Module:
    """A tiny Qwen teacher whose head has PADDING_ROWS rows beyond the tokenizer's ids (like Qwen2.5-7B's 152,064
    over 151,665 ids), those rows made to dominate if they were ever used."""
    config = tiny_config("tiny-qwen-s", len(tok) + PADDING_ROWS, tok.eos_token_id, tok.pad_token_id)
    config.tie_word_embeddings = False
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(config).eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]))
        head.bias[len(tok):] = PADDING_LOGIT
    return model


def _settings(**fields: Any) -> TrainSettings:
    return TrainSettings(**{"objective": "kd", "teacher_topk": K, "temperature": 2.0, "seed": 5, **fields})


def _batch(tok: Any) -> Any:
    return collate([encode_example(tok, ex, STYLE, MAX_LENGTH) for ex in EXAMPLES[:4]], tok.pad_token_id, "all")


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    torch.set_num_threads(1)
    student, tok = build_tiny_model("tiny-qwen-xs", seed=2)
    return _wide_teacher(tok), student, tok


def test_common_width_is_checked_by_token_strings(pair) -> None:
    teacher, student, tok = pair
    assert logit_width(teacher) == len(tok) + PADDING_ROWS and logit_width(student) == len(tok)
    assert common_vocab_width(tok, tok, logit_width(teacher), logit_width(student)) == len(tok)
    with pytest.raises(InputError, match="narrower model head"):  # a head that drops real ids
        common_vocab_width(tok, tok, logit_width(teacher), len(tok) - 1)
    other = build_tiny_model("tiny-qwen-xs")[1]
    other.add_tokens(["<extra-token>"])  # an id the student's tokenizer does not have, inside the teacher's head
    with pytest.raises(InputError, match="narrower model head"):
        common_vocab_width(other, tok, logit_width(teacher), logit_width(student))


@pytest.mark.parametrize("topk", [None, K])
def test_online_signal_of_a_wider_teacher_is_cut_to_the_common_vocabulary(pair, topk: int | None) -> None:
    teacher, student, tok = pair
    signal = build_teacher_signal(_settings(teacher_topk=topk), teacher, tok, tok, logit_width(student))
    batch = _batch(tok)
    out = signal(batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        real = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., : len(tok)]
    if topk is None:
        assert torch.equal(out.logits, real)
        return
    attended = batch.attention_mask.bool()
    assert int(out.topk_indices.max()) < logit_width(student)
    # the normaliser and tail cover the real rows only (a padding row would add ~exp(50 / T) to them)
    expected = torch.logsumexp(real.double() / 2.0, dim=-1)
    assert torch.allclose(out.topk_log_normalizer.double()[attended], expected[attended], atol=1e-4)


def test_noise_runs_use_the_online_teacher_even_with_a_cache(pair, tmp_path: Path) -> None:
    """The study adds N(0, sigma^2) to every teacher logit afresh each step; a top-k cache cannot, so noise runs
    are served online, with noise on all (common-width) logits before the top-k."""
    teacher, student, tok = pair
    cache = _build_cache(teacher, tok, tmp_path, vocab_width=len(tok))
    settings = _settings(noise_sigma=1.0)
    signal = build_teacher_signal(settings, teacher, tok, tok, logit_width(student), cache)
    assert isinstance(signal, OnlineTeacher)
    reference = OnlineTeacher(teacher, topk=K, noise_sigma=1.0, seed=5, vocab_width=len(tok), temperature=2.0)
    batch = _batch(tok)
    for _ in range(2):  # fresh noise each step, the same draws as the reference's
        got, want = signal(batch.input_ids, batch.attention_mask), reference(batch.input_ids, batch.attention_mask)
        assert torch.equal(got.topk_values, want.topk_values) and torch.equal(got.topk_indices, want.topk_indices)
    with pytest.raises(InputError, match="noise run needs the teacher model online"):
        build_teacher_signal(settings, None, tok, tok, logit_width(student), cache)
    with pytest.raises(InputError, match="fallback teacher must match"):
        CachedTeacher(cache, 2.0, fallback=OnlineTeacher(teacher, topk=K, noise_sigma=1.0, vocab_width=len(tok),
                                                         temperature=2.0))


def _build_cache(teacher: torch.nn.Module, tok: Any, root: Path, vocab_width: int | None) -> TeacherCache:
    sequences = encode_sequences(tok, EXAMPLES, STYLE, MAX_LENGTH)
    key = cache_key("wide", None, tok, sequences, STYLE, K, MAX_LENGTH, vocab_width, teacher)
    return TeacherCache.build(root, key, teacher, sequences, tok.pad_token_id, (1.0, 2.0))


def test_cache_and_gkd_fallback_use_the_common_vocabulary(pair, tmp_path: Path) -> None:
    teacher, student, tok = pair
    batch = _batch(tok)
    full = _build_cache(teacher, tok, tmp_path / "full", vocab_width=None)
    with pytest.raises(InputError, match=f"rebuild it with --vocab-width {len(tok)}"):
        build_teacher_signal(_settings(), None, tok, tok, logit_width(student), full)
    with pytest.raises(InputError, match="narrower model head"):
        cache_key("wide", None, tok, [[1, 2]], STYLE, K, MAX_LENGTH, len(tok) - 1, teacher)
    cut = _build_cache(teacher, tok, tmp_path / "cut", vocab_width=len(tok))
    cached = build_teacher_signal(_settings(), None, tok, tok, logit_width(student), cut)
    assert isinstance(cached, CachedTeacher) and cached.fallback is None
    out = cached(batch.input_ids, batch.attention_mask)
    assert int(out.topk_indices.max()) < len(tok)
    gkd = build_teacher_signal(_settings(objective="gkd", loss="jsd", temperature=1.0), teacher, tok, tok, logit_width(student), cut)
    assert isinstance(gkd, CachedTeacher) and gkd.fallback is not None and gkd.fallback.vocab_width == len(tok)
    with pytest.raises(InputError, match="needs the teacher model online"):
        build_teacher_signal(_settings(objective="gkd", loss="jsd", temperature=1.0), None, tok, tok, logit_width(student), cut)
    with pytest.raises(InputError, match="top-16"):
        build_teacher_signal(_settings(teacher_topk=8), None, tok, tok, logit_width(student), cut)


def test_trainer_refuses_a_topk_signal_at_another_temperature(pair, tmp_path: Path) -> None:
    teacher, student, tok = pair
    settings = _settings(max_steps=1, micro_batch_size=4, grad_accum=1, val_size=0, lora=None, max_length=MAX_LENGTH,
                         prompt_style=STYLE, warmup_steps=0, save_every=100)
    wrong = OnlineTeacher(teacher, topk=K, vocab_width=len(tok), temperature=1.0)
    with pytest.raises(InputError, match="built for temperature 1.0 but the loss uses 2.0"):
        train(prepare_student(student, settings), tok, EXAMPLES, settings, tmp_path, teacher=wrong, progress=False)


def test_study_noise_runs_do_not_read_the_cache() -> None:
    spec = {
        "name": "noise", "seeds": [3], "device": "cpu", "methods": ["SeqKD"], "temperatures": [1.0],
        "families": [{"name": "tiny", "teachers": [{"name": "T-66K", "model": "builtin:tiny-qwen-s"}],
                      "students": [{"name": "S-35K", "model": "builtin:tiny-qwen-xs"}]}],
        "domains": [{"name": "math", "train": "synthetic:math:20", "tasks": [{"task": "toy_add"}]}],
        "training": {"kd": {"teacher_topk": 16}},
        "ablations": {"noise_sigmas": [1.0, 5.0]},
    }
    kd_jobs = [job for job in expand(Study(**spec)) if job.kind == "kd"]
    noisy = [job for job in kd_jobs if job.params["settings"].get("noise_sigma")]
    assert len(noisy) == 2 and all("cache" not in job.deps for job in noisy)
    assert any("cache" in job.deps for job in kd_jobs if job not in noisy)


def test_cli_train_kd_checks_the_common_vocabulary(pair, tmp_path: Path) -> None:
    """`train kd` goes through the same builder: a teacher whose tokenizer has an id the student's head lacks is
    refused (before: only the shared ids were compared, and the extra id was silently cut off)."""
    teacher, _, tok = pair
    extended = build_tiny_model("tiny-qwen-xs")[1]
    extended.add_tokens(["<teacher-only-token>"])
    save_model(teacher, extended, tmp_path / "teacher")
    def args(out: str) -> list[str]:
        return ["train", "kd", "--student", "builtin:tiny-qwen-xs", "--teacher", str(tmp_path / "teacher"), "--data",
                "synthetic:math:8", "--out", str(tmp_path / out), "--max-steps", "1", "--teacher-topk", "8",
                "--val-size", "0", "--device", "cpu"]

    result = CliRunner().invoke(app, args("refused"))
    assert result.exit_code == 2, result.output
    assert "narrower model head" in result.output
    save_model(teacher, tok, tmp_path / "teacher")  # same tokenizer, 8 padding rows: trains on the common 512
    result = CliRunner().invoke(app, args("trained"))
    assert result.exit_code == 0, result.output
