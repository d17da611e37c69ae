"""Generation inside training: the student's on-policy samples (GKD) and the teacher's responses (sequence-level KD)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from ..prompts import Encoded, Example, encode_prompt
from .batches import Batch, collate
from .settings import TrainSettings


@torch.no_grad()
def sample_continuations(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, temperature: float | None
) -> list[list[int]]:
    """Sample (or, with temperature None, greedily decode) continuations of tokenised prompts; cut after EOS."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
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
    """Replace a batch's responses by the student's own samples for the same prompts."""
    samples = sample_continuations(student, tokenizer, batch.prompts, settings.max_new_tokens, settings.sample_temperature)
    items = [Encoded(p + s, len(p)) for p, s in zip(batch.prompts, samples)]
    return collate(items, tokenizer.pad_token_id, settings.token_mask).to(batch.input_ids.device)


def teacher_responses(teacher: Any, tokenizer: Any, examples: Sequence[Example], settings: TrainSettings,
                      batch_size: int = 16) -> list[str]:
    """Greedy teacher responses for sequence-level KD (Kim & Rush): the student is then trained on them with CE."""
    out: list[str] = []
    for i in range(0, len(examples), batch_size):
        prompts = [encode_prompt(tokenizer, e, settings.prompt_style) for e in examples[i: i + batch_size]]
        for ids in sample_continuations(teacher, tokenizer, prompts, settings.max_new_tokens, None):
            out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def cached_teacher_responses(out: Path, teacher_model: Any, tokenizer: Any, train_set: Sequence[Example],
                             settings: TrainSettings) -> list[str]:
    """`teacher_responses`, generated once per run folder (a resumed run reuses them)."""
    path = out / "teacher_responses.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if len(cached) == len(train_set):
            return cached
    responses = teacher_responses(teacher_model, tokenizer, train_set, settings)
    path.write_text(json.dumps(responses))
    return responses
