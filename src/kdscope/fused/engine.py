"""The fused engine: chunk size from a memory budget, seeded per-row teacher noise, and the autograd Function that
runs an LM head and a per-row loss chunk by chunk with the gradients computed in forward."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdscope.errors import InputError
from kdscope.labels import check_temperature
from kdscope.losses import LOSS_NAMES, Reduction, rescale_stored_grads

from .heads import LinearHead

DEFAULT_MEMORY_BUDGET_BYTES = 128 * 2**20
"""Bytes of vocabulary-wide temporaries one chunk may hold; see :func:`chunk_rows` for how it sets the chunk size."""

AUTOGRAD_BLOCKS_PER_ROW = 16
"""Vocabulary-wide float32 blocks alive per row while a divergence runs through autograd (an upper count, JSD being
the widest): student and teacher logits, their temperature-scaled copies and log-softmaxes, the mixture and the KL
terms kept for autograd, the noise draw, the logits' gradient."""

FORWARD_KL_BLOCKS_PER_ROW = 4
"""The closed-form forward and reverse KL: the student logits (then q or the gradient), teacher log p, log q, and p
or the product ``vecdot`` takes (the teacher's raw logits and the noise draw die before log q is taken)."""

SPARSE_FORWARD_KL_BLOCKS_PER_ROW = 4
"""The closed-form forward KL against a top-k teacher: the student logits (then q, then the gradient), their scaled
copy and its top-k-masked copy inside ``losses.sparse_log_probs`` (with logsumexp's transient), later the tail
softmax."""

CROSS_ENTROPY_BLOCKS_PER_ROW = 2
"""The closed-form cross-entropy: the logits, turned into their gradient in place, and one spare."""

TOPK_BLOCKS_PER_ROW = 4
"""The top-k builder: the logits, their float32 copy, one logits / T with the top-k masked out, its exponentials."""


def chunk_rows(vocab: int, n_rows: int, budget_bytes: int, blocks_per_row: int = AUTOGRAD_BLOCKS_PER_ROW) -> int:
    """Rows per chunk: as many as fit ``budget_bytes`` of float32 [rows, vocab] temporaries, at least 1, at most all.

    Why a budget and not a fixed row count. A chunk costs two things: its vocabulary-wide temporaries, which grow with
    rows x vocab (``blocks_per_row`` float32 blocks per row, 0.58 MiB each at vocab 151,936, by loss: 4 for the
    closed-form KLs, 2 for cross-entropy, 16 through autograd), and one read of each head weight ([vocab, hidden],
    re-read by every chunk for the logits and twice more for the gradients), a fixed cost per chunk. Few, large chunks
    amortise that re-read (on this 2-core CPU a [rows, 64] x [64, 151,936] product costs 3x more per row at 16 rows
    than at 128; on a GPU it needs a few hundred rows to reach full throughput); small chunks bound the peak. The
    right row count therefore depends on the vocabulary width, the loss's temporaries and how much memory the caller
    can spare, never on the batch: so the caller gives bytes and the rows follow. The default 128 MiB gives 55 rows
    for forward KL at vocab 151,936 (Liger-Kernel's 64-row chunks hold about as much), 110 for cross-entropy, 13 for
    JSD, and every row at once for a 512-id vocabulary. On a GPU with memory to spare, raise it (1-2 GiB).
    """
    if budget_bytes < 1:
        raise InputError(f"memory budget must be >= 1 byte, got {budget_bytes}")
    per_row = max(vocab, 1) * 4 * blocks_per_row
    return max(1, min(max(n_rows, 1), budget_bytes // per_row))


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

RowLossGrad = Callable[[Tensor, int, int], tuple[Tensor, Tensor]]
"""(student logits of rows start:stop, upcast, no grad; start; stop) -> (per-row loss [c], its gradient [c, vocab]
row by row): a closed form that replaces autograd where one is short (forward KL, cross-entropy)."""


@dataclass(frozen=True)
class ChunkPlan:
    row_loss: RowLoss
    row_weights: Tensor  # [N] float64
    width: int  # student logits used: weight[:width]
    rows_per_chunk: int
    scale: float
    wants_grad: bool
    row_loss_grad: RowLossGrad | None = None

    def chunk(self, rows: Tensor, start: int, stop: int, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        """(scale * sum_r weight_r * loss_r over the chunk, its gradient with respect to ``rows`` or None)."""
        weights = self.row_weights[start:stop].to(rows.dtype)
        if self.row_loss_grad is not None and need_grad:
            per_row, grad = self.row_loss_grad(rows, start, stop)
            total = (per_row * weights).sum() * self.scale
            return total, grad.mul_((weights * self.scale).unsqueeze(1))
        with torch.enable_grad():
            rows.requires_grad_(need_grad)
            total = (self.row_loss(rows, start, stop) * weights).sum() * self.scale
        if not need_grad:
            return total, None
        (grad,) = torch.autograd.grad(total, rows)
        return total.detach(), grad


class _FusedHeadLoss(torch.autograd.Function):
    """scale * sum_r weight_r * row_loss(head(hidden_r)), with the gradients for hidden, head weight and bias computed
    chunk by chunk in forward; backward only scales them (in place, remembering the scale already applied)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: ChunkPlan
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
            chunk_total, grad_rows = plan.chunk(logits.to(compute), start, stop, need_h or need_w or need_b)
            del logits
            if grad_rows is not None:
                grad_logits = grad_rows.to(w_view.dtype)  # the dtype the plain path stores the logits' gradient in
                del grad_rows
                if grad_h is not None:
                    grad_h[start:stop] = grad_logits @ w_view
                if grad_w is not None:
                    grad_w[: plan.width].addmm_(grad_logits.t().to(accumulate), h.to(accumulate))
                if grad_b is not None:
                    grad_b[: plan.width] += grad_logits.sum(0).to(accumulate)
            total += chunk_total
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
        rescale_stored_grads(ctx, grad_total, ctx.grads, "kdscope fused loss")
        return (*ctx.grads, None)


def fused_head_total(hidden: Tensor, head: LinearHead, plan: ChunkPlan) -> Tensor:
    return _FusedHeadLoss.apply(hidden, head.weight, head.bias, plan)


def soften(logits: Tensor, temperature: float) -> Tensor:
    """logits / T; at T = 1 the logits themselves (x / 1 == x exactly, one vocabulary-wide pass saved)."""
    return logits if temperature == 1.0 else logits / temperature


def soften_(logits: Tensor, temperature: float) -> Tensor:
    """logits / T in place (the caller owns ``logits``): no second vocabulary-wide block."""
    return logits if temperature == 1.0 else logits.div_(temperature)


def wants_grad(*tensors: Tensor | None) -> bool:
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


def check_inputs(hidden: Tensor, head: LinearHead, mask: Tensor, name: str = "student_hidden") -> None:
    if hidden.dim() != 3:
        raise InputError(f"{name} must be [batch, seq, hidden], got shape {tuple(hidden.shape)}")
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise InputError(f"mask shape {tuple(mask.shape)} must be [batch, seq] = {tuple(hidden.shape[:2])}")
    if head.weight.dim() != 2 or head.weight.shape[1] != hidden.shape[-1]:
        raise InputError(
            f"{name} width {hidden.shape[-1]} does not match its head weight {tuple(head.weight.shape)} "
            "([vocab, hidden])"
        )


def check_loss(loss: str, temperature: float, beta: float, alpha: float) -> None:
    if loss not in LOSS_NAMES:
        raise InputError(f"unknown distillation loss {loss!r}: use one of {', '.join(LOSS_NAMES)}")
    check_temperature(temperature)
    if not (0.0 <= beta <= 1.0 and 0.0 <= alpha <= 1.0):
        raise InputError(f"beta and alpha must be in [0, 1], got beta {beta}, alpha {alpha}")


