"""The cache key (what a cached teacher signal was computed from) and the digests it is made of.

``TeacherCache.open(path, expected)`` compares a stored key with the caller's and names every differing component.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..prompts import encode_example
from ..teacher import check_vocab_widths, logit_width, real_ids

DIGEST_BYTES = 16
FINGERPRINT_SAMPLES = 65_536
"""Values sampled (evenly strided) from each fingerprinted parameter tensor: enough to catch any retraining, cheap
even for a 151,936 x 1,536 embedding."""


def _digest(*chunks: bytes) -> str:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()



@dataclass(frozen=True)
class CacheKey:
    """Everything the cached signal depends on. ``weights`` may be None in an *expected* key: a caller that does not
    load the teacher (the point of the cache) then relies on the model reference and the adapter's file digest."""

    teacher: str
    adapter: str | None
    adapter_digest: str | None
    weights: str | None
    data: str
    prompt_style: str
    tokenizer: str
    k: int
    max_length: int
    vocab_width: int | None

    def folder_name(self) -> str:
        """A folder name for this key, without the weights fingerprint, so a caller that never loads the teacher
        finds the cache its builder wrote."""
        return _digest(json.dumps({**asdict(self), "weights": None}, sort_keys=True).encode())[:16]

    def differences(self, expected: "CacheKey") -> list[str]:
        """One line per component where this (stored) key differs from ``expected``."""
        out = []
        for field in fields(self):
            want, have = getattr(expected, field.name), getattr(self, field.name)
            if field.name == "weights" and want is None:
                continue
            if have != want:
                out.append(f"{field.name}: cache has {have!r}, expected {want!r}")
        return out


def sequence_hash(ids: Iterable[int]) -> str:
    """The index key of one unpadded token sequence."""
    return _digest(np.asarray(list(ids), dtype=np.int64).tobytes())


def data_digest(sequences: Sequence[Sequence[int]]) -> str:
    """Digest of a list of token id sequences, order included."""
    return _digest(*(sequence_hash(s).encode() for s in sequences))


def tokenizer_digest(tokenizer: Any) -> str:
    """Digest of the tokenizer's vocabulary (token -> id) and its EOS/pad ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    return _digest(json.dumps([vocab, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Digest of the parameter names and shapes, a strided sample of the first, middle and last parameter tensors, and
    every LoRA tensor (small, and the part a fine-tuned teacher changes)."""
    named = list(model.named_parameters())
    chosen = {0, len(named) // 2, len(named) - 1} | {i for i, (name, _) in enumerate(named) if "lora_" in name}
    chunks = [json.dumps([(name, list(p.shape)) for name, p in named]).encode()]
    for i in sorted(chosen):
        flat = named[i][1].detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)]
        chunks.append(sample.float().cpu().numpy().tobytes())
    return _digest(*chunks)


def adapter_digest(adapter: str | Path | None) -> str | None:
    """Digest of an adapter folder's files (names and contents); adapters are small, so this reads them whole."""
    if adapter is None:
        return None
    folder = Path(adapter)
    if not folder.is_dir():
        raise InputError(f"adapter {folder}: not a folder; give the folder written by `kdscope train` or peft")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return _digest(*(c for p in files for c in (str(p.relative_to(folder)).encode(), p.read_bytes())))


def encode_sequences(tokenizer: Any, examples: Sequence[Any], prompt_style: str, max_length: int) -> list[list[int]]:
    """The token sequences the trainer builds for ``examples`` (same function, so the ids match)."""
    return [encode_example(tokenizer, ex, prompt_style, max_length).input_ids for ex in examples]


def cache_key(
    teacher: str,
    adapter: str | Path | None,
    tokenizer: Any,
    sequences: Sequence[Sequence[int]],
    prompt_style: str,
    k: int,
    max_length: int,
    vocab_width: int | None = None,
    model: torch.nn.Module | None = None,
) -> CacheKey:
    """The key of a cache of ``teacher`` (+ ``adapter``) over ``sequences``; ``model`` adds the weights fingerprint.

    ``vocab_width`` (the student's logit width) cuts the teacher's logits before top-k and normaliser; InputError
    when it would cut off a real token id of ``tokenizer`` (only padding rows may go)."""
    if vocab_width is not None:
        check_vocab_widths(real_ids(tokenizer), vocab_width, vocab_width if model is None else logit_width(model))
    return CacheKey(
        teacher=teacher,
        adapter=None if adapter is None else str(adapter),
        adapter_digest=adapter_digest(adapter),
        weights=None if model is None else weights_fingerprint(model),
        data=data_digest(sequences),
        prompt_style=prompt_style,
        tokenizer=tokenizer_digest(tokenizer),
        k=k,
        max_length=max_length,
        vocab_width=vocab_width,
    )


