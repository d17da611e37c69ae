"""Alignment of two tokenisations of one text by character (or byte) offsets.

A boundary after a token is *clean* when the next text-bearing token starts at or after its end: byte-level BPE cuts
a multi-byte character into several tokens that all report the whole character as their offsets, so the cut inside
the character is not a clean boundary. The positions where both sides have a clean boundary split the text into
spans; a span holds one or more tokens on each side and covers the same text on both. Where the boundaries coincide
token for token, a span is 1:1; elsewhere tokens merge into one span.

Tokens without text (a BOS or chat-template special token added by the tokenizer, offsets (s, s)) belong to no span:
they only condition what follows. A special token written in the text (``<|endoftext|>`` in a prompt) has offsets and
aligns like any token, merged with the other side's pieces of the same characters.
"""

from __future__ import annotations

import bisect
import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from kdscope.errors import InputError

from .vocab import TokenSpelling, token_spelling

Offsets = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class AlignedSpan:
    """Student tokens ``student[0]:student[1]`` and teacher tokens ``teacher[0]:teacher[1]`` write the same text,
    offsets ``byte_span[0]:byte_span[1]`` (the units of the offsets given; bytes of the UTF-8 text from
    :func:`align_text` and :func:`retokenize_for_teacher`)."""

    student: tuple[int, int]
    teacher: tuple[int, int]
    byte_span: tuple[int, int]

    @property
    def one_to_one(self) -> bool:
        return self.student[1] - self.student[0] == 1 and self.teacher[1] - self.teacher[0] == 1


@dataclass(frozen=True)
class Alignment:
    """The spans of one sequence pair, in text order, and each side's token count (textless tokens included)."""

    spans: tuple[AlignedSpan, ...]
    student_length: int
    teacher_length: int

    def student_span_of_token(self) -> list[int]:
        """Span index of every student token (-1 for a token without text)."""
        return _span_of_token(self.spans, self.student_length, student=True)

    def teacher_span_of_token(self) -> list[int]:
        """Span index of every teacher token (-1 for a token without text)."""
        return _span_of_token(self.spans, self.teacher_length, student=False)

    def span_mask_from_student(self, student_token_mask: Sequence[bool] | Tensor) -> list[bool]:
        """A span is in when every one of its student tokens is (prompt/response masks map through spans whole)."""
        mask = [bool(m) for m in student_token_mask]
        return [all(mask[s.student[0]:s.student[1]]) for s in self.spans]

    def teacher_token_mask(self, student_token_mask: Sequence[bool] | Tensor) -> list[bool]:
        """A student token mask mapped to the teacher's tokens: a teacher token is in when its span is."""
        span_in = self.span_mask_from_student(student_token_mask)
        return [span >= 0 and span_in[span] for span in self.teacher_span_of_token()]

    def student_token_mask(self, teacher_token_mask: Sequence[bool] | Tensor) -> list[bool]:
        """A teacher token mask mapped to the student's tokens (the reverse direction)."""
        mask = [bool(m) for m in teacher_token_mask]
        span_in = [all(mask[s.teacher[0]:s.teacher[1]]) for s in self.spans]
        return [span >= 0 and span_in[span] for span in self.student_span_of_token()]


def _span_of_token(spans: Sequence[AlignedSpan], length: int, student: bool) -> list[int]:
    out = [-1] * length
    for index, span in enumerate(spans):
        start, stop = span.student if student else span.teacher
        out[start:stop] = [index] * (stop - start)
    return out


def _text_tokens(offsets: Offsets) -> list[int]:
    return [i for i, (start, end) in enumerate(offsets) if end > start]


def _clean_ends(offsets: Offsets, tokens: list[int]) -> set[int]:
    clean = set()
    for k, i in enumerate(tokens):
        end = offsets[i][1]
        if k + 1 == len(tokens) or offsets[tokens[k + 1]][0] >= end:
            clean.add(end)
    return clean


def align_offsets(student_offsets: Offsets, teacher_offsets: Offsets) -> Alignment:
    """Align two tokenisations of the same text from their per-token (start, end) offsets (same units on both
    sides; (s, s) marks a token without text). Offsets must not go backwards."""
    student_offsets = [(int(a), int(b)) for a, b in student_offsets]
    teacher_offsets = [(int(a), int(b)) for a, b in teacher_offsets]
    for name, offsets in (("student", student_offsets), ("teacher", teacher_offsets)):
        starts = [offsets[i][0] for i in _text_tokens(offsets)]
        if starts != sorted(starts):
            raise InputError(f"{name} token offsets go backwards: tokenise the text in order (one sequence)")
    s_tokens, t_tokens = _text_tokens(student_offsets), _text_tokens(teacher_offsets)
    if not s_tokens or not t_tokens:
        return Alignment((), len(student_offsets), len(teacher_offsets))
    cuts = sorted(_clean_ends(student_offsets, s_tokens) & _clean_ends(teacher_offsets, t_tokens))
    text_end = max(student_offsets[s_tokens[-1]][1], teacher_offsets[t_tokens[-1]][1])
    if not cuts or cuts[-1] < text_end:  # text one side leaves uncovered at the end joins the last span
        cuts.append(text_end)

    def group(offsets: list[tuple[int, int]], tokens: list[int]) -> list[list[int]]:
        groups: list[list[int]] = [[] for _ in cuts]
        for i in tokens:
            groups[min(bisect.bisect_left(cuts, offsets[i][1]), len(cuts) - 1)].append(i)
        return groups

    s_groups, t_groups = group(student_offsets, s_tokens), group(teacher_offsets, t_tokens)
    spans: list[AlignedSpan] = []
    pending_s: list[int] = []
    pending_t: list[int] = []
    start = 0
    for cut, s_group, t_group in zip(cuts, s_groups, t_groups, strict=True):
        pending_s += s_group
        pending_t += t_group
        if pending_s and pending_t:  # a cut with tokens on one side only (text the other leaves uncovered) merges on
            spans.append(AlignedSpan((pending_s[0], pending_s[-1] + 1), (pending_t[0], pending_t[-1] + 1),
                                     (start, cut)))
            pending_s, pending_t, start = [], [], cut
    if pending_s or pending_t:  # leftovers on one side join the last span
        last = spans.pop()
        s_stop = (pending_s[-1] + 1) if pending_s else last.student[1]
        t_stop = (pending_t[-1] + 1) if pending_t else last.teacher[1]
        spans.append(AlignedSpan(last.student[:1] + (s_stop,), last.teacher[:1] + (t_stop,), (last.byte_span[0], cut)))
    return Alignment(tuple(spans), len(student_offsets), len(teacher_offsets))


def _encode_with_offsets(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], Offsets]:
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def _char_to_byte(text: str) -> list[int]:
    out = [0]
    for char in text:
        out.append(out[-1] + len(char.encode("utf-8")))
    return out


def byte_offsets(text: str, ids: Sequence[int], char_offsets: Offsets, spelling: TokenSpelling) -> list[
        tuple[int, int]]:
    """Character offsets turned into UTF-8 byte offsets, cut inside a character where tokens split it.

    Tokens that split characters (byte-level BPE, SentencePiece byte fallback) all report the whole characters;
    when a run of such overlapping tokens writes exactly the bytes of the characters it covers, each gets the bytes
    it writes, in order, so two tokenizers that cut a character at the same byte still align there (one tokenizer on
    both sides aligns 1:1 everywhere); a prepended '▁' that only writes the space SentencePiece adds becomes a token
    without text, as in :func:`retokenize_for_teacher`. A run that writes something else keeps the characters' range
    for every token: its inner boundaries are not clean."""
    to_byte = _char_to_byte(text)
    out = [(to_byte[start], to_byte[max(start, end)]) for start, end in char_offsets]
    text_tokens = _text_tokens(char_offsets)
    k = 0
    while k < len(text_tokens):
        run = [text_tokens[k]]
        while k + 1 < len(text_tokens) and char_offsets[text_tokens[k + 1]][0] < char_offsets[run[-1]][1]:
            k += 1
            run.append(text_tokens[k])
        k += 1
        if len(run) == 1:
            continue
        widths = [len(spelling.text_bytes[int(ids[i])]) if int(ids[i]) < len(spelling) else 0 for i in run]
        first, last = to_byte[char_offsets[run[0]][0]], to_byte[max(char_offsets[i][1] for i in run)]
        if (sum(widths) == last - first + 1 and spelling.text_bytes[int(ids[run[0]])].startswith(b" ")
                and not text.encode("utf-8")[first:first + 1] == b" "):
            widths[0] -= 1  # SentencePiece's prepended '▁' writes a space the text lacks: not text (as decoded)
        if sum(widths) == last - first and all(widths[1:]):
            for i, width in zip(run, widths, strict=True):
                out[i] = (first, first + width)
                first += width
    return out


def align_text(
    text: str,
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    add_special_tokens: bool = True,
    spellings: tuple[TokenSpelling, TokenSpelling] | None = None,
) -> tuple[list[int], list[int], Alignment]:
    """Tokenise ``text`` with both fast tokenizers and align the two: (student ids, teacher ids, alignment in UTF-8
    byte offsets of ``text``). ``spellings``: both tokenizers' :func:`token_spelling`, when the caller has them."""
    if spellings is None:
        spellings = (token_spelling(student_tokenizer), token_spelling(teacher_tokenizer))
    student_ids, student_offsets = _encode_with_offsets(student_tokenizer, text, add_special_tokens)
    teacher_ids, teacher_offsets = _encode_with_offsets(teacher_tokenizer, text, add_special_tokens)
    return student_ids, teacher_ids, align_offsets(byte_offsets(text, student_ids, student_offsets, spellings[0]),
                                                   byte_offsets(text, teacher_ids, teacher_offsets, spellings[1]))


def byte_offsets_of_ids(ids: Sequence[int], spelling: TokenSpelling, skip: frozenset[int] = frozenset(),
                        strip_leading_space: bool = False) -> list[tuple[int, int]]:
    """Byte offsets of a given id sequence (sampled text need not be the tokenizer's own encoding): each token covers
    the bytes it writes; special tokens and ids in ``skip`` (padding) write nothing here. ``strip_leading_space``:
    the first text token's leading space is not text (the '▁' SentencePiece prepends, which its decoder strips)."""
    offsets = []
    at = 0
    for token_id in ids:
        token_id = int(token_id)
        if token_id in skip or token_id in spelling.special or token_id >= len(spelling):
            offsets.append((at, at))
            continue
        width = len(spelling.text_bytes[token_id])
        if strip_leading_space and at == 0 and spelling.text_bytes[token_id].startswith(b" "):
            width -= 1
            strip_leading_space = False
        offsets.append((at, at + width))
        at += width
    return offsets


def _decoded_positions(raw: bytes) -> list[int]:
    """For every position in ``raw``, the position in the UTF-8 of ``raw.decode(errors="replace")`` reached after
    its bytes so far (a character not yet complete maps to where it will start): monotone, so token offsets keep
    their order, and a token holding only part of a character becomes zero-width (it only conditions)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, written = [0], 0
    for k in range(len(raw)):
        written += len(decoder.decode(raw[k : k + 1], final=k + 1 == len(raw)).encode("utf-8"))
        out.append(written)
    return out


def retokenize_for_teacher(
    student_ids: Sequence[int],
    student_spelling: TokenSpelling,
    teacher_tokenizer: Any,
    teacher_spelling: TokenSpelling,
    skip: frozenset[int] = frozenset(),
    teacher_prefix_ids: Sequence[int] = (),
    strip_leading_space: bool = False,
) -> tuple[list[int], Alignment]:
    """The teacher's tokens for the text a student id sequence writes (GKD's on-policy samples, or any student
    batch row), and the alignment, in byte offsets. The text is the student's bytes decoded as UTF-8 (an invalid
    sequence becomes U+FFFD; the boundaries after it then merge up to the next clean one). ``teacher_prefix_ids``
    (e.g. the teacher's BOS) are put first, without text. ``strip_leading_space``: see :func:`byte_offsets_of_ids`
    (for a SentencePiece student)."""
    offsets = byte_offsets_of_ids(student_ids, student_spelling, skip, strip_leading_space)
    text_bytes = b"".join(
        student_spelling.text_bytes[int(i)][len(student_spelling.text_bytes[int(i)]) - (b - a):]
        for i, (a, b) in zip(student_ids, offsets, strict=True) if b > a
    )
    text = text_bytes.decode("utf-8", errors="replace")
    if text.encode("utf-8") != text_bytes:  # invalid UTF-8 (a sampled byte token alone): offsets into the text
        to_text = _decoded_positions(text_bytes)
        offsets = [(to_text[a], to_text[b]) for a, b in offsets]
    teacher_ids, teacher_char_offsets = _encode_with_offsets(teacher_tokenizer, text, add_special_tokens=False)
    teacher_offsets = byte_offsets(text, teacher_ids, teacher_char_offsets, teacher_spelling)
    prefix = [(0, 0)] * len(teacher_prefix_ids)
    alignment = align_offsets(offsets, prefix + teacher_offsets)
    return [int(i) for i in teacher_prefix_ids] + teacher_ids, alignment
