"""Batches: padding encoded examples, the run's data order, the validation split."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import InputError
from ..losses import kd_token_mask
from ..padding import pad_rows
from ..prompts import Encoded, Example
from .settings import TrainSettings


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L], right padded
    attention_mask: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L-1]: which next-token predictions the cross-entropy counts (targets 1..L-1)
    kd_mask: torch.Tensor  # [B, L]: which positions the KD term counts (every attended one, the last included)
    prompts: list[list[int]]  # prompt ids of each row (for on-policy sampling)

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device),
                     self.kd_mask.to(device), self.prompts)


def collate(items: Sequence[Encoded], pad_id: int, token_mask: str) -> Batch:
    """Right-padded ids and the two loss masks; ``token_mask="response"`` drops the positions that predict prompt
    tokens (KD keeps the last prompt position, which predicts the first response token)."""
    ids, attn = pad_rows([e.input_ids for e in items], pad_id)
    response = torch.zeros(ids.shape, dtype=torch.bool)
    for i, e in enumerate(items):
        response[i, max(e.prompt_len - 1, 0):] = True
    kd_mask = kd_token_mask(attn, response, token_mask)  # type: ignore[arg-type]
    target_mask = kd_mask[:, :-1] & attn[:, 1:].bool()
    return Batch(ids, attn, target_mask.long(), kd_mask.long(), [e.input_ids[: e.prompt_len] for e in items])


def batch_schedule(n_items: int, settings: TrainSettings) -> list[list[list[int]]]:
    """The whole run's data order: a list of optimizer steps, each a list of micro-batches of item indices."""
    per_step = settings.micro_batch_size * settings.grad_accum
    steps_per_epoch = max(1, math.ceil(n_items / per_step))
    total = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))
    order: list[int] = []
    epoch = 0
    while len(order) < total * per_step:
        perm = list(range(n_items))
        random.Random(f"{settings.seed}:epoch:{epoch}").shuffle(perm)
        order.extend(perm)
        epoch += 1
    mb = settings.micro_batch_size
    return [
        [order[s * per_step + a * mb: s * per_step + (a + 1) * mb] for a in range(settings.grad_accum)]
        for s in range(total)
    ]


def split_validation(examples: Sequence[Example], val_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    if val_size and len(examples) <= val_size:
        raise InputError(f"val_size={val_size} but only {len(examples)} training examples; lower training.val_size")
    idx = list(range(len(examples)))
    random.Random(f"{seed}:val").shuffle(idx)
    val = sorted(idx[:val_size])
    val_set = set(val)
    return [examples[i] for i in idx if i not in val_set], [examples[i] for i in val]
