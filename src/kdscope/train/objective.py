"""The training objective on one micro-batch: (1-w)*CE + w*KD, normalised over its accumulation window.

Positions (the study's, restated in tests/test_study_reference.py):
- KD compares the two models' next-token distributions at every attended position, the last one included: the
  logits are not shifted, so a sequence of L tokens contributes L positions (the study masks its unshifted logits by
  the attention mask). ``token_mask="response"`` keeps the positions from the last prompt token on.
- Cross-entropy needs a target, so it covers positions 0..L-2 predicting tokens 1..L-1 (Hugging Face's shifted labels).

Averaging: ``reduction`` (resolved per objective in `TrainSettings`) is applied to each term over the whole
accumulation window; `window_units` counts the window's tokens or sequences for each term, and each micro-batch
divides its sums by them, so 1x16 and 4x4 micro-batches give one gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError
from ..losses import cross_entropy_parts, distill_loss_parts, distill_loss_sparse, student_objective
from ..prompts import Encoded
from ..teacher import TeacherOutput, align_vocab
from ..xtok import CrossTokenizerSignal, xtok_kd_sum
from .batches import Batch, collate
from .settings import TrainSettings

TeacherFn = Callable[[torch.Tensor, torch.Tensor], TeacherOutput]  # e.g. kdscope.teacher.OnlineTeacher


def mask_units(mask: torch.Tensor, reduction: str) -> int:
    """How many units (tokens or sequences) a mask contributes to its window's denominator."""
    return int(mask.sum()) if reduction == "token_mean" else int((mask.sum(-1) > 0).sum())


@dataclass(frozen=True)
class Units:
    """The denominators of one accumulation window: cross-entropy and KD units (they cover different positions)."""

    ce: int
    kd: int


def window_units(batches: Sequence[Batch], settings: TrainSettings) -> Units:
    reduction = settings.resolved_reduction
    return Units(sum(mask_units(b.loss_mask, reduction) for b in batches),
                 sum(mask_units(b.kd_mask, reduction) for b in batches))


@dataclass
class StepLosses:
    total: torch.Tensor
    ce: float
    kd: float


def kd_weight(settings: TrainSettings) -> float:
    """w in (1-w)*CE + w*KD: the setting for logit distillation, 0 (cross-entropy only) for sft and seqkd."""
    return settings.kd_weight if settings.objective in ("kd", "gkd") else 0.0


def batch_loss(student: Any, batch: Batch, settings: TrainSettings, teacher: TeacherFn | None,
               window: Units) -> StepLosses:
    """(1-w)*CE + w*KD of one micro-batch, as its share of the accumulation window (``window`` units)."""
    logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    w = kd_weight(settings)
    ce = kd = None
    if w < 1:  # the study's w = 1 needs no cross-entropy pass
        ce = cross_entropy_parts(logits[:, :-1], batch.input_ids[:, 1:], batch.loss_mask,
                                 reduction=settings.resolved_reduction).total / max(window.ce, 1)
    if w > 0:
        if teacher is None:
            raise InputError(f"objective {settings.objective} needs a teacher; give --teacher")
        kd = _kd_sum(logits, teacher(batch.input_ids, batch.attention_mask), batch.kd_mask, settings) / max(window.kd, 1)
    total = student_objective(kd if kd is not None else logits.new_zeros(()), ce, w)
    return StepLosses(total, 0.0 if ce is None else float(ce.detach()), 0.0 if kd is None else float(kd.detach()))


def _kd_sum(logits: torch.Tensor, signal: TeacherOutput, mask: torch.Tensor, settings: TrainSettings) -> torch.Tensor:
    """Sum of the KD divergence over the micro-batch's units, from a dense or a top-k teacher signal."""
    if isinstance(signal, CrossTokenizerSignal):  # another tokenizer (--loss xtok_kl / uld): aligned spans
        return xtok_kd_sum(logits, signal, mask, str(settings.loss), settings.temperature, settings.scale_by_t2,
                           settings.resolved_reduction)
    kw: dict[str, Any] = dict(loss=settings.loss, temperature=settings.temperature, beta=settings.beta,
                              alpha=settings.alpha, scale_by_t2=settings.scale_by_t2,
                              reduction=settings.resolved_reduction)
    if signal.logits is not None:
        t_logits = signal.logits
        if t_logits.shape[-1] != logits.shape[-1]:  # e.g. Qwen2.5-7B (152064) -> 0.5B (151936)
            logits, t_logits = align_vocab(logits, t_logits)
        return distill_loss_parts(logits, t_logits, mask, **kw).total
    if signal.temperature != settings.temperature:  # its normaliser and tail mass were computed at the signal's T
        raise InputError(f"the top-k teacher signal was built for temperature {signal.temperature} but the loss uses "
                         f"{settings.temperature}; build it with kdscope.cache.build_teacher_signal from these settings")
    mean = distill_loss_sparse(logits, signal.topk_values, signal.topk_indices, mask,
                               teacher_log_normalizer=signal.topk_log_normalizer, tail=settings.topk_tail,
                               teacher_log_tail=signal.topk_log_tail, **kw)
    return mean * mask_units(mask, settings.resolved_reduction)  # the sum over this micro-batch's units


@torch.no_grad()
def validation_loss(student: Any, val_encoded: list[Encoded], tokenizer: Any, settings: TrainSettings,
                    teacher: TeacherFn | None, device: torch.device) -> float:
    """The number that picks the best checkpoint (``settings.best_by``).

    ``ce`` (the study's): the student's cross-entropy, as the Hugging Face trainer evaluates it (its KD term is added
    only outside evaluation): each batch's mean over its target tokens, averaged over batches weighted by their size.
    ``objective``: the training objective (off-policy), normalised over the whole held-out set.
    """
    was_training = student.training
    student.eval()
    mb = settings.micro_batch_size
    batches = [collate(val_encoded[i: i + mb], tokenizer.pad_token_id, settings.token_mask).to(device)
               for i in range(0, len(val_encoded), mb)]
    if settings.best_by == "ce":
        total = 0.0
        for b in batches:
            logits = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
            mean = cross_entropy_parts(logits, b.input_ids[:, 1:], b.loss_mask, reduction="token_mean").mean()
            total += float(mean) * len(b.prompts)
        result = total / max(len(val_encoded), 1)
    else:
        window = window_units(batches, settings)
        result = sum(float(batch_loss(student, b, settings, teacher, window).total) for b in batches)
    student.train(was_training)
    return result
