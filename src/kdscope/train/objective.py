"""The training objective on one micro-batch: (1-w)*CE + w*KD, normalised over its accumulation window.

Positions (the study's, restated in tests/test_study_reference.py):
- KD compares the two models' next-token distributions at every attended position, the last one included: the
  logits are not shifted, so a sequence of L tokens contributes L positions (the study masks its unshifted logits by
  the attention mask). ``token_mask="response"`` keeps the positions from the last prompt token on.
- Cross-entropy needs a target, so it covers positions 0..L-2 predicting tokens 1..L-1 (Hugging Face's shifted labels).

Averaging: ``reduction`` (resolved per objective in `TrainSettings`) is applied to each term over the whole
accumulation window; `window_units` counts the window's tokens or sequences for each term, and each micro-batch
divides its sums by them, so 1x16 and 4x4 micro-batches give one gradient.

Fused path (``settings.fused``, the default; issue 15): the student runs to its last hidden states and its LM head runs
inside the losses (kdscope.fused), chunk by chunk, so no [batch, seq, vocab] tensor exists: cross-entropy through
``fused_cross_entropy_parts``; KD from a dense online teacher (noise, base teacher and vocabulary alignment included)
through ``fused_distill_parts`` on the teacher's last hidden states and head; from a top-k signal (cache, or an online
top-k teacher built chunk by chunk by ``fused.chunked_topk``) through ``fused_distill_sparse_parts``; from a teacher
with another tokenizer through ``xtok.xtok_fused_kd_sum`` on both models' hidden states and heads. Same positions,
reductions and window units as the plain path, so the values and gradients agree to float rounding
(tests/test_train_fused.py). One exception, by design: the noise ablation draws the same distribution, N(0, sigma^2)
i.i.d. on every teacher logit and fresh each step, but other numbers (per-row seeded, see kdscope.fused). The
student falls back to full logits (announced once in the log) for architectures whose logits are not
``head(last hidden state)``. A teacher that cannot run fused gives its usual signal: a top-k
one (a noisy online top-k teacher) meets the fused student; dense logits (softcapping, a teacher spread over
devices) meet the student's full logits, taken from the same hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..cache import CachedTeacher, sequence_hash
from ..errors import InputError
from ..fused import (LinearHead, TeacherHidden, chunked_topk, fused_cross_entropy_parts,
                     fused_distill_parts, fused_distill_sparse_parts, fused_supported, fused_teacher_ready,
                     last_hidden_states, online_teacher_hidden)
from ..losses import cross_entropy_parts, distill_loss_parts, distill_loss_sparse, student_objective
from ..prompts import Encoded
from ..teacher import OnlineTeacher, TeacherOutput, align_vocab
from ..xtok import CrossTokenizerSignal, CrossTokenizerTeacher, xtok_fused_kd_sum, xtok_kd_sum
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
    """(1-w)*CE + w*KD of one micro-batch, as its share of the accumulation window (``window`` units).

    Fused (no vocabulary-sized logits) when ``settings.fused`` and `fused_student` allow;
    ``settings.fused_memory_budget`` bounds the fused path's per-chunk temporaries (kdscope.fused.chunk_rows)."""
    w = kd_weight(settings)
    if w > 0 and teacher is None:
        raise InputError(f"objective {settings.objective} needs a teacher; give --teacher")
    if fused_student(student, settings):
        return _fused_batch_loss(student, batch, settings, teacher, window, settings.fused_memory_budget)
    logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ce = kd = None
    if w < 1:  # the study's w = 1 needs no cross-entropy pass
        ce = cross_entropy_parts(logits[:, :-1], batch.input_ids[:, 1:], batch.loss_mask,
                                 reduction=settings.resolved_reduction).total / max(window.ce, 1)
    if w > 0:
        assert teacher is not None
        kd = _kd_sum(logits, teacher(batch.input_ids, batch.attention_mask), batch.kd_mask, settings) / max(window.kd, 1)
    return _step_losses(kd, ce, w, logits)


def _step_losses(kd: torch.Tensor | None, ce: torch.Tensor | None, w: float, like: torch.Tensor) -> StepLosses:
    total = student_objective(kd if kd is not None else like.new_zeros(()), ce, w)
    return StepLosses(total, 0.0 if ce is None else float(ce.detach()), 0.0 if kd is None else float(kd.detach()))


def fused_student(student: Any, settings: TrainSettings) -> bool:
    """Whether the student's losses run fused: ``settings.fused`` and an architecture whose logits are
    ``head(last hidden state)`` (a fallback is announced once in the log by ``fused_supported``)."""
    return settings.fused and fused_supported(student)


def _fused_batch_loss(student: Any, batch: Batch, settings: TrainSettings, teacher: TeacherFn | None, window: Units,
                      budget: int) -> StepLosses:
    """`batch_loss` on the student's last hidden states: the head runs inside each loss, chunk by chunk."""
    hidden = last_hidden_states(student, batch.input_ids, batch.attention_mask)
    head = LinearHead.of(student)
    w = kd_weight(settings)
    ce = kd = None
    if w < 1:
        ce = fused_cross_entropy_parts(hidden[:, :-1], head, batch.input_ids[:, 1:], batch.loss_mask,
                                       reduction=settings.resolved_reduction, memory_budget=budget).total
        ce = ce / max(window.ce, 1)
    if w > 0:
        assert teacher is not None
        signal = fused_teacher_signal(teacher, batch.input_ids, batch.attention_mask, budget)
        kd = _fused_kd_sum(hidden, head, signal, batch.kd_mask, settings, budget) / max(window.kd, 1)
    return _step_losses(kd, ce, w, hidden)


def fused_teacher_signal(teacher: TeacherFn, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         budget: int) -> TeacherHidden | TeacherOutput:
    """The teacher's side of a fused KD step, without its full logits where it can: a dense online teacher's last
    hidden states and head; an online top-k teacher's (or a cache's online fallback's) top-k taken chunk by chunk;
    a noise-free teacher with another tokenizer's hidden states and head; otherwise the teacher's own signal (the
    cache's stored top-k, or full logits)."""
    if isinstance(teacher, CrossTokenizerTeacher):
        return teacher.hidden_signal(input_ids, attention_mask) if teacher.fused_ready else teacher(input_ids,
                                                                                                       attention_mask)
    if fused_teacher_ready(teacher):
        assert isinstance(teacher, OnlineTeacher)
        return online_teacher_hidden(teacher, input_ids, attention_mask)
    if _topk_ready(teacher):
        assert isinstance(teacher, OnlineTeacher)
        return _online_topk(teacher, input_ids, attention_mask, budget)
    if isinstance(teacher, CachedTeacher) and teacher.fallback is not None and _topk_ready(teacher.fallback):
        lengths = attention_mask.sum(dim=1).tolist()
        if any(sequence_hash(row[:n].tolist()) not in teacher.cache for row, n in zip(input_ids.cpu(), lengths)):
            teacher.fallback_calls += 1  # as CachedTeacher counts a batch it sends whole to its fallback
            return _online_topk(teacher.fallback, input_ids, attention_mask, budget)
    return teacher(input_ids, attention_mask)


def _topk_ready(teacher: Any) -> bool:
    """A noise-free online top-k teacher whose top-k the fused path takes without full logits (noise changes which
    ids are the top-k, so a noisy one keeps its dense draw)."""
    return (isinstance(teacher, OnlineTeacher) and teacher.topk is not None and teacher.noise_sigma == 0
            and fused_supported(teacher.model))


def _online_topk(teacher: OnlineTeacher, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 budget: int) -> TeacherOutput:
    """``teacher(input_ids, attention_mask)`` of a top-k `OnlineTeacher`, the top-k taken chunk by chunk."""
    assert teacher.topk is not None
    state = online_teacher_hidden(teacher, input_ids, attention_mask)
    values, indices, normalizers, tails = chunked_topk(state.hidden, state.head, teacher.topk, (teacher.temperature,),
                                                       memory_budget=budget)
    shape = tuple(input_ids.shape)
    return TeacherOutput(topk_values=values.view(*shape, -1), topk_indices=indices.view(*shape, -1),
                         topk_log_normalizer=normalizers[:, 0].reshape(shape), temperature=teacher.temperature,
                         topk_log_tail=tails[:, 0].reshape(shape))


def _fused_kd_sum(hidden: torch.Tensor, head: LinearHead, signal: TeacherHidden | TeacherOutput,
                  mask: torch.Tensor, settings: TrainSettings, budget: int) -> torch.Tensor:
    """`_kd_sum` with the student's head inside the loss (dense logits from the teacher: the student's too)."""
    kw: dict[str, Any] = dict(loss=settings.loss, temperature=settings.temperature, beta=settings.beta,
                              alpha=settings.alpha, scale_by_t2=settings.scale_by_t2,
                              reduction=settings.resolved_reduction, memory_budget=budget)
    if isinstance(signal, TeacherHidden):
        return fused_distill_parts(hidden, head, signal.hidden, signal.head, mask, noise_sigma=signal.noise_sigma,
                                   noise_seed=signal.noise_seed, **kw).total
    if isinstance(signal, CrossTokenizerSignal):
        return xtok_fused_kd_sum(hidden, head, signal, mask, str(settings.loss), settings.temperature,
                                 settings.scale_by_t2, settings.resolved_reduction, budget)
    if signal.logits is not None:
        return _kd_sum(F.linear(hidden, head.weight, head.bias), signal, mask, settings)
    _check_signal_temperature(signal, settings)
    assert signal.topk_values is not None and signal.topk_indices is not None
    return fused_distill_sparse_parts(hidden, head, signal.topk_values, signal.topk_indices, mask,
                                      tail=settings.topk_tail, teacher_log_normalizer=signal.topk_log_normalizer,
                                      teacher_log_tail=signal.topk_log_tail, **kw).total


def _check_signal_temperature(signal: TeacherOutput, settings: TrainSettings) -> None:
    if signal.temperature != settings.temperature:  # its normaliser and tail mass were computed at the signal's T
        raise InputError(f"the top-k teacher signal was built for temperature {signal.temperature} but the loss uses "
                         f"{settings.temperature}; build it with kdscope.cache.build_teacher_signal from these settings")


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
    _check_signal_temperature(signal, settings)
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
        fused = fused_student(student, settings)
        for b in batches:
            if fused:
                parts = fused_cross_entropy_parts(last_hidden_states(student, b.input_ids, b.attention_mask)[:, :-1],
                                                  LinearHead.of(student), b.input_ids[:, 1:], b.loss_mask,
                                                  reduction="token_mean",
                                                  memory_budget=settings.fused_memory_budget)
            else:
                logits = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
                parts = cross_entropy_parts(logits, b.input_ids[:, 1:], b.loss_mask, reduction="token_mean")
            total += float(parts.mean()) * len(b.prompts)
        result = total / max(len(val_encoded), 1)
    else:
        window = window_units(batches, settings)
        result = sum(float(batch_loss(student, b, settings, teacher, window).total) for b in batches)
    student.train(was_training)
    return result
