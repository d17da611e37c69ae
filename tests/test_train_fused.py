"""The trainer's fused path (issue 15, ``TrainSettings.fused``, the default) against its plain path (full logits):
loss values and parameter gradients to 1e-5 relative under gradient accumulation (two micro-batches of one window),
for SFT, every KD teacher signal (online, base teacher, wider teacher head, noise, top-k online, the cache, GKD's
on-policy batches) and a whole ``train`` run; no [batch x seq, vocab] tensor during a fused step; the cache built
chunk by chunk equals the one built from dense logits."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from kdscope.cache import CachedTeacher, TeacherCache, cache_key
from kdscope.cli import app
from kdscope.fused import heads, teacher_noise
from kdscope.losses import distill_loss_parts
from kdscope.models import LoraSettings, attach_lora, build_tiny_model, load_model, tiny_config
from kdscope.prompts import encode_example
from kdscope.synthetic import generate_domain
from kdscope.teacher import OnlineTeacher
from kdscope.train import Batch, TrainSettings, batch_loss, collate, on_policy_batch, prepare_student, train, window_units
from kdscope.train.objective import fused_student
from kdscope.xtok import CrossTokenizerTeacher, cross_tokenizer_teacher
from xtok_tokenizers import sentencepiece_tokenizer

EXAMPLES = generate_domain("math", 16, seed=0)
MAX_LENGTH = 64
VOCAB = 512
BUDGET = VOCAB * 4 * 16 * 3
"""Bytes per chunk: 3 rows through autograd (JSD), 12 for the closed-form KLs, 24 for cross-entropy, while a
micro-batch has about 4 x 50 rows: every loss runs in many chunks."""
TOL = 1e-5
BASE: dict[str, Any] = dict(micro_batch_size=4, grad_accum=2, max_length=MAX_LENGTH, lora=None, val_size=0,
                            max_new_tokens=8, fused_memory_budget=BUDGET)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30))


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    """Student tiny-qwen-xs and teacher tiny-qwen-s (tied heads), sharpened so distributions are peaked."""
    torch.set_num_threads(1)
    student, tok = build_tiny_model("tiny-qwen-xs", seed=11)
    teacher, _ = build_tiny_model("tiny-qwen-s", seed=12)
    with torch.no_grad():
        for model in (student, teacher):
            model.get_output_embeddings().weight.mul_(20.0)
    return student, teacher.eval(), tok


def _batches(tok: Any, settings: TrainSettings, start: int = 0) -> list[Batch]:
    enc = [encode_example(tok, ex, "study", MAX_LENGTH) for ex in EXAMPLES[start: start + 8]]
    return [collate(enc[i: i + 4], tok.pad_token_id, settings.token_mask) for i in (0, 4)]


def _window(student: Any, batches: list[Batch], settings: TrainSettings, signal: Any,
            fused: bool) -> tuple[list[float], list[Tensor]]:
    """One accumulation window (two micro-batches) on a copy of ``student``: each micro-batch's loss, the gradients."""
    student = copy.deepcopy(student)
    settings = settings.model_copy(update={"fused": fused})
    assert fused_student(student, settings) == fused
    window = window_units(batches, settings)
    losses = []
    for b in batches:
        parts = batch_loss(student, b, settings, signal, window)
        parts.total.backward()
        losses.append(float(parts.total.detach()))
    return losses, [p.grad for p in student.parameters() if p.requires_grad]


def assert_fused_equals_plain(student: Any, batches: list[Batch], settings: TrainSettings,
                              signal: Callable[[], Any]) -> None:
    f_losses, f_grads = _window(student, batches, settings, signal(), True)
    p_losses, p_grads = _window(student, batches, settings, signal(), False)
    assert f_losses == pytest.approx(p_losses, rel=TOL, abs=0), (f_losses, p_losses)
    assert any(g is not None and g.abs().sum() > 0 for g in p_grads)
    for f, p in zip(f_grads, p_grads):
        assert (f is None) == (p is None)
        if p is not None and p.abs().sum() > 0:
            assert rel_err(f, p) < TOL


def _trainable(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_sft_fused_equals_plain(models, reduction: str) -> None:
    student, _, tok = models
    settings = TrainSettings(objective="sft", reduction=reduction, **BASE)
    assert settings.fused  # the default
    assert_fused_equals_plain(_trainable(student), _batches(tok, settings), settings, lambda: None)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_online_teacher_fused_equals_plain(models, loss: str, reduction: str, temperature: float) -> None:
    student, teacher, tok = models
    settings = TrainSettings(objective="kd", loss=loss, reduction=reduction, temperature=temperature, **BASE)
    assert_fused_equals_plain(_trainable(student), _batches(tok, settings), settings,
                              lambda: OnlineTeacher(teacher, temperature=temperature))


def test_kd_with_cross_entropy_lora_student_and_response_mask(models) -> None:
    """(1-w)*CE + w*KD, LoRA adapters (the study's), only response positions."""
    student, teacher, tok = models
    settings = TrainSettings(objective="kd", loss="skew_forward_kl", kd_weight=0.5, token_mask="response",
                             temperature=2.0, **{**BASE, "lora": LoraSettings(r=4, alpha=8, dropout=0.0)})
    lora_student = prepare_student(copy.deepcopy(student), settings)
    with torch.no_grad():  # fresh LoRA B matrices are zero: make the adapters change the outputs
        for name, p in lora_student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    assert_fused_equals_plain(lora_student, _batches(tok, settings), settings,
                              lambda: OnlineTeacher(teacher, temperature=2.0))


def test_kd_base_teacher_and_wider_teacher_head(models) -> None:
    """The base-teacher ablation (adapter off) on a teacher whose head is wider than the student's (cut to 512)."""
    student, teacher, tok = models
    torch.manual_seed(3)
    wide = AutoModelForCausalLM.from_config(tiny_config("tiny-qwen-s", vocab_size=VOCAB + 8))
    peft_teacher = attach_lora(wide, LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in peft_teacher.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_teacher.eval()
    settings = TrainSettings(objective="kd", loss="reverse_kl", temperature=2.0, base_teacher=True, **BASE)
    for disable in (True, False):
        assert_fused_equals_plain(_trainable(student), _batches(tok, settings), settings,
                                  lambda: OnlineTeacher(peft_teacher, temperature=2.0, disable_adapter=disable,
                                                        vocab_width=VOCAB))


def test_kd_noise_equals_its_seeded_dense_reference(models) -> None:
    """Noise: the fused path adds N(0, sigma^2) per row from the seed it draws off the teacher's generator (other
    numbers than the plain path's block draw, same distribution); rebuilt densely with ``teacher_noise`` it is the
    plain loss on the noisy logits. Each micro-batch draws a fresh seed."""
    student, teacher, tok = models
    settings = TrainSettings(objective="kd", loss="forward_kl", noise_sigma=2.0, temperature=2.0, **BASE)
    batches = _batches(tok, settings)
    f_losses, f_grads = _window(_trainable(student), batches, settings,
                                OnlineTeacher(teacher, noise_sigma=2.0, seed=5, temperature=2.0), True)
    reference = _trainable(student)
    generator = torch.Generator().manual_seed(5)
    window = window_units(batches, settings)
    losses, seeds = [], []
    for b in batches:
        seeds.append(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
        mask = b.kd_mask.bool()
        with torch.no_grad():
            noisy = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.clone()
        noisy[mask] += 2.0 * teacher_noise(seeds[-1], range(int(mask.sum())), VOCAB)
        logits = reference(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        total = distill_loss_parts(logits, noisy, mask, loss="forward_kl", temperature=2.0,
                                   reduction="sequence_mean").total / window.kd
        total.backward()
        losses.append(float(total))
    assert seeds[0] != seeds[1]
    assert f_losses == pytest.approx(losses, rel=TOL, abs=0)
    for f, p in zip(f_grads, [p.grad for p in reference.parameters()]):
        if p.abs().sum() > 0:
            assert rel_err(f, p) < TOL


def test_teachers_that_cannot_run_fused(models) -> None:
    """A noisy top-k teacher (its top-k needs the noisy dense draw) meets the fused student with its own top-k; a
    teacher with a LoRA head gives full logits, met by the student's full logits from the same hidden states."""
    student, teacher, tok = models
    noisy = TrainSettings(objective="kd", loss="forward_kl", noise_sigma=1.0, teacher_topk=64, **BASE)
    assert_fused_equals_plain(_trainable(student), _batches(tok, noisy), noisy,
                              lambda: OnlineTeacher(teacher, topk=64, noise_sigma=1.0, seed=3))
    lora_head = attach_lora(copy.deepcopy(teacher), LoraSettings(r=4, alpha=8, dropout=0.0,
                                                                 target_modules=["q_proj", "lm_head"])).eval()
    settings = TrainSettings(objective="kd", loss="reverse_kl", temperature=2.0, **BASE)
    assert_fused_equals_plain(_trainable(student), _batches(tok, settings), settings,
                              lambda: OnlineTeacher(lora_head, temperature=2.0))


@pytest.fixture(scope="module")
def cache(models, tmp_path_factory: pytest.TempPathFactory) -> TeacherCache:
    _, teacher, tok = models
    sequences = [encode_example(tok, ex, "study", MAX_LENGTH).input_ids for ex in EXAMPLES]
    key = cache_key("builtin:tiny-qwen-s", None, tok, sequences, "study", 64, MAX_LENGTH, model=teacher)
    return TeacherCache.build(tmp_path_factory.mktemp("cache"), key, teacher, sequences, tok.pad_token_id,
                              (1.0, 2.0), shard_size=8, batch_size=8, memory_budget=BUDGET)


@pytest.mark.parametrize("loss,temperature,tail", [("forward_kl", 2.0, "tail_bucket"), ("jsd", 1.0, "renormalise"),
                                                   ("reverse_kl", 1.0, "tail_bucket")])
def test_kd_from_the_cache_and_online_topk_fused_equals_plain(models, cache, loss: str, temperature: float,
                                                              tail: str) -> None:
    student, teacher, tok = models
    settings = TrainSettings(objective="kd", loss=loss, temperature=temperature, teacher_topk=64, topk_tail=tail,
                             reduction="token_mean", **BASE)
    batches = _batches(tok, settings)
    assert_fused_equals_plain(_trainable(student), batches, settings,
                              lambda: CachedTeacher(cache, temperature=temperature))
    # the online top-k teacher: its top-k taken chunk by chunk from the hidden states on the fused path
    assert_fused_equals_plain(_trainable(student), batches, settings,
                              lambda: OnlineTeacher(teacher, topk=64, temperature=temperature, vocab_width=VOCAB))


def test_gkd_on_policy_batches_and_cache_fallback(models, cache) -> None:
    """GKD's on-policy batches (the student's samples): online teacher, and the cache's online fallback."""
    student, teacher, tok = models
    settings = TrainSettings(objective="gkd", teacher_topk=64, **BASE)
    torch.manual_seed(0)
    sampled = [on_policy_batch(student, tok, b, settings) for b in _batches(tok, settings)]
    dense = settings.model_copy(update={"teacher_topk": None})
    assert_fused_equals_plain(_trainable(student), sampled, dense, lambda: OnlineTeacher(teacher))
    signals: list[CachedTeacher] = []

    def cached() -> CachedTeacher:
        signals.append(CachedTeacher(cache, fallback=OnlineTeacher(teacher, topk=64, vocab_width=VOCAB)))
        return signals[-1]

    assert_fused_equals_plain(_trainable(student), sampled, settings, cached)
    assert [s.fallback_calls for s in signals] == [2, 2]


def test_train_run_fused_equals_plain(models, tmp_path: Path) -> None:
    """A whole run (3 optimizer steps of 2 micro-batches, validation CE, AdamW): same loss curve and weights."""
    student, teacher, tok = models
    results = {}
    for fused in (True, False):
        settings = TrainSettings(objective="kd", loss="forward_kl", temperature=2.0, max_steps=3, kd_weight=0.7,
                                 fused=fused, warmup_steps=1, eval_every=3, **{**BASE, "val_size": 4})
        model = _trainable(student)
        result = train(model, tok, EXAMPLES, settings, tmp_path / str(fused), teacher=OnlineTeacher(teacher,
                       temperature=2.0), progress=False)
        results[fused] = ([r["loss"] for r in result.history] + [result.best_val_loss], model)
    assert results[True][0] == pytest.approx(results[False][0], rel=TOL, abs=0)
    # AdamW divides each update by the root of its squared gradients: vocabulary rows whose gradients are ~0 get
    # updates of order lr whatever their rounding, so the weights agree a little less closely than the gradients
    for f, p in zip(results[True][1].parameters(), results[False][1].parameters()):
        assert rel_err(f.detach(), p.detach()) < 10 * TOL


def test_unsupported_student_falls_back_announced_once(models, caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA adapter on lm_head: logits are not head(hidden); the plain path runs and says so once."""
    student, teacher, tok = models
    monkeypatch.setattr(heads, "_announced", set())
    settings = TrainSettings(objective="kd", **{**BASE, "lora": LoraSettings(
        r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"])})
    lora_student = prepare_student(copy.deepcopy(student), settings)
    batches = _batches(tok, settings)
    window = window_units(batches, settings)
    with caplog.at_level(logging.WARNING, logger="kdscope.fused"):
        with AllocationSizes() as sizes:
            for b in batches:
                batch_loss(lora_student, b, settings, OnlineTeacher(teacher), window).total.backward()
    announced = [r.getMessage() for r in caplog.records if "fused LM head + loss is off" in r.getMessage()]
    assert len(announced) == 1 and "output head" in announced[0], announced
    assert sizes.largest >= batches[0].input_ids.numel() * VOCAB  # the full logits: the plain path ran


@pytest.fixture(scope="module")
def xtok_pair(models) -> tuple[torch.nn.Module, Any, torch.nn.Module, Any]:
    """A student of another family: a tiny Llama on a SentencePiece-style tokenizer; the teacher tiny-qwen-s (BPE)."""
    _, teacher, teacher_tok = models
    student_tok = sentencepiece_tokenizer()
    torch.manual_seed(13)
    student = AutoModelForCausalLM.from_config(
        tiny_config("tiny-llama-s", len(student_tok), student_tok.eos_token_id, student_tok.pad_token_id))
    with torch.no_grad():
        student.get_output_embeddings().weight.mul_(20.0)
    return student, student_tok, teacher, teacher_tok


@pytest.mark.parametrize("loss,reduction,temperature,kd_weight", [
    ("xtok_kl", "sequence_mean", 2.0, 1.0), ("xtok_reverse_kl", "token_mean", 1.0, 0.5),
    ("xtok_jsd", "token_mean", 1.0, 1.0), ("uld", "sequence_mean", 2.0, 1.0)])
def test_cross_tokenizer_kd_fused_equals_plain(xtok_pair, loss: str, reduction: str, temperature: float,
                                               kd_weight: float) -> None:
    """A teacher with another tokenizer: both heads run inside the loss over aligned spans (the teacher's hidden
    states, not its logits), with the plain path's values and gradients."""
    student, student_tok, teacher, teacher_tok = xtok_pair
    settings = TrainSettings(objective="kd", loss=loss, reduction=reduction, temperature=temperature,
                             kd_weight=kd_weight, **BASE)
    width = student.get_output_embeddings().weight.shape[0]

    def signal() -> CrossTokenizerTeacher:
        return cross_tokenizer_teacher(settings, teacher, teacher_tok, student_tok, width)

    assert signal().fused_ready
    batches = _batches(student_tok, settings)
    assert_fused_equals_plain(_trainable(student), batches, settings, signal)
    largest = {}
    for fused in (True, False):
        with AllocationSizes() as sizes:
            _window(_trainable(student), batches, settings, signal(), fused)
        largest[fused] = sizes.largest
    teacher_rows = min(signal()(b.input_ids, b.attention_mask).teacher_input_ids.numel() for b in batches)
    limit = min(min(b.input_ids.numel() for b in batches) * width, teacher_rows * VOCAB)  # either model's logits
    assert largest[True] < limit <= largest[False], (largest, limit)


def test_cross_tokenizer_noisy_teacher_fused_student(xtok_pair) -> None:
    """A noisy teacher keeps its dense logits (the noise is drawn over them); the student side still runs fused and
    equals the plain path on the same draws."""
    student, student_tok, teacher, teacher_tok = xtok_pair
    settings = TrainSettings(objective="kd", loss="xtok_kl", noise_sigma=1.0, seed=4, **BASE)
    width = student.get_output_embeddings().weight.shape[0]

    def signal() -> CrossTokenizerTeacher:
        return cross_tokenizer_teacher(settings, teacher, teacher_tok, student_tok, width)

    assert not signal().fused_ready
    assert_fused_equals_plain(_trainable(student), _batches(student_tok, settings), settings, signal)


class AllocationSizes(TorchDispatchMode):
    """The element count of the largest tensor any op returns inside the context (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("signal_kind", ["online", "cache", "online_topk"])
def test_fused_step_never_allocates_batch_by_vocab(models, cache, signal_kind: str) -> None:
    """Every op's output during a KD step with CE term (forward and backward, both models) stays below
    [batch x seq, vocab] on the fused path; the plain path reaches it (the check can fail)."""
    student, teacher, tok = models
    topk = None if signal_kind == "online" else 64
    settings = TrainSettings(objective="kd", loss="jsd", kd_weight=0.5, teacher_topk=topk, **BASE)
    batches = _batches(tok, settings)
    window = window_units(batches, settings)
    limit = min(b.input_ids.numel() for b in batches) * VOCAB
    largest = {}
    for fused in (True, False):
        run = settings.model_copy(update={"fused": fused})
        model = _trainable(student)
        signal = (OnlineTeacher(teacher) if signal_kind == "online" else CachedTeacher(cache)
                  if signal_kind == "cache" else OnlineTeacher(teacher, topk=64, vocab_width=VOCAB))
        with AllocationSizes() as sizes:
            for b in batches:
                batch_loss(model, b, run, signal, window).total.backward()
        largest[fused] = sizes.largest
    assert largest[True] < limit <= largest[False], (largest, limit)


def test_cache_built_chunk_by_chunk_equals_the_dense_build(models, cache, tmp_path: Path) -> None:
    _, teacher, tok = models
    sequences = [encode_example(tok, ex, "study", MAX_LENGTH).input_ids for ex in EXAMPLES]
    key = cache_key("builtin:tiny-qwen-s", None, tok, sequences, "study", 64, MAX_LENGTH, model=teacher)
    with AllocationSizes() as sizes:
        fused = TeacherCache.build(tmp_path / "fused", key, teacher, sequences, tok.pad_token_id, (1.0, 2.0),
                                   shard_size=8, batch_size=8, memory_budget=BUDGET)
    assert sizes.largest < 8 * 16 * VOCAB  # no [batch, seq, vocab] logits (the shortest batch has > 16 positions)
    dense = TeacherCache.build(tmp_path / "dense", key, teacher, sequences, tok.pad_token_id, (1.0, 2.0),
                               shard_size=8, batch_size=8, fused=False)
    assert fused.manifest == dense.manifest
    for seq_hash in dense.index:
        a, b = fused.record(seq_hash), dense.record(seq_hash)
        np.testing.assert_array_equal(a.indices, b.indices)
        # float16 log-probs: the float32 logits of a [rows, hidden] x [hidden, vocab] product may differ in the last
        # bit from the whole batch's (BLAS blocking), which can move a value across a float16 rounding boundary
        assert np.all(np.abs(a.log_probs.astype(np.float32) - b.log_probs) <= np.spacing(np.abs(b.log_probs)))
        assert np.mean(a.log_probs == b.log_probs) > 0.99
        np.testing.assert_allclose(a.log_normalizers, b.log_normalizers, rtol=1e-6, atol=0)
        np.testing.assert_allclose(a.log_tails, b.log_tails, rtol=1e-6, atol=1e-6)


def test_cli_fused_options_reach_the_trainer(tmp_path: Path) -> None:
    """`train kd --no-fused` runs the full-logits path and the default runs fused (the largest tensor of the whole
    command tells them apart); a budget below one byte is refused on one line naming the option (exit 2)."""
    runner = CliRunner()
    student, tok = load_model("builtin:tiny-qwen-xs", device="cpu")
    common = ["train", "kd", "--student", "builtin:tiny-qwen-xs", "--teacher", "builtin:tiny-qwen-s", "--data",
              "synthetic:math:8", "--max-steps", "1", "--val-size", "0", "--micro-batch-size", "4", "--grad-accum",
              "1", "--max-length", "64", "--device", "cpu", "--full"]
    largest = {}
    for flag in ("--fused", "--no-fused"):
        with AllocationSizes() as sizes:
            result = runner.invoke(app, [*common, flag, "--fused-memory-budget", str(1 << 16), "--out",
                                         str(tmp_path / flag)])
        assert result.exit_code == 0, result.output
        largest[flag] = sizes.largest
    full_logits = 4 * 40 * student.get_output_embeddings().weight.shape[0]  # 4 rows of at least 40 tokens
    assert largest["--fused"] < full_logits <= largest["--no-fused"], (largest, full_logits)
    bad = runner.invoke(app, [*common, "--fused-memory-budget", "0", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--fused-memory-budget" in bad.output, bad.output
    assert not (tmp_path / "bad" / "final").exists()
