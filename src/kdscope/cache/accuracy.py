"""Accuracy tool: the KD loss from the cached top-k signal vs from the dense teacher, per k, loss, T and tail mode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError
from ..losses import TailMode, divergence_rows, sparse_log_probs
from .codec import normalised_temperatures, record_tensors, sparsify


@dataclass(frozen=True)
class CacheError:
    """Per-token KD loss from the cached top-k signal vs from the dense teacher, over ``tokens`` positions."""

    k: int
    loss: str
    temperature: float
    tail: str
    tokens: int
    dense_mean: float
    mean_abs_error: float
    relative_error: float  # sum |cached - dense| / sum dense
    max_abs_error: float


def _per_token_losses(student: Tensor, teacher: Tensor, k: int, loss: str, temperature: float, tail: TailMode,
                      value_dtype: str) -> tuple[Tensor, Tensor]:
    """(dense, cached) per-token divergences times T^2 of rows [n, vocab], the cached side through the cache's own
    stored form (``sparsify`` -> ``record_tensors``) and the sparse loss's own rows (``sparse_log_probs``)."""
    temps = normalised_temperatures([temperature])
    record = sparsify(teacher, k, temps, value_dtype)
    values, indices, normalizer, log_tail = record_tensors(record, temps.index(temperature))
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    dense = divergence_rows(log_p, log_q, loss, 0.5, 0.1)
    effective_tail: TailMode = "renormalise" if values.shape[-1] >= teacher.shape[-1] else tail
    sparse_p, sparse_q = sparse_log_probs(student.float(), values, indices, normalizer, temperature, effective_tail,
                                          log_tail)
    cached = divergence_rows(sparse_p, sparse_q, loss, 0.5, 0.1)
    return dense * temperature**2, cached * temperature**2


@torch.no_grad()
def cache_divergence_error(
    student_logits: Tensor,
    teacher_logits: Tensor,
    ks: Sequence[int] = (8, 32, 64, 256),
    losses: Sequence[str] = ("forward_kl", "reverse_kl"),
    temperatures: Sequence[float] = (1.0, 2.0),
    tails: Sequence[TailMode] = ("tail_bucket", "renormalise"),
    value_dtype: str = "float16",
    chunk_rows: int = 64,
) -> list[CacheError]:
    """How far the per-token KD loss from a cache of top-k is from the dense teacher's, for each k, loss,
    temperature and tail mode. ``student_logits`` and ``teacher_logits`` are [tokens, vocab] (masked positions only)."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise InputError(f"need [tokens, vocab] logits of one shape, got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    results = []
    for k in ks:
        for loss in losses:
            for temperature in temperatures:
                for tail in tails:
                    pairs = [_per_token_losses(student_logits[i : i + chunk_rows], teacher_logits[i : i + chunk_rows],
                                               k, loss, temperature, tail, value_dtype)
                             for i in range(0, student_logits.shape[0], chunk_rows)]
                    dense = torch.cat([d for d, _ in pairs]).double()
                    error = (torch.cat([c for _, c in pairs]).double() - dense).abs()
                    results.append(CacheError(
                        k=k, loss=loss, temperature=temperature, tail=tail, tokens=int(dense.numel()),
                        dense_mean=float(dense.mean()), mean_abs_error=float(error.mean()),
                        relative_error=float(error.sum() / dense.sum().clamp(min=1e-30)),
                        max_abs_error=float(error.max())))
    return results
