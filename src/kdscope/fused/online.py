"""The online teacher's side of the fused path: its last hidden states and head instead of its logits.

``OnlineTeacher`` (kdscope.teacher) returns logits; the fused KD loss needs what comes before them. This module runs
the same model the same way (eval mode, no grad, adapter off for the base-teacher ablation) up to the last hidden
state, checks it is finite on attended positions (a non-finite hidden state is what makes the logits non-finite), and
draws the noise seed from the teacher's own generator, so a resumed run (whose generator state the checkpoint
carries) draws the same noise as one that never stopped.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from kdscope.teacher import OnlineTeacher, check_finite

from .heads import LinearHead, fused_supported, last_hidden_states


@dataclass(frozen=True)
class TeacherHidden:
    """What ``fused_distill_parts`` needs from a dense online teacher for one batch."""

    hidden: Tensor  # [batch, seq, hidden]
    head: LinearHead  # cut to the teacher's vocab_width when it has one
    noise_sigma: float
    noise_seed: int


def fused_teacher_ready(teacher: object) -> bool:
    """Whether ``teacher`` is a dense ``OnlineTeacher`` whose model the fused path computes exactly (announced once
    in the log when its architecture is not)."""
    return isinstance(teacher, OnlineTeacher) and teacher.topk is None and fused_supported(teacher.model)


def online_teacher_hidden(teacher: OnlineTeacher, input_ids: Tensor, attention_mask: Tensor) -> TeacherHidden:
    """The teacher's last hidden states and head for this batch; counts as one call of ``teacher`` (``calls``)."""
    adapter_off = teacher.model.disable_adapter() if teacher.disable_adapter else contextlib.nullcontext()
    with torch.no_grad(), adapter_off:
        hidden = last_hidden_states(teacher.model, input_ids, attention_mask)
    check_finite(hidden, attention_mask, batch_index=teacher.calls)
    head = LinearHead.of(teacher.model)
    if teacher.vocab_width is not None:
        head = LinearHead(head.weight[: teacher.vocab_width],
                          None if head.bias is None else head.bias[: teacher.vocab_width])
    seed = 0
    if teacher.noise_sigma > 0:
        draw = torch.randint(0, 2**62, (1,), generator=teacher.generator, device=teacher.generator.device)
        seed = int(draw.item())
    teacher.calls += 1
    return TeacherHidden(hidden, head, teacher.noise_sigma, seed)
