"""Trainer: SFT / KD / GKD / sequence-level KD on built-in tiny models, exact resume, determinism, accumulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdscope.errors import InputError
from kdscope.losses import distill_loss
from kdscope.models import build_tiny_model, load_trained
from kdscope.prompts import encode_example
from kdscope.synthetic import generate_domain
from kdscope.teacher import OnlineTeacher
from kdscope.train import TrainSettings, batch_loss, batch_schedule, collate, prepare_student, train, window_units

EXAMPLES = generate_domain("math", 40, seed=0)
BASE = dict(micro_batch_size=4, grad_accum=2, val_size=16, warmup_steps=2, eval_every=3, save_every=3, max_length=96,
            lr=3e-3, lora=None, max_new_tokens=12)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, object]:
    """A tiny teacher that actually knows the task: SFT for a few dozen steps."""
    torch.set_num_threads(1)
    model, tok = build_tiny_model("tiny-qwen-m", seed=1)
    settings = TrainSettings(objective="sft", max_steps=30, **{**BASE, "val_size": 0})
    train(prepare_student(model, settings), tok, EXAMPLES, settings, tmp_path_factory.mktemp("teacher"),
          resume=False, progress=False)
    return model.eval(), tok


def _student(seed: int = 2) -> torch.nn.Module:
    return build_tiny_model("tiny-qwen-xs", seed=seed)[0]


@torch.no_grad()
def _divergence_to_teacher(student: torch.nn.Module, teacher: torch.nn.Module, tok: object) -> float:
    enc = [encode_example(tok, ex, "study", 96) for ex in EXAMPLES[:16]]
    b = collate(enc, tok.pad_token_id, "all")  # type: ignore[attr-defined]
    s = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
    t = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
    return float(distill_loss(s, t, b.loss_mask))


@pytest.mark.parametrize("objective,options", [("kd", {"loss": "forward_kl", "temperature": 2.0}),
                                               ("kd", {"loss": "reverse_kl", "temperature": 2.0}),
                                               ("gkd", {"lmbda": 0.5}), ("seqkd", {})])
def test_distillation_reduces_divergence_to_teacher(teacher, objective: str, options: dict, tmp_path: Path) -> None:
    model, tok = teacher
    student = _student()
    before = _divergence_to_teacher(student, model, tok)
    settings = TrainSettings(objective=objective, max_steps=8, **options, **BASE)
    signal = OnlineTeacher(model, temperature=settings.temperature)
    result = train(prepare_student(student, settings), tok, EXAMPLES, settings, tmp_path, teacher=signal,
                   teacher_model=model, progress=False)
    after = _divergence_to_teacher(student, model, tok)
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert result.best_val_loss is not None
    if objective == "gkd":
        draws = [r["on_policy"] for r in result.history]
        assert sum(draws) > 0 and sum(draws) < settings.grad_accum * len(draws)
    if objective == "seqkd":
        assert (tmp_path / "teacher_responses.json").is_file()


def test_resume_after_interruption_reproduces_loss_curve(teacher, tmp_path: Path) -> None:
    model, tok = teacher
    settings = TrainSettings(objective="gkd", loss="jsd", noise_sigma=1.0, max_steps=7, lora={"r": 4, "alpha": 8},
                             **{k: v for k, v in BASE.items() if k != "lora"})

    def run(out: Path, stop_after: int | None = None) -> list[float]:
        signal = OnlineTeacher(model, noise_sigma=1.0, seed=5)
        result = train(prepare_student(_student(), settings), tok, EXAMPLES, settings, out, teacher=signal,
                       progress=False, stop_after=stop_after)
        return [r["loss"] for r in result.history]

    full = run(tmp_path / "full")
    partial = run(tmp_path / "resumed", stop_after=3)
    assert len(partial) == 3
    resumed = run(tmp_path / "resumed")
    assert resumed == full  # bit-identical: LoRA dropout, on-policy sampling and teacher noise included
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(full)


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    _, tok = build_tiny_model("tiny-qwen-xs")
    settings = TrainSettings(objective="sft", max_steps=4, **BASE)
    runs = [train(prepare_student(_student(), settings), tok, EXAMPLES, settings, tmp_path / str(i),
                  progress=False).history for i in range(2)]
    assert [r["loss"] for r in runs[0]] == [r["loss"] for r in runs[1]]
    other = TrainSettings(objective="sft", max_steps=4, **{**BASE, "seed": 7})
    third = train(prepare_student(_student(), other), tok, EXAMPLES, other, tmp_path / "s7", progress=False).history
    assert [r["loss"] for r in third] != [r["loss"] for r in runs[0]]


def test_accumulation_window_normalisation(teacher) -> None:
    """One window of 8 sequences as 1x8 or 4x2 micro-batches gives the same gradient."""
    model, tok = teacher
    settings = TrainSettings(objective="kd", temperature=2.0, **BASE)
    enc = [encode_example(tok, ex, "study", 96) for ex in EXAMPLES[:8]]
    signal = OnlineTeacher(model, temperature=2.0)

    def grads(split: int) -> list[torch.Tensor]:
        student = _student()
        batches = [collate(enc[i:i + split], tok.pad_token_id, "all") for i in range(0, 8, split)]
        window = window_units(batches, settings)
        for b in batches:
            batch_loss(student, b, settings, signal, window).total.backward()
        return [p.grad.clone() for p in student.parameters() if p.grad is not None]

    for a, b in zip(grads(8), grads(2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_schedule_covers_epochs_and_lora_round_trip(tmp_path: Path) -> None:
    settings = TrainSettings(objective="sft", epochs=2, micro_batch_size=3, grad_accum=2)
    steps = batch_schedule(10, settings)
    flat = [i for step in steps for mb in step for i in mb]
    assert len(steps) == 4 and sorted(flat[:10]) == list(range(10))
    model, tok = build_tiny_model("tiny-qwen-xs")
    lora = TrainSettings(objective="sft", max_steps=2, lora={"r": 4, "alpha": 8}, **{k: v for k, v in BASE.items()
                                                                                      if k != "lora"})
    student = prepare_student(model, lora)
    train(student, tok, EXAMPLES, lora, tmp_path, progress=False)
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    reloaded, _ = load_trained("builtin:tiny-qwen-xs", tmp_path / "final", device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, student.eval()(input_ids=ids).logits)


def test_kd_without_teacher_and_too_small_data_are_input_errors(tmp_path: Path) -> None:
    _, tok = build_tiny_model("tiny-qwen-xs")
    with pytest.raises(InputError, match="needs a teacher"):
        train(_student(), tok, EXAMPLES, TrainSettings(objective="kd", **BASE), tmp_path, progress=False)
    with pytest.raises(InputError, match="val_size"):
        train(_student(), tok, EXAMPLES[:10], TrainSettings(objective="sft", **BASE), tmp_path, progress=False)


def test_cli_train_sft_then_kd_from_the_teacher_adapter(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kdscope.cli import app

    runner = CliRunner()
    common = ["--data", "synthetic:math:20", "--max-steps", "2", "--val-size", "8", "--micro-batch-size", "4",
              "--grad-accum", "1", "--max-length", "96", "--device", "cpu"]
    sft = runner.invoke(app, ["train", "sft", "--model", "builtin:tiny-qwen-s", "--out", str(tmp_path / "t"), *common])
    assert sft.exit_code == 0, sft.output
    assert (tmp_path / "t" / "final" / "adapter_config.json").is_file()
    kd = runner.invoke(app, ["train", "kd", "--student", "builtin:tiny-qwen-xs", "--teacher", "builtin:tiny-qwen-s",
                             "--teacher-adapter", str(tmp_path / "t" / "final"), "--loss", "reverse_kl",
                             "--temperature", "2", "--out", str(tmp_path / "s"), *common])
    assert kd.exit_code == 0, kd.output
    assert "trained 2 steps" in kd.output
    bad = runner.invoke(app, ["train", "kd", "--student", "builtin:tiny-qwen-xs", "--teacher", "builtin:tiny-qwen-s",
                              "--out", str(tmp_path / "b"), "--temperature", "0", *common])
    assert bad.exit_code == 2 and "--temperature" in bad.output
