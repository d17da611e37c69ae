"""Public fused losses (KD dense and top-k, SFT cross-entropy) and the chunked top-k builder for the teacher cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdscope.errors import InputError
from kdscope.labels import is_temperature
from kdscope.losses import LossParts, Reduction, TailMode, divergence_rows, sparse_log_probs

from .engine import (
    AUTOGRAD_BLOCKS_PER_ROW,
    CROSS_ENTROPY_BLOCKS_PER_ROW,
    DEFAULT_MEMORY_BUDGET_BYTES,
    FORWARD_KL_BLOCKS_PER_ROW,
    SPARSE_FORWARD_KL_BLOCKS_PER_ROW,
    TOPK_BLOCKS_PER_ROW,
    ChunkPlan,
    check_inputs,
    check_loss,
    chunk_rows,
    fused_head_total,
    masked_row_weights,
    soften,
    soften_,
    teacher_noise,
    wants_grad,
)
from .heads import LinearHead

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
    check_loss(loss, temperature, beta, alpha)
    check_inputs(student_hidden, student_head, mask)
    check_inputs(teacher_hidden, teacher_head, mask, "teacher_hidden")
    if noise_sigma < 0:
        raise InputError(f"teacher noise sigma must be >= 0, got {noise_sigma}")
    weights, count = masked_row_weights(mask, reduction)
    mask = mask.to(torch.bool)
    rows = student_hidden[mask]
    teacher_rows = teacher_hidden.detach()[mask]
    t_weight = teacher_head.weight.detach()
    t_bias = None if teacher_head.bias is None else teacher_head.bias.detach()
    width = min(student_head.vocab, teacher_head.vocab)

    @torch.no_grad()
    def teacher_logits(start: int, stop: int, dtype: torch.dtype) -> Tensor:
        logits = F.linear(teacher_rows[start:stop], t_weight[:width], None if t_bias is None else t_bias[:width])
        if noise_sigma > 0:
            noise = teacher_noise(noise_seed, range(start, stop), width, logits.device)
            logits = noise.mul_(noise_sigma).add_(logits)  # float32, = logits + sigma * noise
        return logits.to(dtype)

    def row_loss(student_logits: Tensor, start: int, stop: int) -> Tensor:
        log_p = F.log_softmax(soften(teacher_logits(start, stop, student_logits.dtype), temperature), dim=-1)
        log_q = F.log_softmax(soften(student_logits, temperature), dim=-1)
        return divergence_rows(log_p, log_q, loss, beta, alpha)

    def kl_and_grad(student_logits: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
        # Closed forms with q = softmax(s / T):
        # KL(p || q) = sum p (log p - log q), gradient (q - p) / T;
        # KL(q || p) = sum q (log q - log p), gradient q (log q - log p - KL(q || p)) / T.
        # F.log_softmax is the plain path's kernel (same rounding per row, one fused pass instead of logsumexp's
        # four); the chunk's own logits are divided in place and then hold q or the gradient, so at most 4
        # vocabulary-wide blocks live at once (logits, log p, log q or the product vecdot takes, p or q).
        log_p = F.log_softmax(soften_(teacher_logits(start, stop, student_logits.dtype), temperature), dim=-1)
        log_q = F.log_softmax(soften_(student_logits, temperature), dim=-1)
        if forward:
            p = log_p.exp()
            log_p.sub_(log_q)
            grad = torch.exp(log_q, out=student_logits).sub_(p)
            del log_q
            per_row = torch.linalg.vecdot(p, log_p)
        else:
            q = torch.exp(log_q, out=student_logits)
            log_q.sub_(log_p)
            del log_p
            per_row = torch.linalg.vecdot(q, log_q)
            grad = log_q.sub_(per_row.unsqueeze(1)).mul_(q)
        return per_row, grad if temperature == 1.0 else grad.div_(temperature)

    forward = loss == "forward_kl" or (loss == "jsd" and beta == 0.0)
    closed_form = forward or loss == "reverse_kl" or (loss == "jsd" and beta == 1.0)
    plan = ChunkPlan(
        row_loss,
        weights,
        width,
        chunk_rows(width, rows.shape[0], memory_budget,
                   FORWARD_KL_BLOCKS_PER_ROW if closed_form else AUTOGRAD_BLOCKS_PER_ROW),
        temperature**2 if scale_by_t2 else 1.0,
        wants_grad(rows, student_head.weight, student_head.bias),
        kl_and_grad if closed_form else None,
    )
    return LossParts(total=fused_head_total(rows, student_head, plan), count=count)


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
    check_loss(loss, temperature, beta, alpha)
    check_inputs(student_hidden, student_head, mask)
    if teacher_topk_indices.shape != teacher_topk_values.shape or teacher_topk_values.shape[:2] != mask.shape:
        raise InputError(
            f"teacher top-k values {tuple(teacher_topk_values.shape)} and ids {tuple(teacher_topk_indices.shape)} "
            f"must both be [batch, seq, k] with [batch, seq] = {tuple(mask.shape)}"
        )
    if tail not in ("renormalise", "tail_bucket"):
        raise InputError(f"unknown tail mode {tail!r}: use 'renormalise' or 'tail_bucket'")
    if tail == "tail_bucket" and teacher_log_normalizer is None:
        raise InputError(
            "tail='tail_bucket' needs teacher_log_normalizer (the teacher's logsumexp at this temperature)"
        )
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

    @torch.no_grad()
    def kl_and_grad(student_logits: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
        # Forward KL over the k (+ tail) outcomes, sum_i p_i (log p_i - log q_i), with P = sum_i p_i (1 up to the
        # rounding of the stored values) and s the logits / T. renormalise: log q_i = s_i - logsumexp_K(s), so the
        # gradient is P q_i - p_i on the top-k ids and 0 elsewhere. tail_bucket: log q_i = s_i - logsumexp(s) and
        # log q_tail = logsumexp_{not K}(s) - logsumexp(s), so the gradient is P softmax(s)_j - p_tail
        # softmax_{not K}(s)_j off the top-k and P softmax(s)_i - p_i on it. All divided by T. The loss values are
        # the autograd path's (the same sparse_log_probs and divergence_rows).
        idx = indices[start:stop]
        tail_kw = {} if log_tail is None else {"teacher_log_tail": log_tail[start:stop]}
        log_p, log_q = sparse_log_probs(student_logits, values[start:stop], idx,
                                        None if normalizer is None else normalizer[start:stop], temperature,
                                        effective_tail, **tail_kw)
        per_row = divergence_rows(log_p, log_q, "forward_kl", beta, alpha)
        p = log_p.exp()
        total_p = p.sum(-1, keepdim=True)
        k = idx.shape[1]
        scaled = soften_(student_logits, temperature)
        if effective_tail == "renormalise":
            grad = scaled.zero_().scatter_(1, idx, log_q.exp().mul_(total_p).sub_(p))
        else:
            log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
            off_topk = scaled.scatter(1, idx, float("-inf"))
            off_topk.sub_(torch.logsumexp(off_topk, dim=-1, keepdim=True)).exp_().mul_(p[:, k:])  # p_tail softmax
            grad = scaled.sub_(log_norm).exp_().mul_(total_p).sub_(off_topk)
            del off_topk
            grad.scatter_(1, idx, log_q[:, :k].exp().mul_(total_p).sub_(p[:, :k]))
        return per_row, grad if temperature == 1.0 else grad.div_(temperature)

    closed_form = loss == "forward_kl" or (loss == "jsd" and beta == 0.0)
    plan = ChunkPlan(
        row_loss,
        weights,
        width,
        chunk_rows(width, rows.shape[0], memory_budget,
                   SPARSE_FORWARD_KL_BLOCKS_PER_ROW if closed_form else AUTOGRAD_BLOCKS_PER_ROW),
        temperature**2 if scale_by_t2 else 1.0,
        wants_grad(rows, student_head.weight, student_head.bias),
        kl_and_grad if closed_form else None,
    )
    return LossParts(total=fused_head_total(rows, student_head, plan), count=count)


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
    check_inputs(hidden, head, mask, "hidden")
    if tuple(target_ids.shape) != tuple(mask.shape):
        raise InputError(f"target_ids shape {tuple(target_ids.shape)} must be [batch, seq] = {tuple(mask.shape)}")
    weights, count = masked_row_weights(mask, reduction)
    mask = mask.to(torch.bool)
    rows = hidden[mask]
    targets = target_ids[mask].long().unsqueeze(1)

    def row_loss(logits: Tensor, start: int, stop: int) -> Tensor:
        picked = logits.gather(1, targets[start:stop])
        return (torch.logsumexp(logits, dim=-1, keepdim=True) - picked).squeeze(1)

    def row_loss_and_grad(logits: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
        # -log softmax(s)[target]: gradient softmax(s) - onehot(target)
        chunk_targets = targets[start:stop]
        log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
        per_row = (log_normalizer - logits.gather(1, chunk_targets)).squeeze(1)
        grad = logits.sub_(log_normalizer).exp_()  # in place: the chunk's logits are its own
        return per_row, grad.scatter_add_(1, chunk_targets, torch.full_like(chunk_targets, -1, dtype=grad.dtype))

    plan = ChunkPlan(
        row_loss,
        weights,
        head.vocab,
        chunk_rows(head.vocab, rows.shape[0], memory_budget, CROSS_ENTROPY_BLOCKS_PER_ROW),
        1.0,
        wants_grad(rows, head.weight, head.bias),
        row_loss_and_grad,
    )
    return LossParts(total=fused_head_total(rows, head, plan), count=count)


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
    if not temperatures or not all(is_temperature(t) for t in temperatures):
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
