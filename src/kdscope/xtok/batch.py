"""Aligned spans of a batch flattened into the index tensors the cross-tokenizer losses gather by.

Positions follow the shifted-logits convention of ``kdscope.losses``: the logits at position t predict token t+1.
Span r covering student tokens a..b-1 therefore reads the student logits at positions a-1..b-2: position a-1 gives
the distribution of the span's first token, positions a..b-2 the conditional log-probabilities of the rest of its
tokens (``log P(span) = sum of its tokens' log-probabilities``). The teacher side is the same with its own tokens.
A span whose first token has no predecessor on either side (the first token of a sequence without a BOS) has no
prediction and is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kdscope.errors import InputError
from kdscope.losses import Reduction

from .align import Alignment


@dataclass(frozen=True)
class SideIndex:
    """One side's positions, flattened span by span: row r of a span table reads positions ``span_start[r]`` to
    ``span_start[r + 1]`` of these lists, the first of them the span's first-token distribution."""

    batch: Tensor  # [P] long: batch row of each position
    position: Tensor  # [P] long: logits position
    target: Tensor  # [P] long: the actual token that position predicts
    span_start: Tensor  # [R + 1] long: CSR offsets of each span's positions


@dataclass(frozen=True)
class AlignedBatch:
    """The spans a loss compares: both sides' positions, whether each span is 1:1, and the reduction weights."""

    student: SideIndex
    teacher: SideIndex
    one_to_one: Tensor  # [R] bool
    weights: Tensor  # [R] float64: 1 (token_mean) or 1 / spans of its sequence (sequence_mean)
    count: int

    @property
    def spans(self) -> int:
        return int(self.one_to_one.numel())


def _side(rows: list[tuple[int, int, int]], ids: Tensor, starts: list[int]) -> SideIndex:
    batch: list[int] = []
    position: list[int] = []
    span_start = [0]
    for (b, first, stop), offset in zip(rows, starts, strict=True):
        for token in range(first + offset, stop + offset):
            batch.append(b)
            position.append(token - 1)
        span_start.append(len(batch))
    batch_t = torch.tensor(batch, dtype=torch.long)
    position_t = torch.tensor(position, dtype=torch.long)
    target = ids[batch_t, position_t + 1].long() if batch else torch.zeros(0, dtype=torch.long)
    return SideIndex(batch_t, position_t, target, torch.tensor(span_start, dtype=torch.long))


def aligned_batch(
    alignments: Sequence[Alignment],
    student_ids: Tensor,
    teacher_ids: Tensor,
    student_mask: Tensor,
    *,
    student_starts: Sequence[int] | None = None,
    teacher_starts: Sequence[int] | None = None,
    reduction: Reduction = "token_mean",
) -> AlignedBatch:
    """Flatten a batch of alignments. ``student_mask`` [batch, student seq] marks student logits positions as
    ``losses.kd_token_mask`` does (position t predicts token t+1); a span is in when every position predicting its
    student tokens is. ``*_starts[b]``: where token 0 of alignment b sits in the padded row (left padding)."""
    n = len(alignments)
    if student_ids.shape[0] != n or teacher_ids.shape[0] != n or student_mask.shape != student_ids.shape:
        raise InputError(
            f"{n} alignments for student ids {tuple(student_ids.shape)}, teacher ids {tuple(teacher_ids.shape)}, "
            f"mask {tuple(student_mask.shape)}: one alignment per row, mask shaped like the student ids"
        )
    if reduction not in ("token_mean", "sequence_mean"):
        raise InputError(f"unknown reduction {reduction!r}: use 'token_mean' or 'sequence_mean'")
    s_starts = list(student_starts) if student_starts is not None else [0] * n
    t_starts = list(teacher_starts) if teacher_starts is not None else [0] * n
    mask = student_mask.to(torch.bool).cpu()
    s_rows: list[tuple[int, int, int]] = []
    t_rows: list[tuple[int, int, int]] = []
    s_off: list[int] = []
    t_off: list[int] = []
    one_to_one: list[bool] = []
    per_sequence: list[int] = []
    for b, alignment in enumerate(alignments):
        used = 0
        for span in alignment.spans:
            s_first = span.student[0] + s_starts[b]
            t_first = span.teacher[0] + t_starts[b]
            if s_first < 1 or t_first < 1:
                continue
            if not bool(mask[b, s_first - 1 : span.student[1] + s_starts[b] - 1].all()):
                continue
            s_rows.append((b, span.student[0], span.student[1]))
            t_rows.append((b, span.teacher[0], span.teacher[1]))
            s_off.append(s_starts[b])
            t_off.append(t_starts[b])
            one_to_one.append(span.one_to_one)
            used += 1
        per_sequence.append(used)
    if reduction == "token_mean":
        weights = torch.ones(len(one_to_one), dtype=torch.float64)
        count = len(one_to_one)
    else:
        weights = torch.tensor([1.0 / used for used in per_sequence for _ in range(used)], dtype=torch.float64)
        count = sum(1 for used in per_sequence if used)
    return AlignedBatch(
        _side(s_rows, student_ids.cpu(), s_off),
        _side(t_rows, teacher_ids.cpu(), t_off),
        torch.tensor(one_to_one, dtype=torch.bool),
        weights,
        count,
    )
