"""A built-in tokenizer that prepends BOS (as Llama-3's does), and a tiny model sized for it: tests of the one
tokenisation rule (the tokenizer's defaults) need a tokenizer whose defaults add something."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from kdscope.models import EOS_TOKEN, PAD_TOKEN, TINY_TOKENIZER_FILE, build_tiny_model

BOS_TOKEN = "<|bos|>"


def bos_tokenizer() -> Any:
    """The built-in tiny tokenizer plus a BOS token that its post-processor prepends to every encoding."""
    raw = Tokenizer.from_file(str(TINY_TOKENIZER_FILE))
    raw.add_special_tokens([BOS_TOKEN])
    bos_id = raw.token_to_id(BOS_TOKEN)
    raw.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B",
                                                       special_tokens=[(BOS_TOKEN, bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    tok.padding_side = "left"
    return tok


def bos_model(name: str = "tiny-qwen-xs", seed: int = 0) -> tuple[Any, Any]:
    """A randomly initialised built-in architecture whose vocabulary covers the BOS tokenizer."""
    return build_tiny_model(name, seed, tokenizer=bos_tokenizer())
