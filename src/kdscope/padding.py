"""Token rows of different lengths as one padded batch: the one padder the cache, the trainer, on-policy sampling,
fidelity and the cross-tokenizer teacher share."""

from __future__ import annotations

from typing import Literal, Sequence

import torch


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: Literal["right", "left"] = "right",
             min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` as ``[len(rows), width]`` long tensors: the ids, padded with ``pad_id``, and the attention mask (1 on
    a row's tokens, 0 on padding). ``width`` is the longest row (at least ``min_width``).

    Right padding for teacher-forced passes (a causal model needs no position shift); left padding for
    ``generate``, whose new tokens follow every row's last token."""
    width = max([min_width, *map(len, rows)])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[r, span] = torch.tensor(list(row), dtype=torch.long)
        mask[r, span] = 1
    return ids, mask
