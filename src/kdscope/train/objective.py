"""The training objective on one micro-batch: (1-w)*CE + w*KD, normalised over its accumulation window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import InputError
from ..losses import cross_entropy_parts, distill_loss_parts, distill_loss_sparse
from ..prompts import Encoded
from ..teacher import TeacherOutput, align_vocab
from .batches import Batch, collate
from .settings import TrainSettings

TeacherFn = Callable[[torch.Tensor, torch.Tensor], TeacherOutput]  # e.g. kdscope.teacher.OnlineTeacher


def units(mask: torch.Tensor, reduction: str) -> int:
    """How many units (tokens or sequences) a micro-batch contributes to its accumulation window's denominator."""
    return int(mask.sum()) if reduction == "token_mean" else int((mask.sum(-1) > 0).sum())


@dataclass
class StepLosses:
    total: torch.Tensor
    ce: float
    kd: float


def batch_loss(
    student: Any, batch: Batch, settings: TrainSettings, teacher: TeacherFn | None, denom: int
) -> StepLosses:
    """(1-w)*CE + w*KD of one micro-batch, as a share of the accumulation window (``denom`` units)."""
    logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    mask = batch.loss_mask
    w = settings.kd_weight if settings.objective in ("kd", "gkd") else 0.0
    zero = logits.new_zeros(())
    ce_sum = zero
    if w < 1:  # the study's w = 1 needs no cross-entropy pass
        ce_sum = cross_entropy_parts(logits, batch.input_ids[:, 1:], mask, reduction=settings.reduction).total
    kd_sum = zero
    if w > 0:
        assert teacher is not None
        kd_sum = _kd_sum(logits, teacher(batch.input_ids, batch.attention_mask), mask, settings)
    total = ((1 - w) * ce_sum + w * kd_sum) / max(denom, 1)
    return StepLosses(total, float(ce_sum.detach()) / max(denom, 1), float(kd_sum.detach()) / max(denom, 1))


def _kd_sum(logits: torch.Tensor, signal: TeacherOutput, mask: torch.Tensor, settings: TrainSettings) -> torch.Tensor:
    """Sum of the KD divergence over the micro-batch's units, from a dense or a top-k teacher signal."""
    kw = dict(loss=settings.loss, temperature=settings.temperature, beta=settings.beta, alpha=settings.alpha,
              scale_by_t2=settings.scale_by_t2)
    if signal.logits is not None:
        t_logits = signal.logits[:, :-1]
        if t_logits.shape[-1] != logits.shape[-1]:  # e.g. Qwen2.5-7B (152064) -> 0.5B (151936)
            logits, t_logits = align_vocab(logits, t_logits)
        return distill_loss_parts(logits, t_logits, mask, reduction=settings.reduction, **kw).total
    if settings.reduction != "token_mean":
        raise InputError("a top-k teacher signal supports reduction token_mean only")
    mean = distill_loss_sparse(logits, signal.topk_values[:, :-1], signal.topk_indices[:, :-1], mask,
                               teacher_log_normalizer=signal.topk_log_normalizer[:, :-1], tail=settings.topk_tail, **kw)
    return mean * mask.sum()


@torch.no_grad()
def validation_loss(student: Any, val_encoded: list[Encoded], tokenizer: Any, settings: TrainSettings,
                    teacher: TeacherFn | None, device: torch.device) -> float:
    """The training objective (off-policy) on the held-out set, normalised over the whole set."""
    was_training = student.training
    student.eval()
    mb = settings.micro_batch_size
    batches = [collate(val_encoded[i: i + mb], tokenizer.pad_token_id, settings.token_mask).to(device)
               for i in range(0, len(val_encoded), mb)]
    denom = sum(units(b.loss_mask, settings.reduction) for b in batches)
    total = sum(float(batch_loss(student, b, settings, teacher, denom).total) for b in batches)
    student.train(was_training)
    return total
