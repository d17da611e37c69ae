"""kdscope.padding.pad_rows: the one padder, checked against hand-written batches."""

from __future__ import annotations

import torch

from kdscope.padding import pad_rows


def test_right_padding_puts_the_tokens_first() -> None:
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_left_padding_puts_the_tokens_last() -> None:
    ids, mask = pad_rows([[5, 6, 7], [8], []], pad_id=9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_min_width_keeps_a_batch_of_empty_rows_one_wide() -> None:
    ids, mask = pad_rows([[], []], pad_id=3, min_width=1)
    assert ids.tolist() == [[3], [3]] and mask.tolist() == [[0], [0]]
    assert pad_rows([[1, 2]], pad_id=0, min_width=1)[0].tolist() == [[1, 2]]
