"""Byte-normalised vocabularies and the shared part of two of them.

Two tokenizers spell the same text differently inside their vocabularies: byte-level BPE (GPT-2, Qwen2, SmolLM2)
stores each byte as a printable stand-in character ('Ġ' for the space), SentencePiece marks a word start with '▁' and
spells raw bytes as ``<0xAB>``. Mapped back to the bytes they produce, ids of the two vocabularies can be matched by
what they write: that is the "shared part" the cross-tokenizer KL compares exactly.

Special tokens (added tokens flagged special: ``<|endoftext|>``, ``<s>``) write no text when decoded with
``skip_special_tokens``; they match only a special token with the same content on the other side. Ids without a
spelling (unknown, undecodable) and logit rows beyond the tokenizer (padding rows) match nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdscope.errors import InputError

TokenKey = bytes | tuple[str, str]
"""What an id writes: its bytes, or ("special", content) for a special token."""

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the one every byte-level BPE uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


_UNICODE_TO_BYTE: dict[str, int] = {char: byte for byte, char in _bytes_to_unicode().items()}


def decoder_kind(tokenizer: Any) -> str:
    """'byte_level', 'sentencepiece' or 'plain', read from the fast tokenizer's decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(
            f"cross-tokenizer distillation needs a fast tokenizer (offsets and decoder); "
            f"{type(tokenizer).__name__} is a slow one: load it with use_fast=True"
        )
    described = str(backend.decoder)
    if "ByteLevel" in described:
        return "byte_level"
    if "▁" in described or "Metaspace" in described:
        return "sentencepiece"
    return "plain"


def _piece_bytes(piece: str, kind: str) -> bytes | None:
    if kind == "byte_level":
        try:
            return bytes(_UNICODE_TO_BYTE[char] for char in piece)
        except KeyError:  # not a byte-level spelling (a literal added token): its text as written
            return piece.encode("utf-8")
    if kind == "sentencepiece":
        byte_token = _BYTE_TOKEN.match(piece)
        if byte_token:
            return bytes([int(byte_token.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")
    return piece.encode("utf-8")


@dataclass(frozen=True)
class TokenSpelling:
    """Per id (up to ``len(keys)``): the bytes it writes (special tokens: their content), and its matching key."""

    text_bytes: tuple[bytes, ...]
    keys: tuple[TokenKey | None, ...]
    special: frozenset[int]

    def __len__(self) -> int:
        return len(self.keys)


def token_spelling(tokenizer: Any) -> TokenSpelling:
    """The byte spelling of every id of a fast tokenizer (added tokens included)."""
    kind = decoder_kind(tokenizer)
    vocab: dict[str, int] = tokenizer.get_vocab()
    added = {int(i): token for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    size = max(len(tokenizer), 1 + max(vocab.values(), default=-1))
    text_bytes: list[bytes] = [b""] * size
    keys: list[TokenKey | None] = [None] * size
    special: set[int] = set()
    for piece, token_id in vocab.items():
        if token_id in added:
            continue
        spelled = _piece_bytes(piece, kind)
        if spelled is not None:
            text_bytes[token_id], keys[token_id] = spelled, spelled
    unk = getattr(tokenizer, "unk_token_id", None)
    for token_id, token in added.items():
        content = str(getattr(token, "content", token))
        text_bytes[token_id] = content.encode("utf-8")
        if getattr(token, "special", False):
            special.add(token_id)
            keys[token_id] = ("special", content)
        else:  # a non-special added token is matched literally, as the text it stands for
            keys[token_id] = content.encode("utf-8")
    if unk is not None and 0 <= unk < size:
        keys[unk] = None  # <unk> writes nothing definite: it matches nothing
    return TokenSpelling(tuple(text_bytes), tuple(keys), frozenset(special))


@dataclass(frozen=True)
class SharedVocabulary:
    """Bucket of every logit row on each side: buckets 0..shared-1 are the byte strings both vocabularies write (ids
    writing the same bytes share a bucket, so duplicates on one side add up), bucket ``shared`` is the tail (every
    unmatched row). ``student_tail_empty`` / ``teacher_tail_empty``: that side has no unmatched row."""

    student_bucket: Tensor  # [student logit width] long
    teacher_bucket: Tensor  # [teacher logit width] long
    shared: int

    @property
    def student_tail_empty(self) -> bool:
        return bool((self.student_bucket < self.shared).all())

    @property
    def teacher_tail_empty(self) -> bool:
        return bool((self.teacher_bucket < self.shared).all())

    @property
    def buckets(self) -> int:
        """Outcomes the KL compares: the shared buckets, plus the tail unless both sides leave it empty."""
        return self.shared if self.student_tail_empty and self.teacher_tail_empty else self.shared + 1


def shared_vocabulary(
    student: TokenSpelling, teacher: TokenSpelling, student_width: int, teacher_width: int
) -> SharedVocabulary:
    """Match the ids of two vocabularies by what they write; rows beyond a tokenizer (padding) go to the tail."""
    teacher_keys = {key for key in teacher.keys[:teacher_width] if key is not None}
    order: dict[TokenKey, int] = {}
    # Bucket numbers follow the student's id order: deterministic for a given pair of vocabularies.
    for key in student.keys[:student_width]:
        if key is not None and key in teacher_keys and key not in order:
            order[key] = len(order)
    shared = len(order)

    def buckets(spelling: TokenSpelling, width: int) -> Tensor:
        found = [shared if key is None else order.get(key, shared) for key in spelling.keys[:width]]
        return torch.tensor(found + [shared] * (width - len(found)), dtype=torch.long)

    return SharedVocabulary(buckets(student, student_width), buckets(teacher, teacher_width), shared)
