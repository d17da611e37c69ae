"""The study's training recipe as kdscope's defaults (issue 12 items 1-5, 11, 14): sample lengths, teacher responses,
tokenisation, checkpoint selection, per-objective defaults, the on-policy draw, and the metrics log on restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from bos_tokenizer import bos_model
from kdscope.cli import app
from kdscope.models import build_tiny_model, load_trained
from kdscope.prompts import build_prompt, encode_example
from kdscope.synthetic import generate_domain
from kdscope.teacher import OnlineTeacher
from kdscope.train import (TrainSettings, collate, on_policy_batch, prepare_student, split_validation,
                           teacher_responses, train)

EXAMPLES = generate_domain("math", 12, seed=0)
SMALL = dict(micro_batch_size=4, grad_accum=2, val_size=8, warmup_steps=1, lr=3e-3, lora=None, max_length=96,
             prompt_style="alpaca")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# item 1 ---------------------------------------------------------------------------------------------------------
def test_gkd_samples_run_up_to_the_cutoff_minus_the_longest_prompt() -> None:
    student, tok = build_tiny_model("tiny-qwen-xs", seed=3)
    settings = TrainSettings(objective="gkd", max_length=200, prompt_style="alpaca")
    batch = collate([encode_example(tok, ex, "alpaca", 200) for ex in EXAMPLES[:4]], tok.pad_token_id, "all")
    torch.manual_seed(0)
    sampled = on_policy_batch(student, tok, batch, settings)
    longest_prompt = max(len(p) for p in batch.prompts)
    new_tokens = [int(n) - len(p) for n, p in zip(sampled.attention_mask.sum(-1), batch.prompts)]
    assert 200 - longest_prompt > 64  # the old fixed cap
    assert max(new_tokens) == 200 - longest_prompt  # an untrained student rarely stops: some row hits the budget
    override = TrainSettings(objective="gkd", max_length=200, max_new_tokens=5)
    torch.manual_seed(0)
    assert max(on_policy_batch(student, tok, batch, override).attention_mask.sum(-1).tolist()) <= longest_prompt + 5


# item 2 ---------------------------------------------------------------------------------------------------------
def test_seqkd_teacher_responses_run_to_the_cutoff_and_get_eos_only_when_ended() -> None:
    teacher, tok = build_tiny_model("tiny-qwen-xs", seed=4)  # untrained: rarely ends before the cutoff
    settings = TrainSettings(objective="seqkd", max_length=160, prompt_style="alpaca")
    examples = EXAMPLES[:6]
    responses = teacher_responses(teacher, tok, examples, settings, batch_size=3)
    budgets = []
    for i in range(0, 6, 3):
        prompts = [len(tok(build_prompt(e, "alpaca", train=True))["input_ids"]) for e in examples[i:i + 3]]
        budgets += [160 - max(prompts)] * 3
    assert any(not r.ended for r in responses)
    for r, budget in zip(responses, budgets):
        assert r.tokens == budget or r.ended  # generated up to the cutoff unless the teacher ended the response
    for ex, r in zip(examples, responses):
        ids = encode_example(tok, ex, "alpaca", 160, response=r.text, add_eos=r.ended).input_ids
        text_ids = tok(build_prompt(ex, "alpaca", train=True) + r.text)["input_ids"]
        assert (ids[-1] == tok.eos_token_id) == (r.ended and len(text_ids) < 160)


# item 3 ---------------------------------------------------------------------------------------------------------
def test_training_tokenises_with_the_tokenizer_defaults(tmp_path: Path) -> None:
    student, tok = bos_model("tiny-qwen-xs", seed=5)
    ex = EXAMPLES[0]
    enc = encode_example(tok, ex, "study", 256)
    prompt = build_prompt(ex, "study", train=True)
    assert enc.input_ids == tok(prompt + ex.output)["input_ids"] + [tok.eos_token_id]
    assert enc.input_ids[0] == tok.bos_token_id and enc.prompt_len == len(tok(prompt)["input_ids"])
    # on-policy samples continue the same prompt ids (BOS first), and so do the teacher's responses
    settings = TrainSettings(objective="gkd", max_length=120, max_new_tokens=4)
    batch = collate([enc], tok.pad_token_id, "all")
    torch.manual_seed(0)
    sampled = on_policy_batch(student, tok, batch, settings)
    assert sampled.input_ids[0, 0] == tok.bos_token_id and sampled.prompts == batch.prompts


# item 4 ---------------------------------------------------------------------------------------------------------
def _validation_ce(model, tok, examples, max_length: int, style: str) -> float:
    """The HF trainer's eval loss: the student's mean next-token CE per batch, averaged over batches by size."""
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 4):
            chunk = [encode_example(tok, e, style, max_length).input_ids for e in examples[i:i + 4]]
            losses, count = 0.0, 0
            for ids in chunk:
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
                losses += float(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
                count += len(ids) - 1
            total += losses / count * len(chunk)
            n += len(chunk)
    return total / n


def test_best_checkpoint_is_chosen_by_the_students_validation_cross_entropy(tmp_path: Path) -> None:
    teacher, tok = build_tiny_model("tiny-qwen-s", seed=6)
    student = build_tiny_model("tiny-qwen-xs", seed=7)[0]
    settings = TrainSettings(objective="kd", loss="reverse_kl", max_steps=4, eval_every=1, **SMALL)
    result = train(prepare_student(student, settings), tok, EXAMPLES, settings, tmp_path,
                   teacher=OnlineTeacher(teacher), progress=False)
    val_losses = [r["val_loss"] for r in result.history]
    assert result.best_val_loss == min(val_losses)
    best, _ = load_trained("builtin:tiny-qwen-xs", tmp_path / "final", device="cpu")
    _, val_set = split_validation(EXAMPLES, 8, settings.seed)
    assert _validation_ce(best.eval(), tok, val_set, 96, "alpaca") == pytest.approx(min(val_losses), rel=1e-5)
    assert TrainSettings(objective="kd", best_by="objective").best_by == "objective"


# item 11 --------------------------------------------------------------------------------------------------------
def test_defaults_follow_the_objective() -> None:
    gkd = TrainSettings(objective="gkd")
    assert (gkd.loss, gkd.beta, gkd.temperature, gkd.reduction) == ("jsd", 0.5, 1.0, "token_mean")
    kd = TrainSettings(objective="kd")
    assert (kd.loss, kd.reduction) == ("forward_kl", "sequence_mean")
    with pytest.raises(ValueError, match="temperature"):
        TrainSettings(objective="gkd", temperature=2.0)
    for option in ({"noise_sigma": 1.0}, {"base_teacher": True}, {"loss": "reverse_kl"}, {"temperature": 2.0}):
        with pytest.raises(ValueError, match="seqkd"):
            TrainSettings(objective="seqkd", **option)


def test_misspelled_or_unknown_settings_are_refused() -> None:
    """A typo in training.kd (or any option) must not run the default silently; nor may an unknown loss."""
    with pytest.raises(ValueError, match="max_stpes"):
        TrainSettings(objective="kd", max_stpes=3)
    with pytest.raises(ValueError, match="nosuchloss"):
        TrainSettings(objective="sft", loss="nosuchloss")


@pytest.mark.parametrize("extra,named", [(["--objective", "seqkd", "--noise-sigma", "1"], "--noise-sigma"),
                                         (["--objective", "seqkd", "--base-teacher"], "--base-teacher"),
                                         (["--objective", "gkd", "--temperature", "2"], "--temperature")])
def test_cli_refuses_options_an_objective_cannot_honour(tmp_path: Path, extra: list[str], named: str) -> None:
    result = CliRunner().invoke(app, ["train", "kd", "--student", "builtin:tiny-qwen-xs", "--teacher",
                                      "builtin:tiny-qwen-s", "--teacher-adapter", str(tmp_path), "--data",
                                      "synthetic:math:10", "--out", str(tmp_path / "o"), *extra])
    assert result.exit_code == 2, result.output
    assert named in result.output and len(result.output.strip().splitlines()) == 1


# item 14 --------------------------------------------------------------------------------------------------------
def test_gkd_draws_on_policy_per_micro_batch(tmp_path: Path) -> None:
    teacher, tok = build_tiny_model("tiny-qwen-s", seed=6)
    settings = TrainSettings(objective="gkd", max_steps=4, max_new_tokens=4, **{**SMALL, "grad_accum": 4,
                                                                                 "micro_batch_size": 1})
    result = train(prepare_student(build_tiny_model("tiny-qwen-xs")[0], settings), tok, EXAMPLES, settings, tmp_path,
                   teacher=OnlineTeacher(teacher), progress=False)
    draws = [r["on_policy"] for r in result.history]
    assert any(0 < d < 4 for d in draws), draws  # some window mixes on- and off-policy micro-batches


# issue 13 -------------------------------------------------------------------------------------------------------
def test_restart_without_a_checkpoint_truncates_the_metrics_log(tmp_path: Path) -> None:
    _, tok = build_tiny_model("tiny-qwen-xs")
    settings = TrainSettings(objective="sft", max_steps=5, save_every=100, **SMALL)
    train(prepare_student(build_tiny_model("tiny-qwen-xs")[0], settings), tok, EXAMPLES, settings, tmp_path,
          progress=False, stop_after=3)
    for ckpt in tmp_path.glob("checkpoint-*"):  # as if killed after step 3 but before its checkpoint was written
        for f in sorted(ckpt.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        ckpt.rmdir()
    train(prepare_student(build_tiny_model("tiny-qwen-xs")[0], settings), tok, EXAMPLES, settings, tmp_path,
          progress=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_cli_exposes_the_recipe_options(tmp_path: Path) -> None:
    runner = CliRunner()
    common = ["--data", "synthetic:math:8", "--max-steps", "1", "--val-size", "4", "--micro-batch-size", "4",
              "--grad-accum", "1", "--max-length", "96", "--device", "cpu"]
    kd = runner.invoke(app, ["train", "kd", "--student", "builtin:tiny-qwen-xs", "--teacher", "builtin:tiny-qwen-s",
                             "--objective", "gkd", "--max-new-tokens", "3", "--reduction", "sequence_mean",
                             "--best-by", "objective", "--out", str(tmp_path / "s"), *common])
    assert kd.exit_code == 0, kd.output
    saved = json.loads((tmp_path / "s" / "train_summary.json").read_text())["settings"]
    assert (saved["loss"], saved["max_new_tokens"], saved["reduction"], saved["best_by"]) == (
        "jsd", 3, "sequence_mean", "objective")
