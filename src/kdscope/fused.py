"""Fused LM head + loss: KD divergences, cross-entropy and the teacher cache's top-k without vocabulary-sized logits.

The plain path runs each model to its logits, [batch, seq, vocab] per model plus the gradient of the student's, and
then takes the loss chunk by chunk (kdscope.losses). Here the models stop at their last hidden states and the heads
run inside the loss: per chunk of masked rows the student head (with grad), the teacher head (no grad), temperature,
divergence (``losses.divergence_rows``, the same functions as the plain path) and T^2 factor, after which the chunk's
gradient with respect to its logits is turned at once into gradients for the hidden rows, the head weight and the
bias (Liger-Kernel's trick: the backward is computed in the forward, so no chunk's logits outlive the chunk). At most
one chunk's [rows, vocab] temporaries are alive; nothing of size [batch x seq, vocab] is ever allocated.

Values equal the plain path's: the same per-row formulas in the same float32 (or wider) arithmetic on the same logits
(``F.linear`` in the head's dtype, then upcast), the same row weights (``token_mean``: 1; ``sequence_mean``:
1 / sequence length) and counts, so ``LossParts.total`` / unit count of the accumulation window gives the trainer's
gradient under accumulation exactly as ``losses.distill_loss_parts`` does (tests/test_fused.py checks to 1e-5).

Vocabulary alignment: a teacher head wider than the student's (Qwen2.5-7B's 152,064 vs 151,936) is cut to the common
width, as ``kdscope.teacher.align_vocab`` cuts logits; the rows beyond are padding.

Noise (the study's noisy-teacher ablation): N(0, sigma^2) is added to every teacher logit in float32, generated chunk
by chunk, row r of the call from its own generator seeded with ``noise_row_seed(seed, r)``. The noise is therefore
i.i.d. N(0, sigma^2) on every (row, id), the same distribution as ``OnlineTeacher(noise_sigma=...)`` draws over the full
logits (not the same numbers: that one draws one [batch, seq, vocab] block from a running generator), and it does not
depend on the chunk size; ``teacher_noise`` rebuilds the whole [rows, vocab] draw for a dense reference.

Architectures whose logits are not ``head(last hidden state)`` (final-logit softcapping, scaled logits, a LoRA or
quantised head) are detected by ``fused_supported``; callers fall back to the plain path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdscope.errors import InputError
from kdscope.losses import (
    LOSS_NAMES,
    LossParts,
    Reduction,
    TailMode,
    divergence_rows,
    sparse_log_probs,
)

LOG = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20
"""Bytes of vocabulary-wide temporaries one chunk may hold; see :func:`chunk_rows` for how it sets the chunk size."""

LOSS_BLOCKS_PER_ROW = 16
"""Vocabulary-wide float32 blocks alive per row while a divergence chunk runs (an upper count, JSD being the widest):
student and teacher logits, their temperature-scaled copies and log-softmaxes, the mixture and the KL terms kept for
autograd, the noise draw, the logits' gradient."""

TOPK_BLOCKS_PER_ROW = 4
"""The same for the top-k builder: the logits, their float32 copy, one logits / T and its exponentials."""


def chunk_rows(vocab: int, n_rows: int, budget_bytes: int, blocks_per_row: int = LOSS_BLOCKS_PER_ROW) -> int:
    """Rows per chunk: as many as fit ``budget_bytes`` of float32 [rows, vocab] temporaries, at least 1, at most all.

    Why a budget and not a fixed row count. A chunk costs two things: its vocabulary-wide temporaries, which grow with
    rows x vocab (about ``blocks_per_row`` float32 blocks per row, 9.3 MiB per row at vocab 151,936), and one read of
    each head weight ([vocab, hidden], re-read by every chunk for the forward and twice more for the gradients), a
    fixed cost per chunk. Few, large chunks amortise that re-read (the speed side: on a GPU a [rows, hidden] x
    [hidden, vocab] product only reaches full throughput for a few hundred rows); small chunks bound the peak (the
    memory side). The right row count therefore depends on the vocabulary width and on how much memory the caller can
    spare, never on the batch: so the caller gives bytes and the rows follow. The default 256 MiB gives 27 rows at
    vocab 151,936 (about the peak of Liger-Kernel's 64-row chunks, which hold fewer blocks per row) and 8,192 rows
    (everything at once) for a 512-id vocabulary.
    """
    if budget_bytes < 1:
        raise InputError(f"memory budget must be >= 1 byte, got {budget_bytes}")
    per_row = max(vocab, 1) * 4 * blocks_per_row
    return max(1, min(max(n_rows, 1), budget_bytes // per_row))


# ----------------------------------------------------------------------------------------------------------------
# Heads and models.


@dataclass(frozen=True)
class LinearHead:
    """An LM head ``logits = hidden @ weight.T + bias``: weight [vocab, hidden], bias [vocab] or None. Pass the
    model's own parameters (``LinearHead.of(model)``) so their gradients land in ``.grad`` (tied embeddings too)."""

    weight: Tensor
    bias: Tensor | None = None

    @classmethod
    def of(cls, model: Any) -> LinearHead:
        head = model.get_output_embeddings()
        return cls(head.weight, head.bias)

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])


_NEUTRAL_LOGIT_SETTINGS: tuple[tuple[str, object], ...] = (
    ("final_logit_softcapping", None),  # Gemma 2/3: logits = c * tanh(logits / c)
    ("logit_scale", 1.0),  # Cohere: logits * logit_scale
    ("logits_scaling", 1.0),  # Granite: logits / logits_scaling
    ("lm_head_multiplier", 1.0),  # Falcon-H1
    ("output_multiplier_scale", 1.0),
)
_announced: set[str] = set()


def fused_unsupported_reason(model: Any) -> str | None:
    """Why ``model``'s logits are not ``get_output_embeddings()(get_decoder()(...).last_hidden_state)``, or None."""
    if not (hasattr(model, "get_output_embeddings") and hasattr(model, "get_decoder")):
        return f"{type(model).__name__} has no separate decoder body and output head"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # a LoRA-wrapped or quantised head computes more than hidden @ W.T
        return f"its output head is a {type(head).__name__}, not a plain Linear"
    config = getattr(model, "config", None)
    for name, neutral in _NEUTRAL_LOGIT_SETTINGS:
        value = getattr(config, name, neutral)
        if value != neutral:
            return f"config.{name} = {value} changes the logits after the head"
    base = getattr(config, "dim_model_base", None)  # MiniCPM divides the hidden states by hidden_size / dim_model_base
    if base is not None and base != getattr(config, "hidden_size", base):
        return f"config.dim_model_base = {base} scales the hidden states before the head"
    return None


def fused_supported(model: Any, announce: bool = True) -> bool:
    """Whether the fused head+loss path computes this model's logits exactly. When it does not and ``announce``, log
    once per model class and reason that training falls back to the plain path."""
    reason = fused_unsupported_reason(model)
    if reason is None:
        return True
    message = f"fused LM head + loss is off for {type(model).__name__}: {reason}; using full logits instead"
    if announce and message not in _announced:
        _announced.add(message)
        LOG.warning(message)
    return False


def last_hidden_states(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The decoder body's output [batch, seq, hidden] (final norm applied), without the LM head."""
    body = model.get_decoder()
    return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def noise_row_seed(seed: int, row: int) -> int:
    """Seed of the teacher noise of row ``row`` of a fused call with noise seed ``seed``."""
    return (seed * 1_000_003 + row) % (2**63)


def teacher_noise(seed: int, rows: range, width: int, device: torch.device | str = "cpu") -> Tensor:
    """Standard normal noise [len(rows), width] (float32) for the given rows of a fused call: the numbers the fused
    path adds (times sigma) to those rows' teacher logits."""
    generator = torch.Generator(device=device)
    out = torch.empty((len(rows), width), dtype=torch.float32, device=device)
    for i, row in enumerate(rows):
        generator.manual_seed(noise_row_seed(seed, row))
        out[i] = torch.randn(width, generator=generator, device=device, dtype=torch.float32)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The engine.

RowLoss = Callable[[Tensor, int, int], Tensor]
"""(student logits of rows start:stop, upcast to at least float32, requires_grad; start; stop) -> per-row loss."""


@dataclass(frozen=True)
class _Plan:
    row_loss: RowLoss
    row_weights: Tensor  # [N] float64
    width: int  # student logits used: weight[:width]
    rows_per_chunk: int
    scale: float
    wants_grad: bool


class _FusedHeadLoss(torch.autograd.Function):
    """scale * sum_r weight_r * row_loss(head(hidden_r)), with the gradients for hidden, head weight and bias computed
    chunk by chunk in forward; backward only scales them (in place, remembering the scale already applied)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan
    ) -> Tensor:
        need_h = plan.wants_grad and ctx.needs_input_grad[0]
        need_w = plan.wants_grad and ctx.needs_input_grad[1]
        need_b = plan.wants_grad and bias is not None and ctx.needs_input_grad[2]
        w_view = weight[: plan.width]
        b_view = None if bias is None else bias[: plan.width]
        accumulate = torch.promote_types(weight.dtype, torch.float32)  # many chunks summed: not in bfloat16
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if need_b and bias is not None else None
        compute = torch.promote_types(weight.dtype, torch.float32)
        total = torch.zeros((), dtype=compute, device=hidden.device)
        for start in range(0, hidden.shape[0], plan.rows_per_chunk):
            stop = min(start + plan.rows_per_chunk, hidden.shape[0])
            h = hidden[start:stop]
            logits = F.linear(h, w_view, b_view)
            with torch.enable_grad():
                rows = logits.to(compute).requires_grad_(need_h or need_w or need_b)
                chunk_weights = plan.row_weights[start:stop].to(compute)
                chunk_total = (plan.row_loss(rows, start, stop) * chunk_weights).sum() * plan.scale
            if rows.requires_grad:
                (grad_rows,) = torch.autograd.grad(chunk_total, rows)
                grad_logits = grad_rows.to(logits.dtype)  # the dtype the plain path stores the logits' gradient in
                del grad_rows, rows
                if grad_h is not None:
                    grad_h[start:stop] = grad_logits @ w_view
                if grad_w is not None:
                    grad_w[: plan.width].addmm_(grad_logits.t().to(accumulate), h.to(accumulate))
                if grad_b is not None:
                    grad_b[: plan.width] += grad_logits.sum(0).to(accumulate)
            total += chunk_total.detach()
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None or bias is None else grad_b.to(bias.dtype),
        )
        ctx.applied_scale = 1.0
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor
    ) -> tuple[Tensor | None, ...]:
        scale = float(grad_total)
        if ctx.applied_scale == 0.0:
            raise RuntimeError("kdscope fused loss: cannot backward again after a backward with a zero output gradient")
        for grad in ctx.grads:
            if grad is not None:
                grad.mul_(scale / ctx.applied_scale)
        ctx.applied_scale = scale
        return (*ctx.grads, None)


def _fused_total(hidden: Tensor, head: LinearHead, plan: _Plan) -> Tensor:
    return _FusedHeadLoss.apply(hidden, head.weight, head.bias, plan)


def _wants_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------------------------
# Row selection and checks.


def masked_row_weights(mask: Tensor, reduction: Reduction) -> tuple[Tensor, int]:
    """Weights [N] of the masked positions in row-major order (``hidden[mask]``'s order) and the unit count, as the
    plain path weighs them: ``token_mean`` 1 per token, count = tokens; ``sequence_mean`` 1/len(sequence) per token,
    count = sequences with at least one masked token."""
    mask = mask.to(torch.bool)
    if reduction == "token_mean":
        n = int(mask.sum())
        return torch.ones(n, dtype=torch.float64, device=mask.device), n
    if reduction == "sequence_mean":
        lengths = mask.sum(dim=1)
        per_sequence = 1.0 / lengths.clamp(min=1).to(torch.float64)
        return per_sequence.unsqueeze(1).expand_as(mask)[mask], int((lengths > 0).sum())
    raise InputError(f"unknown reduction {reduction!r}: use 'token_mean' or 'sequence_mean'")


def _check_inputs(hidden: Tensor, head: LinearHead, mask: Tensor, name: str = "student_hidden") -> None:
    if hidden.dim() != 3:
        raise InputError(f"{name} must be [batch, seq, hidden], got shape {tuple(hidden.shape)}")
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise InputError(f"mask shape {tuple(mask.shape)} must be [batch, seq] = {tuple(hidden.shape[:2])}")
    if head.weight.dim() != 2 or head.weight.shape[1] != hidden.shape[-1]:
        raise InputError(
            f"{name} width {hidden.shape[-1]} does not match its head weight {tuple(head.weight.shape)} "
            "([vocab, hidden])"
        )


def _check_loss(loss: str, temperature: float, beta: float, alpha: float) -> None:
    if loss not in LOSS_NAMES:
        raise InputError(f"unknown distillation loss {loss!r}: use one of {', '.join(LOSS_NAMES)}")
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature}")
    if not (0.0 <= beta <= 1.0 and 0.0 <= alpha <= 1.0):
        raise InputError(f"beta and alpha must be in [0, 1], got beta {beta}, alpha {alpha}")


# ----------------------------------------------------------------------------------------------------------------
# Public losses.


def fused_distill_parts(
    student_hidden: Tensor,
    student_head: LinearHead,
    teacher_hidden: Tensor,
    teacher_head: LinearHead,
    mask: Tensor,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    scale_by_t2: bool = True,
    *,
    reduction: Reduction = "token_mean",
    noise_sigma: float = 0.0,
    noise_seed: int = 0,
    memory_budget: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> LossParts:
    """``losses.distill_loss_parts(student_head(student_hidden), teacher_head(teacher_hidden), mask, ...)`` without
    either logits tensor. Hidden states are [batch, seq, hidden] with positions aligned (the caller shifts); the
    teacher head is cut to the student's width when wider (and vice versa). ``noise_sigma`` > 0 adds the seeded
    teacher noise described in the module docstring."""
    _check_loss(loss, temperature, beta, alpha)
    _check_inputs(student_hidden, student_head, mask)
    _check_inputs(teacher_hidden, teacher_head, mask, "teacher_hidden")
    if noise_sigma < 0:
        raise InputError(f"teacher noise sigma must be >= 0, got {noise_sigma}")
    weights, count = masked_row_weights(mask, reduction)
    mask = mask.to(torch.bool)
    rows = student_hidden[mask]
    teacher_rows = teacher_hidden.detach()[mask]
    t_weight = teacher_head.weight.detach()
    t_bias = None if teacher_head.bias is None else teacher_head.bias.detach()
    width = min(student_head.vocab, teacher_head.vocab)

    def row_loss(student_logits: Tensor, start: int, stop: int) -> Tensor:
        with torch.no_grad():
            teacher_logits = F.linear(
                teacher_rows[start:stop], t_weight[:width], None if t_bias is None else t_bias[:width]
            )
            if noise_sigma > 0:
                noise = teacher_noise(noise_seed, range(start, stop), width, teacher_logits.device)
                teacher_logits = teacher_logits.float() + noise_sigma * noise
            log_p = F.log_softmax(teacher_logits.to(student_logits.dtype) / temperature, dim=-1)
        log_q = F.log_softmax(student_logits / temperature, dim=-1)
        return divergence_rows(log_p, log_q, loss, beta, alpha)

    plan = _Plan(
        row_loss,
        weights,
        width,
        chunk_rows(width, rows.shape[0], memory_budget),
        temperature**2 if scale_by_t2 else 1.0,
        _wants_grad(rows, student_head.weight, student_head.bias),
    )
    return LossParts(total=_fused_total(rows, student_head, plan), count=count)


def fused_distill_sparse_parts(
    student_hidden: Tensor,
    student_head: LinearHead,
    teacher_topk_values: Tensor,
    teacher_topk_indices: Tensor,
    mask: Tensor,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    scale_by_t2: bool = True,
    *,
    tail: TailMode = "renormalise",
    teacher_log_normalizer: Tensor | None = None,
    teacher_log_tail: Tensor | None = None,
    reduction: Reduction = "token_mean",
    memory_budget: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> LossParts:
    """``losses.distill_loss_sparse`` (top-k teacher: the online top-k or the cache) with the student head fused: the
    student's tail logsumexp is taken chunk by chunk over its full head. Arguments as there, [batch, seq, ...]."""
    _check_loss(loss, temperature, beta, alpha)
    _check_inputs(student_hidden, student_head, mask)
    if teacher_topk_indices.shape != teacher_topk_values.shape or teacher_topk_values.shape[:2] != mask.shape:
        raise InputError(
            f"teacher top-k values {tuple(teacher_topk_values.shape)} and ids {tuple(teacher_topk_indices.shape)} "
            f"must both be [batch, seq, k] with [batch, seq] = {tuple(mask.shape)}"
        )
    if tail not in ("renormalise", "tail_bucket"):
        raise InputError(f"unknown tail mode {tail!r}: use 'renormalise' or 'tail_bucket'")
    if tail == "tail_bucket" and teacher_log_normalizer is None:
        raise InputError("tail='tail_bucket' needs teacher_log_normalizer (the teacher's logsumexp at this temperature)")
    width = student_head.vocab
    effective_tail: TailMode = "renormalise" if teacher_topk_values.shape[-1] >= width else tail
    weights, count = masked_row_weights(mask, reduction)
    mask = mask.to(torch.bool)
    rows = student_hidden[mask]
    values = teacher_topk_values.detach()[mask]
    indices = teacher_topk_indices[mask].long()
    normalizer = None if teacher_log_normalizer is None else teacher_log_normalizer.detach()[mask]
    log_tail = None if teacher_log_tail is None else teacher_log_tail.detach()[mask]

    def row_loss(student_logits: Tensor, start: int, stop: int) -> Tensor:
        tail_kw = {} if log_tail is None else {"teacher_log_tail": log_tail[start:stop]}
        log_p, log_q = sparse_log_probs(
            student_logits,
            values[start:stop],
            indices[start:stop],
            None if normalizer is None else normalizer[start:stop],
            temperature,
            effective_tail,
            **tail_kw,
        )
        return divergence_rows(log_p, log_q, loss, beta, alpha)

    plan = _Plan(
        row_loss,
        weights,
        width,
        chunk_rows(width, rows.shape[0], memory_budget),
        temperature**2 if scale_by_t2 else 1.0,
        _wants_grad(rows, student_head.weight, student_head.bias),
    )
    return LossParts(total=_fused_total(rows, student_head, plan), count=count)


def fused_cross_entropy_parts(
    hidden: Tensor,
    head: LinearHead,
    target_ids: Tensor,
    mask: Tensor,
    *,
    reduction: Reduction = "token_mean",
    memory_budget: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> LossParts:
    """``losses.cross_entropy_parts(head(hidden), target_ids, mask)`` without the logits (Liger's fused linear
    cross-entropy, restated): ``target_ids[:, t]`` is the token after position t (the caller shifts)."""
    _check_inputs(hidden, head, mask, "hidden")
    if tuple(target_ids.shape) != tuple(mask.shape):
        raise InputError(f"target_ids shape {tuple(target_ids.shape)} must be [batch, seq] = {tuple(mask.shape)}")
    weights, count = masked_row_weights(mask, reduction)
    mask = mask.to(torch.bool)
    rows = hidden[mask]
    targets = target_ids[mask].long().unsqueeze(1)

    def row_loss(logits: Tensor, start: int, stop: int) -> Tensor:
        picked = logits.gather(1, targets[start:stop])
        return (torch.logsumexp(logits, dim=-1, keepdim=True) - picked).squeeze(1)

    plan = _Plan(
        row_loss,
        weights,
        head.vocab,
        chunk_rows(head.vocab, rows.shape[0], memory_budget),
        1.0,
        _wants_grad(rows, head.weight, head.bias),
    )
    return LossParts(total=_fused_total(rows, head, plan), count=count)


@torch.no_grad()
def chunked_topk(
    hidden: Tensor,
    head: LinearHead,
    k: int,
    temperatures: Sequence[float] = (1.0,),
    *,
    vocab_width: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Teacher-cache signal of ``hidden`` [n, hidden] (or [..., hidden], flattened) without full logits: the top-k
    raw logits (float32, descending) and their ids [n, k], logsumexp(logits / T) over the (first ``vocab_width``)
    vocabulary and the log of the mass outside the top-k at T (summed over those ids, -inf when k covers the
    vocabulary), both [n, len(temperatures)]; float32 arithmetic like ``kdscope.cache.sparsify``."""
    if k < 1:
        raise InputError(f"top-k must be >= 1, got {k}")
    if any(not t > 0 for t in temperatures) or not temperatures:
        raise InputError(f"temperatures must be > 0 and at least one, got {list(temperatures)}")
    rows = hidden.reshape(-1, hidden.shape[-1])
    width = head.vocab if vocab_width is None else min(vocab_width, head.vocab)
    weight = head.weight[:width]
    bias = None if head.bias is None else head.bias[:width]
    k = min(k, width)
    values = torch.empty((rows.shape[0], k), dtype=torch.float32, device=rows.device)
    indices = torch.empty((rows.shape[0], k), dtype=torch.long, device=rows.device)
    normalizers = torch.empty((rows.shape[0], len(temperatures)), dtype=torch.float32, device=rows.device)
    log_tails = torch.empty_like(normalizers)
    step = chunk_rows(width, rows.shape[0], memory_budget, TOPK_BLOCKS_PER_ROW)
    for start in range(0, rows.shape[0], step):
        logits = F.linear(rows[start : start + step], weight, bias).float()
        top_values, top_indices = logits.topk(k, dim=-1)
        values[start : start + step], indices[start : start + step] = top_values, top_indices
        for j, temperature in enumerate(temperatures):
            scaled = logits / temperature
            normalizers[start : start + step, j] = log_normalizer = torch.logsumexp(scaled, dim=-1)
            scaled.scatter_(-1, top_indices, float("-inf"))
            log_tails[start : start + step, j] = torch.logsumexp(scaled, dim=-1) - log_normalizer
    return values, indices, normalizers, log_tails
