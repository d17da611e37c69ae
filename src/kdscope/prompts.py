"""Examples, the study's prompt, and how an example becomes tokens.

This module sits below ``data`` (loaders), ``synthetic`` (generated tasks), ``cache`` and ``train``: everything that
turns an example into a prompt or into training tokens goes through here, so training, the teacher cache,
generation and scoring see the same text and the same tokenisation rule.

Tokenisation rule (the study's, study.md section 2): the tokenizer's defaults, i.e. ``add_special_tokens`` left at
its default, so a Llama-3 tokenizer prepends BOS and a Qwen2.5 tokenizer adds nothing; truncation at ``max_length``;
EOS appended only when there is room (and, for a generated response, only when its author ended it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .errors import InputError


@dataclass(frozen=True)
class Example:
    instruction: str
    answer: str
    input: str = ""
    output: str = ""


# --------------------------------------------------------------------------------------------------------------------
# Prompts. "study" reproduces the released code byte for byte, including its quirks: the training prompt
# (finetune.py) and the evaluation prompt (evaluate.py) differ in trailing spaces and in the whitespace-only line
# between sections, and both indent every section by 16 spaces. "alpaca" is the clean Alpaca template.
# --------------------------------------------------------------------------------------------------------------------
_PAD = " " * 16
_HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_HEAD_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

PromptStyle = Literal["study", "alpaca"]
PROMPT_STYLES: tuple[str, ...] = ("study", "alpaca")


def _study_prompt(ex: Example, train: bool) -> str:
    gap = f"\n{_PAD}\n" if train else "\n\n"
    if ex.input:
        head = _HEAD_INPUT + (" " if train else "")
        return (
            f"{head}\n\n{_PAD}### Instruction:\n{_PAD}{ex.instruction}{gap}{_PAD}### Input:\n{_PAD}{ex.input}"
            f"{gap}{_PAD}### Response:\n{_PAD}"
        )
    head = _HEAD + ("  " if train else " ")
    return f"{head}\n\n{_PAD}### Instruction:\n{_PAD}{ex.instruction}{gap}{_PAD}### Response:\n{_PAD}"


def _alpaca_prompt(ex: Example) -> str:
    if ex.input:
        return f"{_HEAD_INPUT}\n\n### Instruction:\n{ex.instruction}\n\n### Input:\n{ex.input}\n\n### Response:\n"
    return f"{_HEAD}\n\n### Instruction:\n{ex.instruction}\n\n### Response:\n"


def build_prompt(ex: Example, style: str = "study", train: bool = False) -> str:
    """The prompt that precedes the response. ``train`` selects the study's training variant."""
    if style == "study":
        return _study_prompt(ex, train)
    if style == "alpaca":
        return _alpaca_prompt(ex)
    raise InputError(f"unknown prompt style {style!r}; use one of {', '.join(PROMPT_STYLES)}")


RESPONSE_MARKER = "### Response:"


def response_text(decoded: str) -> str:
    """The study's post-processing of a decoded generation: the text after ``### Response:``, stripped."""
    parts = decoded.split(RESPONSE_MARKER, 1)
    return (parts[1] if len(parts) > 1 else parts[0]).strip()


# --------------------------------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """A training sequence: token ids and how many of them are the prompt (BOS included, when the tokenizer adds one)."""

    input_ids: list[int]
    prompt_len: int


def encode_prompt(tokenizer: Any, ex: Example, style: str) -> list[int]:
    """The training prompt's ids under the tokenizer's defaults (the prompt GKD samples from and seqKD decodes from)."""
    return list(tokenizer(build_prompt(ex, style, train=True))["input_ids"])


def encode_example(tokenizer: Any, ex: Example, style: str, max_length: int, response: str | None = None,
                   add_eos: bool = True) -> Encoded:
    """Prompt + response (+ EOS), tokenised with the tokenizer's defaults and cut to ``max_length``, as the study.

    EOS follows only when there is room and ``add_eos``: a generated response that its author did not end (it ran
    into the length limit) must not teach the student to stop there.
    """
    prompt = build_prompt(ex, style, train=True)
    text = prompt + (ex.output if response is None else response)
    ids = list(tokenizer(text)["input_ids"])[:max_length]
    if add_eos and len(ids) < max_length and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    prompt_len = min(len(tokenizer(prompt)["input_ids"]), len(ids))
    return Encoded(ids, prompt_len)
