"""Generation inside training: the student's on-policy samples (GKD) and the teacher's responses (sequence-level KD)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..padding import pad_rows
from ..prompts import Encoded, Example, encode_prompt
from .batches import Batch, collate
from .settings import TrainSettings


def sample_budget(prompts: Sequence[Sequence[int]], settings: TrainSettings) -> int:
    """New tokens to generate for a batch of prompts: ``max_new_tokens`` when set, else the study's
    ``max_length - longest prompt`` (its cutoff_len - max_prompt_len), so every sequence fits the training length."""
    if settings.max_new_tokens is not None:
        return settings.max_new_tokens
    return settings.max_length - max(len(p) for p in prompts)


@torch.no_grad()
def sample_continuations(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, temperature: float | None
) -> list[list[int]]:
    """Sample (or, with temperature None, greedily decode) continuations of tokenised prompts; cut after EOS.

    Sampling is the study's: the given temperature, no top-k, no top-p."""
    if max_new_tokens < 1:  # the prompts already fill the training length
        return [[] for _ in prompts]
    pad = tokenizer.pad_token_id
    ids, attn = pad_rows(prompts, pad, side="left")
    width = ids.shape[1]
    was_training = model.training
    model.eval()
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {"do_sample": False}
    out = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device),
                         max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **sampling)
    model.train(was_training)
    result = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        result.append(row)
    return result


def on_policy_batch(student: Any, tokenizer: Any, batch: Batch, settings: TrainSettings) -> Batch:
    """Replace a batch's responses by the student's own samples for the same prompts (cut to ``max_length``).

    The samples stay token ids: the study decodes them and re-tokenises the text, which can merge tokens at the
    prompt boundary and drops a sampled EOS; kdscope trains on exactly what the student sampled."""
    budget = sample_budget(batch.prompts, settings)
    samples = sample_continuations(student, tokenizer, batch.prompts, budget, settings.sample_temperature)
    items = [Encoded((p + s)[: settings.max_length], min(len(p), settings.max_length))
             for p, s in zip(batch.prompts, samples)]
    return collate(items, tokenizer.pad_token_id, settings.token_mask).to(batch.input_ids.device)


@dataclass(frozen=True)
class TeacherResponse:
    """A teacher's generated response: its text, whether the teacher ended it (EOS), and how many tokens it took."""

    text: str
    ended: bool
    tokens: int


def teacher_responses(teacher: Any, tokenizer: Any, examples: Sequence[Example], settings: TrainSettings,
                      batch_size: int = 16) -> list[TeacherResponse]:
    """Greedy teacher responses for sequence-level KD (Kim & Rush), generated up to the training cutoff; the
    student is then trained on them with CE, with an EOS only after the responses the teacher ended."""
    out: list[TeacherResponse] = []
    for i in range(0, len(examples), batch_size):
        prompts = [encode_prompt(tokenizer, e, settings.prompt_style) for e in examples[i: i + batch_size]]
        for ids in sample_continuations(teacher, tokenizer, prompts, sample_budget(prompts, settings), None):
            ended = bool(ids) and ids[-1] == tokenizer.eos_token_id
            out.append(TeacherResponse(tokenizer.decode(ids, skip_special_tokens=True), ended, len(ids)))
    return out


RESPONSES_FILE = "teacher_responses.json"


def cached_teacher_responses(out: Path, teacher_model: Any, tokenizer: Any, train_set: Sequence[Example],
                             settings: TrainSettings) -> list[TeacherResponse]:
    """`teacher_responses`, generated once per run folder (a resumed run reuses them)."""
    path = out / RESPONSES_FILE
    if path.is_file():
        cached = json.loads(path.read_text())
        # files from before responses carried their end flag were cut at 64 tokens: generate them again
        if len(cached) == len(train_set) and all(isinstance(r, dict) for r in cached):
            return [TeacherResponse(**r) for r in cached]
    responses = teacher_responses(teacher_model, tokenizer, train_set, settings)
    path.write_text(json.dumps([asdict(r) for r in responses]))
    return responses
