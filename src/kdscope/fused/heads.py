"""LM heads for the fused path: the head as (weight, bias), the decoder body's last hidden states, and which
architectures compute their logits as ``head(last hidden state)`` (so the fused path is exact for them)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

LOG = logging.getLogger("kdscope.fused")


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
    # FSDP2 and DeepSpeed ZeRO-3 gather sharded parameters in the model's own forward hooks, which the fused path
    # (decoder body, then the head weight) would bypass
    if isinstance(head.weight, DTensor) or hasattr(head.weight, "ds_id") or any(
            isinstance(m, FSDPModule) for m in model.modules()):
        return "its parameters are sharded (FSDP or DeepSpeed ZeRO-3) and only its own forward gathers them"
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

