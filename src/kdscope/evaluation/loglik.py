"""Likelihood scoring as lm-evaluation-harness's HF backend does it: the same tokenisation of (context, continuation)
pairs, summed continuation log-probabilities, ``acc`` = argmax, ``acc_norm`` = argmax of the sum divided by the
choice's length in characters. An item's context and all of its choices are packed into one sequence under a block
attention mask, so the context is computed once, and the vocabulary projection runs only at the positions that
predict a choice's tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import InputError
from ..progress import progress_bar
from ..prompts import Example
from ..tasks import Task, get_task
from .choices import ChoiceRequest, LoglikPrompt, choice_requests, parse_choice_item
from .records import open_for_append, read_done, select_items, summarize


# --------------------------------------------------------------------------------------------------------------------
# Likelihood scoring: one packed row per item (context once, choices side by side under a block mask)
# --------------------------------------------------------------------------------------------------------------------
def _encode(tokenizer: Any, text: str) -> list[int]:
    """lm-eval's ``tok_encode``: the tokenizer's default special tokens, none when the text already starts with BOS."""
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix_id is not None and text.startswith(tokenizer.decode(prefix_id)):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: trailing spaces move to the continuation, the whole string is encoded once and the
    continuation is what follows the context's own encoding; an empty context becomes the BOS (or EOS) token."""
    if not context:
        prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return ([prefix_id], cont) if cont[0] != prefix_id else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx) :]


@dataclass
class _Group:
    """Choices of one item that share a context encoding (all of them, except in winogrande's partial scoring)."""

    item: int
    context: list[int]
    choices: list[int]  # positions within the item
    continuations: list[list[int]]

    @property
    def packed_length(self) -> int:
        """Tokens of its packed row: the context, then each choice but its last token (only ever a target)."""
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def _groups(tokenizer: Any, items: Sequence[Sequence[ChoiceRequest]], max_length: int) -> list[_Group]:
    groups: list[_Group] = []
    for i, requests in enumerate(items):
        by_context: dict[tuple[int, ...], _Group] = {}
        for k, req in enumerate(requests):
            ctx, cont = encode_pair(tokenizer, req.context, req.continuation)
            if not cont:
                raise InputError(f"item {i} choice {k}: the continuation encodes to no tokens")
            group = by_context.setdefault(tuple(ctx), _Group(i, ctx, [], []))
            group.choices.append(k)
            group.continuations.append(cont)
        for group in by_context.values():
            # lm-eval left-truncates context+continuation to max_length+1 tokens; here the shared context is cut so
            # the longest continuation fits (identical unless an item is longer than the model's window)
            keep = max_length + 1 - max(len(c) for c in group.continuations)
            group.context = group.context[-keep:]
            groups.append(group)
    return groups


def _model_max_length(model: Any) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The transformer body and LM head of a causal LM (through a PEFT wrapper), so that only the scored positions
    pay for the vocabulary projection; None for architectures whose logits are more than ``head(hidden)``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.config, "final_logit_softcapping", None) or not hasattr(inner, "get_decoder"):
        return None
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    if decoder is inner or head is None:
        return None
    return decoder, head


def _packed_rows(groups: Sequence[_Group], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group as one right-padded row: its context, then every choice's tokens but the last (the last token is
    only ever a target). Returns input ids, position ids (each choice restarts after the context) and segment ids
    (0 context, k + 1 choice k, -1 padding)."""
    width = max(g.packed_length for g in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    segments = torch.full((len(groups), width), -1, dtype=torch.long)
    for r, g in enumerate(groups):
        n = len(g.context)
        ids[r, :n], positions[r, :n], segments[r, :n] = torch.tensor(g.context), torch.arange(n), 0
        at = n
        for k, cont in enumerate(g.continuations):
            m = len(cont) - 1
            ids[r, at : at + m] = torch.tensor(cont[:-1])
            positions[r, at : at + m] = torch.arange(n, n + m)
            segments[r, at : at + m] = k + 1
            at += m
    return ids, positions, segments


def _block_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [batch, 1, query, key] mask: causal, and a choice sees the context and itself, never another choice.
    Padding attends to itself only, so no softmax row is empty."""
    width = segments.shape[1]
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _score_targets(groups: Sequence[_Group]) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """For every continuation token: (row, position) whose output predicts it, its id, and its choice's flat index.
    A choice's first token is predicted by the context's last position, shared by all of the group's choices."""
    where: list[tuple[int, int]] = []
    targets: list[int] = []
    owner: list[int] = []
    flat = 0
    for r, g in enumerate(groups):
        at = len(g.context)
        for cont in g.continuations:
            where.append((r, len(g.context) - 1))
            where.extend((r, at + j) for j in range(len(cont) - 1))
            targets.extend(cont)
            owner.extend([flat] * len(cont))
            at += len(cont) - 1
            flat += 1
    return where, targets, owner


@torch.no_grad()
def _score_groups(model: Any, pad_id: int, groups: Sequence[_Group]) -> list[list[float]]:
    """Summed continuation log-probs with one forward pass per batch: each item's context and all of its choices
    packed in one row under a block attention mask, so the context is computed once and nothing is copied per choice;
    the vocabulary projection runs only at the positions that predict a continuation token."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    ids, positions, segments = _packed_rows(groups, pad_id)
    inputs = {
        "input_ids": ids.to(device),
        "position_ids": positions.to(device),
        "attention_mask": _block_mask(segments, dtype if dtype.is_floating_point else torch.float32).to(device),
        "use_cache": False,
    }
    where, targets, owner = _score_targets(groups)
    unique = sorted(set(where))
    index = {rp: u for u, rp in enumerate(unique)}
    rows = torch.tensor([r for r, _ in unique], device=device)
    cols = torch.tensor([p for _, p in unique], device=device)
    parts = _decoder_and_head(model)
    if parts is None:
        logits = model(**inputs).logits[rows, cols]
    else:
        decoder, head = parts
        logits = head(decoder(**inputs).last_hidden_state[rows, cols])
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_lp = logprobs[torch.tensor([index[w] for w in where], device=device), torch.tensor(targets, device=device)]
    sums = torch.zeros(sum(len(g.continuations) for g in groups), dtype=torch.float64, device=device)
    sums.index_add_(0, torch.tensor(owner, device=device), token_lp.double())
    values = sums.tolist()
    per_group: list[list[float]] = []
    j = 0
    for g in groups:
        per_group.append(values[j : j + len(g.continuations)])
        j += len(g.continuations)
    return per_group


def _pad_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def score_choice_requests(
    model: Any, tokenizer: Any, items: Sequence[Sequence[ChoiceRequest]], batch_size: int = 16
) -> list[list[float]]:
    """Summed log-likelihood of every choice of every item (lm-eval's ``loglikelihood`` values)."""
    groups = _groups(tokenizer, items, _model_max_length(model))
    scores: list[list[float]] = [[0.0] * len(reqs) for reqs in items]
    # batches of similar packed length, longest first (an out-of-memory error shows on the first batch)
    order = sorted(
        range(len(groups)),
        key=lambda g: -groups[g].packed_length,
    )
    for start in range(0, len(order), batch_size):
        batch = [groups[g] for g in order[start : start + batch_size]]
        for group, values in zip(batch, _score_groups(model, _pad_id(tokenizer), batch)):
            for k, value in zip(group.choices, values):
                scores[group.item][k] = value
    return scores


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))  # first index on ties, like numpy


def choose(logliks: Sequence[float], requests: Sequence[ChoiceRequest]) -> tuple[int, int]:
    """(acc choice, acc_norm choice) as lm-eval picks them."""
    return _argmax(logliks), _argmax([ll / r.norm_chars for ll, r in zip(logliks, requests)])


def evaluate_loglik(
    model: Any,
    tokenizer: Any,
    task_name: str,
    examples: Sequence[Example],
    out_jsonl: Path | str,
    prompt: LoglikPrompt = "study",
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Multiple-choice evaluation by summed log-likelihood; one JSONL record per item, resumable like
    `evaluate_generate`. Returns ``{task, n, correct, accuracy, acc, acc_norm}``."""
    task = get_task(task_name)
    items = select_items(examples, limit)
    out = Path(out_jsonl)
    done = {i: r for i, r in read_done(out).items() if i < len(items)}
    todo = [i for i in range(len(items)) if i not in done]
    with open_for_append(out) as fh, progress_bar(len(items), f"{task.name} loglik", progress) as bar:
        bar.update(len(done))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            built = [choice_requests(task.name, items[i], prompt, source=f"{task.name} item {i}") for i in chunk]
            logliks = score_choice_requests(model, tokenizer, [reqs for reqs, _ in built], batch_size)
            for i, (requests, gold), lls in zip(chunk, built, logliks):
                rec = _loglik_record(task, i, items[i], prompt, requests, gold, lls)
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                done[i] = rec
            fh.flush()
            bar.update(len(chunk))
    return summarize(task.name, [done[i] for i in range(len(items))])


def _loglik_record(
    task: Task, index: int, ex: Example, prompt: str, requests: Sequence[ChoiceRequest], gold: int, lls: Sequence[float]
) -> dict[str, Any]:
    pick, pick_norm = choose(lls, requests)
    labels = parse_choice_item(task.name, ex).labels
    return {
        "task": task.name,
        "index": index,
        "prompt": prompt,
        "contexts": sorted({r.context for r in requests}),
        "continuations": [r.continuation for r in requests],
        "logliks": list(lls),
        "pred": labels[pick],
        "pred_norm": labels[pick_norm],
        "gold": labels[gold],
        "answer": ex.answer,
        "correct": pick == gold,
        "correct_norm": pick_norm == gold,
    }


