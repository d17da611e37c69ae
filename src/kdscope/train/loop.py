"""The training loop: SFT (cross-entropy), off-policy logit KD, GKD (on-policy) and sequence-level KD, exactly resumable.

Determinism and resume: the data order for the whole run is fixed up front from the seed, and every optimizer step
re-seeds torch (dropout, on-policy sampling, teacher noise) from ``(seed, step)``. A step is then a pure function of
(weights, optimizer state, step), so a run resumed from a checkpoint follows the same loss curve as one that never
stopped, with no RNG state to carry.

Normalisation under gradient accumulation: the loss of a micro-batch is divided by the token (or sequence) count of
the whole accumulation window, so a batch of 16 as 1x16 or 4x4 gives the same gradient.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..distributed import SINGLE, DistContext, check_window
from ..errors import InputError
from ..models import attach_lora
from ..progress import progress_bar
from ..prompts import Encoded, Example, encode_example
from .batches import batch_schedule, collate, split_validation
from .checkpoints import (MetricLog, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint,
                          save_weights)
from .generation import cached_teacher_responses, on_policy_batch
from .objective import TeacherFn, Units, batch_loss, kd_weight, validation_loss, window_units
from .settings import TrainSettings


# --------------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------------
def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then linear decay to 0 (transformers' get_linear_schedule_with_warmup)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    best_val_loss: float | None
    history: list[dict[str, Any]]


def prepare_student(model: Any, settings: TrainSettings) -> Any:
    """Attach fresh LoRA adapters (or train all weights when ``settings.lora`` is None)."""
    if settings.lora is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    with torch.random.fork_rng(devices=[]):  # LoRA's A matrices are random: seed them so runs are reproducible
        torch.manual_seed(settings.seed)
        return attach_lora(model, settings.lora)


def train(
    student: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    settings: TrainSettings,
    out_dir: str | Path,
    teacher: TeacherFn | None = None,
    teacher_model: Any = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    dist: DistContext = SINGLE,
) -> TrainResult:
    """Train ``student`` (already wrapped by `prepare_student`) and save the best weights to ``out_dir/final``.

    ``teacher`` maps (input_ids, attention_mask) to teacher logits aligned with the student's vocabulary (see
    kdscope.teacher); required for kd/gkd. ``teacher_model`` generates responses for seqkd. ``stop_after`` ends the
    run early after that many steps (used to test resumption); the checkpoint then allows ``resume``.

    ``dist`` (from `kdscope.distributed.init_distributed`) makes this one rank of a data-parallel run: every rank
    calls `train` with the same arguments, runs its share of each window and steps identically; rank 0 writes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if kd_weight(settings) > 0 and teacher is None:
        raise InputError(f"objective {settings.objective} needs a teacher; give --teacher")
    check_window(settings.grad_accum, dist)
    train_set, val_set = split_validation(examples, settings.val_size, settings.seed)
    responses = None
    if settings.objective == "seqkd":
        if teacher_model is None:
            raise InputError("objective seqkd needs a teacher model to generate the training responses; give --teacher")
        responses = cached_teacher_responses(out, teacher_model, tokenizer, train_set, settings)
    encoded = [encode_example(tokenizer, ex, settings.prompt_style, settings.max_length) if responses is None else
               encode_example(tokenizer, ex, settings.prompt_style, settings.max_length, responses[i].text,
                              add_eos=responses[i].ended) for i, ex in enumerate(train_set)]
    val_encoded = [encode_example(tokenizer, ex, settings.prompt_style, settings.max_length) for ex in val_set]
    schedule = batch_schedule(len(encoded), settings)
    device = next(student.parameters()).device

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = linear_warmup_decay(optimizer, settings.warmup_steps, len(schedule))
    log = MetricLog(out / "metrics.jsonl", settings.report_to, out.name, settings.model_dump()) if dist.is_main else None

    start, best_val, history = 0, None, []
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, student, optimizer, scheduler, teacher)
        start, best_val, history = state["step"], state["best_val_loss"], state["history"]
    if log is not None:  # a restart keeps only the log of the steps it resumes from (none when from scratch)
        log.truncate_after(start)

    bar = progress_bar(len(schedule), f"train {settings.objective}", progress and dist.is_main, unit="step", initial=start)
    student.train()
    for step in range(start, len(schedule)):
        torch.manual_seed(_step_seed(settings.seed, step))
        record = _train_step(student, tokenizer, encoded, schedule[step], settings, teacher, optimizer, scheduler,
                             device, step, dist)
        done = step + 1
        if val_encoded and (done % settings.eval_every == 0 or done == len(schedule)):
            record["val_loss"] = validation_loss(student, val_encoded, tokenizer, settings, teacher, device)
            if best_val is None or record["val_loss"] < best_val:
                best_val = record["val_loss"]
                if dist.is_main:
                    save_weights(student, tokenizer, out / "best")
        history.append(record)
        if log is not None and (done % settings.log_every == 0 or "val_loss" in record):
            log.log(record)
        if dist.is_main and (done % settings.save_every == 0 or done == len(schedule) or done == stop_after):
            save_checkpoint(out / f"checkpoint-{done}", student, optimizer, scheduler,
                            {"step": done, "best_val_loss": best_val, "history": history}, teacher)
            prune_checkpoints(out, keep=2)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if stop_after is not None and done >= stop_after:
            bar.close()
            dist.barrier()  # the checkpoint is on disk before any rank returns
            return TrainResult(out, done, best_val, history)
    bar.close()
    if dist.is_main:
        _write_final(student, tokenizer, out, settings, len(schedule), best_val)
    dist.barrier()
    return TrainResult(out, len(schedule), best_val, history)


def _write_final(student: Any, tokenizer: Any, out: Path, settings: TrainSettings, steps: int,
                 best_val: float | None) -> None:
    final = out / "final"
    if (out / "best").is_dir():
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(out / "best", final)
    else:
        save_weights(student, tokenizer, final)
    (out / "train_summary.json").write_text(json.dumps(
        {"steps": steps, "best_val_loss": best_val, "settings": settings.model_dump()}, indent=1))


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def _micro_seed(seed: int, step: int, micro: int, phase: int) -> int:
    """Seed of one micro-batch's sampling (phase 0) or forward (phase 1): the same whichever rank runs it."""
    return (_step_seed(seed, step) * 4099 + 2 * micro + phase) % (2**63)


def _train_step(student: Any, tokenizer: Any, encoded: list[Encoded], micro_batches: list[list[int]],
                settings: TrainSettings, teacher: TeacherFn | None, optimizer: Any, scheduler: Any,
                device: torch.device, step: int, dist: DistContext = SINGLE) -> dict[str, Any]:
    # this rank's share of the window (all of it in a single process), with each micro-batch's global index
    mine = [(a, collate([encoded[i] for i in mb], tokenizer.pad_token_id, settings.token_mask).to(device))
            for a, mb in dist.shard(micro_batches) if mb]
    # GKD tosses its on-policy coin per micro-batch, as the study's trainer (and TRL's) does per training step
    on_policy = 0
    if settings.objective == "gkd":
        batches = []
        for a, b in mine:
            if random.Random(f"{settings.seed}:gkd:{step}:{a}").random() < settings.lmbda:
                torch.manual_seed(_micro_seed(settings.seed, step, a, 0))
                b = on_policy_batch(student, tokenizer, b, settings)
                on_policy += 1
            batches.append((a, b))
        mine = batches
    # the normalisers are the whole window's unit counts, summed over ranks (on-policy samples change them)
    local = window_units([b for _, b in mine], settings)
    window = Units(*(int(v) for v in dist.sum_values([local.ce, local.kd])))
    t0 = time.perf_counter()
    loss = ce = kd = 0.0
    for a, b in mine:
        torch.manual_seed(_micro_seed(settings.seed, step, a, 1))
        parts = batch_loss(student, b, settings, teacher, window)
        parts.total.backward()
        loss += float(parts.total.detach())
        ce += parts.ce
        kd += parts.kd
    params = [p for p in student.parameters() if p.requires_grad]
    dist.sum_gradients(params)
    grad_norm = None
    if settings.max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b.attention_mask.sum()) for _, b in mine)
    loss, ce, kd, tokens, on_policy = dist.sum_values([loss, ce, kd, tokens, on_policy])
    return {"step": step + 1, "loss": loss, "ce": ce, "kd": kd, "on_policy": int(on_policy), "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm, "tokens": int(tokens), "seconds": time.perf_counter() - t0}
