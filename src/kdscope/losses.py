"""Token-level distillation losses, memory-bounded over the vocabulary.

Notation: T is the temperature, p = softmax(teacher_logits / T), q = softmax(student_logits / T).

- ``forward_kl``      KL(p || q)            the study's "SeqKD" as its released code computes it
- ``reverse_kl``      KL(q || p)            the study's "RevKD"
- ``jsd``             beta*KL(p || m) + (1-beta)*KL(q || m),  m = beta*p + (1-beta)*q   (study's GKD: beta = 0.5)
- ``skew_forward_kl`` KL(p || alpha*p + (1-alpha)*q)           (DistiLLM)
- ``skew_reverse_kl`` KL(q || alpha*q + (1-alpha)*p)           (DistiLLM)
- ``tvd``             0.5 * sum |p - q|

Every divergence is multiplied by T^2 when ``scale_by_t2`` (gradients of a softened KL shrink like 1/T^2; Hinton
et al.).

JSD limits. The definition above goes to 0 at beta = 0 and at beta = 1, but divided by its weight it tends to a KL:
jsd(beta)/beta -> KL(p || q) as beta -> 0 and jsd(beta)/(1-beta) -> KL(q || p) as beta -> 1. We follow TRL's
``GKDTrainer.generalized_jsd_loss`` (trl 1.16, trl/experimental/gkd): at exactly beta == 0 it returns forward KL and at
exactly beta == 1 reverse KL, and the mixture is m = beta*p + (1-beta)*q with weights beta on KL(p||m). Older TRL
(and the study's copy of it) mixed m = beta*q + (1-beta)*p with the same weights; the two agree at the study's
beta = 0.5, where m is symmetric.

Memory. The study's dense formulation holds several full [batch, seq, vocab] float32 tensors (with vocab = 151,936,
about 0.6 GB each per 1k tokens). Here the loss walks over the masked tokens in chunks of ``chunk_size``: each chunk
is upcast to float32, its divergence and its gradient with respect to the student logits are computed at once, and
only the gradient (in the student logits' dtype, the size the backward pass would allocate anyway) is kept. So at
most one chunk's [chunk_size, vocab] float32 temporaries are alive, in the forward and in the backward pass.

Normalisation under gradient accumulation. ``distill_loss_parts`` returns (sum, count); a trainer that splits a batch
into micro-batches sums the counts over the whole batch first and back-propagates ``parts.total / batch_count`` per
micro-batch, which gives exactly the gradient of the undivided batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdscope.errors import InputError
from kdscope.labels import DEFAULT_TEMPERATURE, check_temperature

LossName = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
LOSS_NAMES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
Reduction = Literal["token_mean", "sequence_mean"]
TailMode = Literal["renormalise", "tail_bucket"]
MaskMode = Literal["all", "response"]

DEFAULT_CHUNK_TOKENS = 32
"""32 tokens x 151,936 ids x 4 bytes = 19 MB per float32 block: the few blocks alive per chunk stay small next to the
logits themselves, while the per-chunk overhead (a dozen kernel launches) stays negligible."""

TAIL_MASS_FLOOR = 1e-12
"""Floor for the teacher's tail-bucket mass. The teacher has finite logits on every id, so its true tail mass is
positive; a zero comes from rounding 1 - sum(top-k) and would make reverse-type divergences infinite."""


@dataclass(frozen=True)
class LossParts:
    """Numerator and denominator of a reduced loss: ``total / count`` is the loss of this batch alone.

    ``count`` is the number of masked tokens (``token_mean``) or of sequences with at least one masked token
    (``sequence_mean``). Under gradient accumulation divide each micro-batch's ``total`` by the whole batch's count.
    """

    total: Tensor
    count: int

    def mean(self) -> Tensor:
        """The reduced loss; 0 (still attached to the graph) when nothing is masked in."""
        return self.total / self.count if self.count else self.total


# ----------------------------------------------------------------------------------------------------------------
# Per-token divergences on log-probabilities (rows = tokens, last dim = outcomes).


def _kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) per row, with 0 * log(0 / b) = 0 so that empty outcomes (a tail bucket of mass 0) are harmless:
    clamping log(0) = -inf to the most negative finite value makes that term exp(-huge) * finite = 0."""
    log_a = log_a.clamp(min=torch.finfo(log_a.dtype).min)
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(weight: float, log_a: Tensor, log_b: Tensor) -> Tensor:
    """log(weight * a + (1 - weight) * b), computed in log space."""
    if weight == 0.0:
        return log_b
    if weight == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight), log_b + math.log1p(-weight))


def divergence_rows(log_p: Tensor, log_q: Tensor, loss: str, beta: float, alpha: float) -> Tensor:
    """Per-row divergence between teacher log-probs ``log_p`` and student log-probs ``log_q`` (no T^2 factor)."""
    if loss == "forward_kl":
        return _kl_rows(log_p, log_q)
    if loss == "reverse_kl":
        return _kl_rows(log_q, log_p)
    if loss == "jsd":
        if beta == 0.0:
            return _kl_rows(log_p, log_q)
        if beta == 1.0:
            return _kl_rows(log_q, log_p)
        log_m = _log_mix(beta, log_p, log_q)
        return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)
    if loss == "skew_forward_kl":
        return _kl_rows(log_p, _log_mix(alpha, log_p, log_q))
    if loss == "skew_reverse_kl":
        return _kl_rows(log_q, _log_mix(alpha, log_q, log_p))
    if loss == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise InputError(f"unknown distillation loss {loss!r}: use one of {', '.join(LOSS_NAMES)}")


# ----------------------------------------------------------------------------------------------------------------
# The chunked engine: value and student gradient per chunk of rows, gradient kept, temporaries dropped.

RowLoss = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(student rows [n, vocab] upcast to at least float32 with requires_grad, their batch ids [n], their positions [n])
-> per-row loss [n]. Rows are gathered by (batch, position) so sliced, non-contiguous logits are never copied whole."""


class _ChunkedRowLoss(torch.autograd.Function):
    """scale * sum_r weights[r] * row_loss(student[batch_ids[r], positions[r]]), the gradient computed chunk by chunk
    in forward.

    Computing the gradient eagerly (by autograd on one chunk at a time) is what bounds memory: backward only scales
    the stored gradient, so no chunk's probabilities are kept for it.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: Tensor,
        batch_ids: Tensor,
        positions: Tensor,
        weights: Tensor,
        row_loss: RowLoss,
        chunk_size: int,
        scale: float,
    ) -> Tensor:
        wants_grad = ctx.needs_input_grad[0]
        compute_dtype = torch.promote_types(student.dtype, torch.float32)
        grad = torch.zeros(student.shape, dtype=student.dtype, device=student.device) if wants_grad else None
        total = torch.zeros((), dtype=compute_dtype, device=student.device)
        for start in range(0, batch_ids.numel(), chunk_size):
            chunk_index = (batch_ids[start : start + chunk_size], positions[start : start + chunk_size])
            with torch.enable_grad():
                chunk = student[chunk_index].to(compute_dtype).requires_grad_(wants_grad)
                chunk_weights = weights[start : start + chunk_size].to(compute_dtype)
                chunk_total = (row_loss(chunk, *chunk_index) * chunk_weights).sum() * scale
            if grad is not None:
                (chunk_grad,) = torch.autograd.grad(chunk_total, chunk)
                grad[chunk_index] = chunk_grad.to(grad.dtype)
            total += chunk_total.detach()
        ctx.grad = grad
        ctx.applied_scale = 1.0
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor
    ) -> tuple[Tensor | None, ...]:
        rescale_stored_grads(ctx, grad_total, (ctx.grad,), "kdscope loss")
        return ctx.grad, None, None, None, None, None, None


def rescale_stored_grads(ctx: Any, grad_total: Tensor, grads: Sequence[Tensor | None], what: str) -> None:
    """The backward of a chunked loss whose forward already computed its input gradients (``grads``, for an output
    gradient of ``ctx.applied_scale``, 1 after the forward): scale them in place to ``grad_total`` rather than
    allocating a second [tokens, vocab] tensor. Remembering the scale already applied keeps a repeated backward
    (retain_graph=True) correct; after a zero output gradient the gradients are gone, so ``what`` refuses."""
    scale = float(grad_total)
    if ctx.applied_scale == 0.0:
        raise RuntimeError(f"{what}: cannot backward again after a backward with a zero output gradient")
    for grad in grads:
        if grad is not None:
            grad.mul_(scale / ctx.applied_scale)
    ctx.applied_scale = scale


def _validate(loss: str, temperature: float, beta: float, alpha: float, chunk_size: int) -> None:
    if loss not in LOSS_NAMES:
        raise InputError(f"unknown distillation loss {loss!r}: use one of {', '.join(LOSS_NAMES)}")
    check_temperature(temperature)
    if not 0.0 <= beta <= 1.0:
        raise InputError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1 token, got {chunk_size}")


def _row_weights(mask: Tensor, reduction: Reduction) -> tuple[Tensor, Tensor, Tensor, int]:
    """(batch ids, positions) of masked tokens, their weights inside ``total``, and ``count``.

    ``token_mean``: weight 1, count = masked tokens. ``sequence_mean`` (the study's aggregation: mean over the tokens
    of each sequence, then over sequences): weight 1/len(sequence), count = sequences with a masked token.
    """
    mask = mask.to(torch.bool)
    batch_ids, positions = mask.nonzero(as_tuple=True)
    if reduction == "token_mean":
        ones = torch.ones(batch_ids.numel(), dtype=torch.float64, device=mask.device)
        return batch_ids, positions, ones, int(batch_ids.numel())
    if reduction == "sequence_mean":
        lengths = mask.sum(dim=1)
        per_sequence = 1.0 / lengths.clamp(min=1).to(torch.float64)
        return batch_ids, positions, per_sequence[batch_ids], int((lengths > 0).sum())
    raise InputError(f"unknown reduction {reduction!r}: use 'token_mean' or 'sequence_mean'")


def _check_shapes(student_logits: Tensor, mask: Tensor, teacher_shape: torch.Size, teacher_name: str) -> None:
    if student_logits.dim() != 3:
        raise InputError(f"student_logits must be [batch, seq, vocab], got shape {tuple(student_logits.shape)}")
    if tuple(mask.shape) != tuple(student_logits.shape[:2]):
        raise InputError(f"mask shape {tuple(mask.shape)} must be [batch, seq] = {tuple(student_logits.shape[:2])}")
    if tuple(teacher_shape[:2]) != tuple(student_logits.shape[:2]):
        raise InputError(
            f"{teacher_name} shape {tuple(teacher_shape)} does not match student [batch, seq] "
            f"{tuple(student_logits.shape[:2])}: align positions first"
        )


def _reduce_rows(
    student_logits: Tensor, mask: Tensor, row_loss: RowLoss, reduction: Reduction, chunk_size: int, scale: float
) -> LossParts:
    batch_ids, positions, weights, count = _row_weights(mask, reduction)
    total = _ChunkedRowLoss.apply(student_logits, batch_ids, positions, weights, row_loss, chunk_size, scale)
    return LossParts(total=total, count=count)


# ----------------------------------------------------------------------------------------------------------------
# Public API.


def distill_loss_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    loss: str = "forward_kl",
    temperature: float = DEFAULT_TEMPERATURE,
    beta: float = 0.5,
    alpha: float = 0.1,
    scale_by_t2: bool = True,
    *,
    reduction: Reduction = "token_mean",
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
) -> LossParts:
    """(sum of per-token divergences, count) over masked positions; see :class:`LossParts` for accumulation."""
    _validate(loss, temperature, beta, alpha, chunk_size)
    _check_shapes(student_logits, mask, teacher_logits.shape, "teacher_logits")
    if teacher_logits.shape[-1] != student_logits.shape[-1]:
        raise InputError(
            f"teacher vocab width {teacher_logits.shape[-1]} != student {student_logits.shape[-1]}: "
            "use kdscope.teacher.align_vocab first"
        )
    teacher = teacher_logits.detach()

    def row_loss(student_rows: Tensor, batch_ids: Tensor, positions: Tensor) -> Tensor:
        log_p = F.log_softmax(teacher[batch_ids, positions].to(student_rows.dtype) / temperature, dim=-1)
        log_q = F.log_softmax(student_rows / temperature, dim=-1)
        return divergence_rows(log_p, log_q, loss, beta, alpha)

    scale = temperature**2 if scale_by_t2 else 1.0
    return _reduce_rows(student_logits, mask, row_loss, reduction, chunk_size, scale)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    loss: str = "forward_kl",
    temperature: float = DEFAULT_TEMPERATURE,
    beta: float = 0.5,
    alpha: float = 0.1,
    scale_by_t2: bool = True,
    *,
    reduction: Reduction = "token_mean",
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
) -> Tensor:
    """Mean per-token divergence of the student from the teacher over masked positions (0-dim tensor).

    ``student_logits`` and ``teacher_logits`` are [batch, seq, vocab] with positions already aligned (the caller
    shifts); ``mask`` is [batch, seq] of 0/1. Gradients flow to ``student_logits`` only. ``reduction="sequence_mean"``
    reproduces the study's aggregation (mean over each sequence's tokens, then over sequences).
    """
    return distill_loss_parts(
        student_logits,
        teacher_logits,
        mask,
        loss,
        temperature,
        beta,
        alpha,
        scale_by_t2,
        reduction=reduction,
        chunk_size=chunk_size,
    ).mean()


def sparse_log_probs(
    student_rows: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    teacher_log_normalizer: Tensor | None,
    temperature: float,
    tail: TailMode,
    teacher_log_tail: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs over the teacher's top-k ids (plus a tail bucket for ``tail_bucket``).

    ``teacher_log_tail`` [n]: the log of the teacher's mass outside the top-k, summed over those ids from the dense
    logits (``kdscope.teacher.topk_signal``). Without it the tail is 1 - sum(top-k), which loses tails below the
    rounding of the top-k values to the floor."""
    student_scaled = student_rows / temperature
    student_topk = student_scaled.gather(1, teacher_indices)
    teacher_scaled = teacher_values.to(student_rows.dtype) / temperature
    if tail == "renormalise":
        return F.log_softmax(teacher_scaled, dim=-1), F.log_softmax(student_topk, dim=-1)
    assert teacher_log_normalizer is not None  # checked by the caller
    teacher_log_topk = teacher_scaled - teacher_log_normalizer.to(student_rows.dtype).unsqueeze(1)
    if teacher_log_tail is not None:  # an empty tail (-inf: k covers the teacher's vocabulary) takes the floor
        teacher_log_tail_mass = torch.nan_to_num(teacher_log_tail.to(student_rows.dtype),
                                                 neginf=math.log(TAIL_MASS_FLOOR))
    else:
        tail_mass = 1.0 - teacher_log_topk.double().exp().sum(-1)  # float64: 1 - sum loses the small tail in float32
        teacher_log_tail_mass = tail_mass.clamp(min=TAIL_MASS_FLOOR).to(student_rows.dtype).log()
    student_log_norm = torch.logsumexp(student_scaled, dim=-1, keepdim=True)
    student_tail_logits = student_scaled.scatter(1, teacher_indices, float("-inf"))
    student_log_tail = torch.logsumexp(student_tail_logits, dim=-1, keepdim=True) - student_log_norm
    log_p = torch.cat([teacher_log_topk, teacher_log_tail_mass.unsqueeze(1)], dim=1)
    log_q = torch.cat([student_topk - student_log_norm, student_log_tail], dim=1)
    return log_p, log_q


def distill_loss_sparse(
    student_logits: Tensor,
    teacher_topk_values: Tensor,
    teacher_topk_indices: Tensor,
    mask: Tensor,
    loss: str = "forward_kl",
    temperature: float = DEFAULT_TEMPERATURE,
    beta: float = 0.5,
    alpha: float = 0.1,
    scale_by_t2: bool = True,
    *,
    tail: TailMode = "renormalise",
    teacher_log_normalizer: Tensor | None = None,
    teacher_log_tail: Tensor | None = None,
    reduction: Reduction = "token_mean",
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
) -> Tensor:
    """:func:`distill_loss` when the teacher is known only on its top-k ids per position.

    ``teacher_topk_values`` are the teacher's raw logits at ``teacher_topk_indices`` (both [batch, seq, k]).

    - ``tail="renormalise"``: both distributions restricted to the k ids and renormalised.
    - ``tail="tail_bucket"``: k + 1 outcomes, the last holding the mass outside the k ids on each side. The teacher's
      tail mass needs its full normaliser, ``teacher_log_normalizer`` [batch, seq] = logsumexp over the whole
      vocabulary of teacher_logits / T at this loss's temperature (see ``kdscope.teacher.OnlineTeacher``), and
      ``teacher_log_tail`` [batch, seq], the log of its mass outside the top-k, when the provider computed it (the
      online teacher and the cache do; without it the tail is 1 - sum(top-k), inexact for tiny tails).

    With k = vocab both modes equal the dense loss (the tail bucket is then empty and dropped).
    """
    _validate(loss, temperature, beta, alpha, chunk_size)
    _check_shapes(student_logits, mask, teacher_topk_values.shape, "teacher_topk_values")
    if teacher_topk_indices.shape != teacher_topk_values.shape:
        raise InputError(
            f"teacher_topk_indices shape {tuple(teacher_topk_indices.shape)} != values "
            f"{tuple(teacher_topk_values.shape)}"
        )
    if tail not in ("renormalise", "tail_bucket"):
        raise InputError(f"unknown tail mode {tail!r}: use 'renormalise' or 'tail_bucket'")
    if tail == "tail_bucket" and teacher_log_normalizer is None:
        raise InputError(
            "tail='tail_bucket' needs teacher_log_normalizer (the teacher's logsumexp at this temperature)"
        )
    k = teacher_topk_values.shape[-1]
    effective_tail: TailMode = "renormalise" if k >= student_logits.shape[-1] else tail
    values = teacher_topk_values.detach()
    normalizer = None if teacher_log_normalizer is None else teacher_log_normalizer.detach()
    log_tail = None if teacher_log_tail is None else teacher_log_tail.detach()

    def row_loss(student_rows: Tensor, batch_ids: Tensor, positions: Tensor) -> Tensor:
        log_p, log_q = sparse_log_probs(
            student_rows,
            values[batch_ids, positions],
            teacher_topk_indices[batch_ids, positions].long(),
            None if normalizer is None else normalizer[batch_ids, positions],
            temperature,
            effective_tail,
            None if log_tail is None else log_tail[batch_ids, positions],
        )
        return divergence_rows(log_p, log_q, loss, beta, alpha)

    scale = temperature**2 if scale_by_t2 else 1.0
    return _reduce_rows(student_logits, mask, row_loss, reduction, chunk_size, scale).mean()


def cross_entropy_parts(
    logits: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    *,
    reduction: Reduction = "token_mean",
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
) -> LossParts:
    """Cross-entropy of ``target_ids`` [batch, seq] under ``logits`` [batch, seq, vocab], same alignment and
    chunking as :func:`distill_loss_parts` (the caller shifts: ``target_ids[:, t]`` is the token after position t)."""
    _check_shapes(logits, mask, target_ids.shape, "target_ids")
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1 token, got {chunk_size}")
    def row_loss(student_rows: Tensor, batch_ids: Tensor, positions: Tensor) -> Tensor:
        targets = target_ids[batch_ids, positions].long().unsqueeze(1)
        return (torch.logsumexp(student_rows, dim=-1, keepdim=True) - student_rows.gather(1, targets)).squeeze(1)

    return _reduce_rows(logits, mask, row_loss, reduction, chunk_size, 1.0)


def cross_entropy_loss(
    logits: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    *,
    reduction: Reduction = "token_mean",
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
) -> Tensor:
    """Mean cross-entropy over masked positions; see :func:`cross_entropy_parts`."""
    return cross_entropy_parts(logits, target_ids, mask, reduction=reduction, chunk_size=chunk_size).mean()


def kd_token_mask(attention_mask: Tensor, response_mask: Tensor | None = None, mode: MaskMode = "all") -> Tensor:
    """Which positions the KD loss covers (positions of the unshifted logits: position t predicts token t+1).

    ``all``: every attended position, prompt and last token included (the study). ``response``: only the attended
    positions that ``response_mask`` [batch, seq] marks; the trainer marks the last prompt position (it predicts the
    first response token) and every position after it.
    """
    if mode == "all":
        return attention_mask.to(torch.bool)
    if mode == "response":
        if response_mask is None:
            raise InputError("mask mode 'response' needs a response mask (which positions predict response tokens)")
        return attention_mask.to(torch.bool) & response_mask.to(torch.bool)
    raise InputError(f"unknown mask mode {mode!r}: use 'all' or 'response'")


def student_objective(kd: Tensor, ce: Tensor | None, kd_weight: float) -> Tensor:
    """``(1 - w) * CE + w * KD``. With w = 1 (the study) CE may be None and is not needed at all."""
    if not 0.0 <= kd_weight <= 1.0:
        raise InputError(f"kd weight must be in [0, 1], got {kd_weight}")
    if kd_weight == 1.0:
        return kd
    if ce is None:
        raise InputError(f"kd weight {kd_weight} < 1 needs the cross-entropy term")
    return (1.0 - kd_weight) * ce + kd_weight * kd
