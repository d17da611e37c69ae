"""Evaluation: scoring saved generations, batched generative evaluation, and lm-eval-compatible likelihood scoring.

Generative evaluation (`evaluate_generate`) writes one JSONL record per item and resumes from that file. Batches
are planned over the whole item list (sorted by prompt length, longest first) *before* skipping finished items, so a
resumed run generates exactly the batches an uninterrupted run would have, with the same per-batch seeds.

Determinism on CPU (HF backend): for the same prompts, settings (including ``batch_size``) and library versions the
outputs are identical run to run, for greedy and sampled decoding, because every batch reseeds the RNG with
``seed + the smallest item index in the batch``. Greedy outputs do not depend on the batch size beyond
floating-point effects of padding (checked equal on the tiny models). Sampled outputs depend on which items share a
batch, so changing ``batch_size`` or ``limit`` changes them. The vLLM backend seeds every request with
``seed + item index``, which makes it independent of batching.

Likelihood evaluation (`evaluate_loglik`) follows lm-evaluation-harness's HF backend: the same tokenisation of
(context, continuation) pairs, summed continuation log-probabilities, ``acc`` = argmax, ``acc_norm`` = argmax of the
sum divided by the choice's length in characters. An item's context and all of its choices are packed into one
sequence under a block attention mask, so the context is computed once, and the vocabulary projection runs only at
the positions that predict a choice's tokens.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

import torch
from pydantic import BaseModel, Field

from .data import Example, build_prompt, read_records
from .errors import InputError, where
from .tasks import Task, get_task


def score_records(task_name: str, path: Path | str, field: str = "output") -> dict[str, Any]:
    """Re-score saved generations: each record carries ``answer`` and the generated text in ``field``."""
    task = get_task(task_name)
    records = read_records(path)
    correct = 0
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise InputError(f"{where(path, i)}: expected an object, got {type(rec).__name__}")
        for key in ("answer", field):
            if key not in rec or rec[key] is None:
                raise InputError(f"{where(path, i, key)}: missing; use --field to name the text field")
        try:
            correct += task.score(str(rec[field]), str(rec["answer"]))
        except ValueError as e:
            raise InputError(f"{where(path, i, 'answer')}: {e} for task {task.name}") from None
    n = len(records)
    return {"task": task.name, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0}


# --------------------------------------------------------------------------------------------------------------------
# Generation settings
# --------------------------------------------------------------------------------------------------------------------
INSTRUCTION_STOP = "### Instruction"


class GenerationSettings(BaseModel):
    """Decoding settings. ``top_k=0`` disables top-k; ``stop_strings`` end a response (the text is cut there)."""

    preset: str = "greedy"
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1)
    seed: int = 6
    stop_strings: list[str] = Field(default_factory=lambda: [INSTRUCTION_STOP])


# `greedy` is the default for new studies (no sampling noise); `study` is the released evaluate.py's decoding
# (sampling at T=1.0, top_p 1, top_k 0, 256 new tokens, seed 6), batched here instead of one item at a time.
PRESETS: dict[str, GenerationSettings] = {
    "greedy": GenerationSettings(preset="greedy"),
    "study": GenerationSettings(preset="study", do_sample=True, temperature=1.0, top_p=1.0, top_k=0, seed=6),
}


def generation_preset(name: str = "greedy", **overrides: Any) -> GenerationSettings:
    """A named preset with optional field overrides, e.g. ``generation_preset("study", max_new_tokens=64)``."""
    if name not in PRESETS:
        raise InputError(f"unknown generation preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name].model_copy(update={k: v for k, v in overrides.items() if v is not None})


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first stop string."""
    cut = len(text)
    for stop in stop_strings:
        pos = text.find(stop)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Item indices grouped into batches of similar length, longest first (padding is minimal, memory peaks early)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------------------------------------------------
# Generation backends
# --------------------------------------------------------------------------------------------------------------------
class Generator(Protocol):
    """A generation backend: turns a batch of prompts into responses (without the prompt, cut at stop strings)."""

    name: str

    def prompt_lengths(self, prompts: Sequence[str]) -> list[int]: ...

    def generate_batch(self, prompts: Sequence[str], indices: Sequence[int], settings: GenerationSettings) -> list[str]: ...


class HFGenerator:
    """transformers ``generate`` with left padding and the KV cache."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer

    def prompt_lengths(self, prompts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]

    def _generation_kwargs(self, settings: GenerationSettings) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "use_cache": True,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        else:  # unset the checkpoint's sampling defaults so transformers does not warn about unused flags
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if settings.stop_strings:
            kwargs.update(stop_strings=list(settings.stop_strings), tokenizer=self.tokenizer)
        return kwargs

    @torch.no_grad()
    def generate_batch(self, prompts: Sequence[str], indices: Sequence[int], settings: GenerationSettings) -> list[str]:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(list(prompts), return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
        device = next(self.model.parameters()).device
        torch.manual_seed(settings.seed + min(indices))
        out = self.model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            **self._generation_kwargs(settings),
        )
        new_tokens = out[:, enc["input_ids"].shape[1] :]
        texts = tok.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at_stop(t, settings.stop_strings) for t in texts]


class VLLMGenerator:
    """vLLM offline generation (optional extra ``vllm``); LoRA adapters are applied per request."""

    name = "vllm"

    def __init__(self, model_ref: str, adapter: str | Path | None = None, dtype: str = "auto", seed: int = 6) -> None:
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.lora: Any = None
        kwargs: dict[str, Any] = {"model": model_ref, "dtype": dtype, "seed": seed}
        if adapter is not None:
            config_path = Path(adapter) / "adapter_config.json"
            if not config_path.is_file():
                raise InputError(f"adapter {adapter}: no adapter_config.json; give a folder written by peft")
            rank = int(json.loads(config_path.read_text(encoding="utf-8")).get("r", 8))
            # vLLM accepts only its LoRA kernel sizes (8, 16, 32, 64, ...): round the adapter's rank up to one
            kwargs.update(enable_lora=True, max_lora_rank=max(8, 1 << (rank - 1).bit_length()))
            self.lora = LoRARequest("adapter", 1, str(Path(adapter).resolve()))
        self.llm = LLM(**kwargs)

    def prompt_lengths(self, prompts: Sequence[str]) -> list[int]:
        return [len(p) for p in prompts]  # vLLM schedules its own batches; the order only affects resume planning

    def generate_batch(self, prompts: Sequence[str], indices: Sequence[int], settings: GenerationSettings) -> list[str]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=1,
                temperature=settings.temperature if settings.do_sample else 0.0,
                top_p=settings.top_p if settings.do_sample else 1.0,
                top_k=settings.top_k if settings.do_sample and settings.top_k > 0 else -1,
                max_tokens=settings.max_new_tokens,
                seed=settings.seed + i,
                stop=list(settings.stop_strings) or None,
            )
            for i in indices
        ]
        outputs = self.llm.generate(list(prompts), params, lora_request=self.lora, use_tqdm=False)
        return [cut_at_stop(o.outputs[0].text, settings.stop_strings) for o in outputs]


def vllm_available() -> bool:
    """vLLM is used only when it is installed and a CUDA GPU is present."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


Backend = Literal["auto", "hf", "vllm"]


def make_generator(
    model_ref: str, adapter: str | Path | None = None, backend: Backend = "auto", dtype: str = "auto", device: str = "auto"
) -> Generator:
    """The generation backend for a model reference: vLLM when asked for (or ``auto`` and available), else HF."""
    use_vllm = backend == "vllm" or (backend == "auto" and vllm_available() and not model_ref.startswith("builtin:"))
    if use_vllm:
        if not vllm_available():
            raise InputError("backend vllm: needs `pip install kdscope[vllm]` and a CUDA GPU; use --backend hf")
        return VLLMGenerator(model_ref, adapter, dtype=dtype)
    from .models import load_model

    model, tokenizer = load_model(model_ref, adapter=adapter, dtype=dtype, device=device)
    model.eval()
    return HFGenerator(model, tokenizer)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, dynamic_ncols=True)


def run_generation(
    generator: Generator, prompts: Sequence[str], settings: GenerationSettings, progress: bool = True
) -> list[str]:
    """Generate a response for every prompt with any backend; results come back in the prompts' order."""
    results: list[str] = [""] * len(prompts)
    with _progress(len(prompts), "generate", progress) as bar:
        for batch in plan_batches(generator.prompt_lengths(prompts), settings.batch_size):
            for i, text in zip(batch, generator.generate_batch([prompts[i] for i in batch], batch, settings)):
                results[i] = text
            bar.update(len(batch))
    return results


def generate_responses(
    model: Any, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings, progress: bool = True
) -> list[str]:
    """Batched HF generation (left padding, KV cache, length-sorted batches, order restored)."""
    return run_generation(HFGenerator(model, tokenizer), prompts, settings, progress)


# --------------------------------------------------------------------------------------------------------------------
# Per-item JSONL records (resumable)
# --------------------------------------------------------------------------------------------------------------------
def read_done(out_jsonl: Path | str) -> dict[int, dict[str, Any]]:
    """Records already written, by item index. A torn last line (an interrupted write) is ignored."""
    path = Path(out_jsonl)
    if not path.is_file():
        return {}
    done: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("index"), int):
            done[rec["index"]] = rec
    return done


def _open_for_append(path: Path) -> Any:
    """Append mode; a torn last line from an interrupted run is terminated so new records start on their own line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    fh = path.open("a", encoding="utf-8")
    if torn:
        fh.write("\n")
    return fh


def _json_prediction(pred: float | str) -> float | str | None:
    """Parsed answers for JSON: a missing answer (``inf`` / ``""``) is stored as null."""
    if isinstance(pred, float) and math.isinf(pred):
        return None
    if isinstance(pred, str):
        return pred or None
    return pred


def _select(examples: Sequence[Example], limit: int | None) -> list[Example]:
    return list(examples[:limit] if limit else examples)


def evaluate_generate_with(
    generator: Generator,
    task_name: str,
    examples: Sequence[Example],
    settings: GenerationSettings,
    out_jsonl: Path | str,
    prompt_style: str = "study",
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generative evaluation with any backend; see `evaluate_generate`."""
    task = get_task(task_name)
    items = _select(examples, limit)
    prompts = [build_prompt(ex, prompt_style) for ex in items]
    out = Path(out_jsonl)
    done = {i: r for i, r in read_done(out).items() if i < len(items)}
    with _open_for_append(out) as fh, _progress(len(items), task.name, progress) as bar:
        bar.update(len(done))
        for batch in plan_batches(generator.prompt_lengths(prompts), settings.batch_size):
            todo = [i for i in batch if i not in done]
            if not todo:
                continue
            # the whole batch is generated even when part of it is done, so seeds and padding match a fresh run
            texts = generator.generate_batch([prompts[i] for i in batch], batch, settings)
            for i, text in zip(batch, texts):
                if i in done:
                    continue
                rec = _generation_record(task, i, items[i], prompts[i], text.strip())
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                done[i] = rec
            fh.flush()
            bar.update(len(todo))
    return summarize(task.name, [done[i] for i in range(len(items))])


def _generation_record(task: Task, index: int, ex: Example, prompt: str, output: str) -> dict[str, Any]:
    pred = task.parse(output)
    gold = task.gold(ex.answer)
    return {
        "task": task.name,
        "index": index,
        "prompt": prompt,
        "output": output,
        "pred": _json_prediction(pred),
        "gold": gold,
        "answer": ex.answer,
        "correct": bool(task.is_correct(pred, gold)),
    }


def evaluate_generate(
    model: Any,
    tokenizer: Any,
    task_name: str,
    examples: Sequence[Example],
    settings: GenerationSettings,
    out_jsonl: Path | str,
    prompt_style: str = "study",
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate, parse and score every item; one JSONL record per item (task, index, prompt, output, pred, gold,
    answer, correct), appended and flushed per batch. Items already in ``out_jsonl`` are skipped (resume).
    Returns ``{task, n, correct, accuracy}``."""
    return evaluate_generate_with(
        HFGenerator(model, tokenizer), task_name, examples, settings, out_jsonl, prompt_style, limit, progress
    )


def summarize(task_name: str, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{task, n, correct, accuracy}`` (and ``acc_norm`` for likelihood records)."""
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    summary: dict[str, Any] = {"task": task_name, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0}
    if records and "correct_norm" in records[0]:
        summary["acc"] = summary["accuracy"]
        summary["acc_norm"] = sum(bool(r["correct_norm"]) for r in records) / n
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Multiple-choice items from the study's instruction text
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice item: the question, each choice's text, the study's answer word for each, the gold index."""

    question: str
    choices: tuple[str, ...]
    labels: tuple[str, ...]
    gold: int


LOGLIK_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "aqua")
_LEAD_RE = re.compile(r"^Please [^:]*: ")
_FORMAT_MARK = "Answer format:"
_STEMS = {"piqa": "Solution", "hellaswag": "Ending", "winogrande": "Option"}


def _strip_lead(text: str) -> str:
    return _LEAD_RE.sub("", text, count=1).strip()


def _split_marked(body: str, markers: Sequence[str], source: str) -> tuple[str, list[str]]:
    """Split ``body`` at the given markers, searched from the end so a marker-like phrase in the question is harmless."""
    positions: list[int] = []
    end = len(body)
    for marker in reversed(markers):
        pos = body.rfind(marker, 0, end)
        if pos == -1:
            raise InputError(f"{source}: cannot find choice marker {marker.strip()!r} in the instruction")
        positions.insert(0, pos)
        end = pos
    bounds = positions + [len(body)]
    choices = [body[bounds[k] + len(markers[k]) : bounds[k + 1]].strip() for k in range(len(markers))]
    return body[: positions[0]], choices


def parse_choice_item(task_name: str, ex: Example, source: str = "item") -> ChoiceItem:
    """Recover (question, choice texts, gold) from a study-format multiple-choice instruction."""
    task = get_task(task_name)
    text = ex.instruction
    if task.name == "aqua":
        head, _, tail = text.rpartition("Answer Choices:")
        if not head:
            raise InputError(f"{source}: no 'Answer Choices:' in the AQuA instruction")
        letters = task.choices
        _, choices = _split_marked(" " + tail, [f" ({letter}) " for letter in letters], source)
        return ChoiceItem(head.strip(), tuple(choices), letters, letters.index(task.gold(ex.answer)))
    if task.name == "boolq":
        question = text.split("question:", 1)[-1].split(_FORMAT_MARK, 1)[0].strip()
        return ChoiceItem(question, ("true", "false"), task.labels, task.labels.index(task.gold(ex.answer)))
    if task.name not in LOGLIK_TASKS:
        raise InputError(f"task {task.name} has no multiple-choice form; likelihood tasks: {', '.join(LOGLIK_TASKS)}")
    body, _, fmt = text.rpartition(_FORMAT_MARK)
    labels = tuple(fmt.strip().split("/"))
    if not body or len(labels) < 2 or any(label not in task.labels for label in labels):
        raise InputError(f"{source}: instruction lacks a valid 'Answer format: ...' line for {task.name}")
    stem = _STEMS.get(task.name, "Answer")
    head, choices = _split_marked(body, [f"{stem}{k}: " for k in range(1, len(labels) + 1)], source)
    gold = task.gold(ex.answer)
    if gold not in labels:
        raise InputError(f"{source}: gold {gold!r} is not among the item's {len(labels)} choices")
    return ChoiceItem(_strip_lead(head), tuple(choices), labels, labels.index(gold))


# --------------------------------------------------------------------------------------------------------------------
# Likelihood requests: (context, continuation) pairs per choice, in the study's prompt or lm-eval's per-task prompt
# --------------------------------------------------------------------------------------------------------------------
LoglikPrompt = Literal["study", "lm_eval"]


@dataclass(frozen=True)
class ChoiceRequest:
    """One choice to score: log P(continuation | context); ``norm_chars`` is lm-eval's acc_norm length."""

    context: str
    continuation: str
    norm_chars: int


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's hellaswag preprocessing (WikiHow bracket artifacts removed)
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _lm_eval_requests(task_name: str, item: ChoiceItem) -> list[ChoiceRequest]:
    """lm-evaluation-harness's prompts for each task (target delimiter " ", acc_norm over the choice string).

    Deviations forced by the study's data: BoolQ items carry no passage (the study dropped it), so the context is
    lm-eval's template without it; HellaSwag's context is the study's ``activity: ctx`` (lm-eval capitalises
    ``ctx_b``, which the study format no longer separates); AQuA has no HF-backend multiple-choice task in lm-eval
    and uses the ARC template.
    """
    q, choices = item.question, item.choices
    if task_name == "winogrande":  # partial evaluation: the option fills the blank, the rest of the sentence is scored
        blank = q.index("_")
        target = " " + q[blank + 1 :].strip()
        return [ChoiceRequest(q[:blank] + opt, target, len(q[:blank] + opt)) for opt in choices]
    if task_name == "boolq":
        context = f"Question: {q if q.endswith('?') else q + '?'}\nAnswer:"
        words = ["yes" if c == "true" else "no" for c in choices]
        return [ChoiceRequest(context, " " + w, len(w)) for w in words]
    if task_name == "hellaswag":
        context = _hellaswag_preprocess(q)
        choices = tuple(_hellaswag_preprocess(c) for c in choices)
    elif task_name == "siqa":
        context = f"Q: {q}\nA:"
    elif task_name == "openbookqa":
        context = q
    else:  # arc_easy, arc_challenge, piqa, aqua
        context = f"Question: {q}\nAnswer:"
    return [ChoiceRequest(context, " " + c, len(c)) for c in choices]


def _study_requests(task_name: str, ex: Example, item: ChoiceItem) -> list[ChoiceRequest]:
    """The study's prompt followed by the start of its gold response; each choice is the study's answer word.

    Commonsense gold responses read ``the correct answer is answer2``, so the context ends with ``the correct answer
    is`` and the continuation is `` answer2``; AQuA scores `` (D)`` after ``The answer is``. The shared words sit in
    the context: they add the same log-probability to every choice, and keeping them out of the continuation keeps
    acc_norm a comparison of the answer words alone.
    """
    prompt = build_prompt(ex, "study")
    if task_name == "aqua":
        return [ChoiceRequest(prompt + "The answer is", f" ({label})", len(f"({label})")) for label in item.labels]
    return [ChoiceRequest(prompt + "the correct answer is", " " + label, len(label)) for label in item.labels]


def choice_requests(task_name: str, ex: Example, prompt: LoglikPrompt = "study", source: str = "item") -> tuple[list[ChoiceRequest], int]:
    """The item's per-choice requests and the gold choice index."""
    task = get_task(task_name)
    item = parse_choice_item(task.name, ex, source)
    if prompt == "study":
        return _study_requests(task.name, ex, item), item.gold
    if prompt == "lm_eval":
        return _lm_eval_requests(task.name, item), item.gold
    raise InputError(f"unknown likelihood prompt {prompt!r}; use study or lm_eval")


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
    items = _select(examples, limit)
    out = Path(out_jsonl)
    done = {i: r for i, r in read_done(out).items() if i < len(items)}
    todo = [i for i in range(len(items)) if i not in done]
    with _open_for_append(out) as fh, _progress(len(items), f"{task.name} loglik", progress) as bar:
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


# --------------------------------------------------------------------------------------------------------------------
# Summary row in the study's result-table layout
# --------------------------------------------------------------------------------------------------------------------
def summary_row(summaries: Sequence[dict[str, Any]], student: str, teacher: str = "-", method: str = "SFT") -> dict[str, Any]:
    """One row like the study's ``*_results_main.csv``: Teacher, Student, Method, one column per task (the study's
    column name), Average; accuracies in percent, two decimals."""
    row: dict[str, Any] = {"Teacher": teacher, "Student": student, "Method": method}
    values = []
    for s in summaries:
        value = round(100.0 * s["accuracy"], 2)
        row[get_task(s["task"]).study_folder] = value
        values.append(100.0 * s["accuracy"])
    row["Average"] = round(sum(values) / len(values), 2) if values else 0.0
    return row


def write_summary_csv(path: Path | str, row: dict[str, Any]) -> Path:
    """Append ``row`` to a summary CSV (header written when the file is new; a different header is an error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(row)
    if path.is_file() and path.stat().st_size > 0:
        with path.open(encoding="utf-8", newline="") as fh:
            header = next(csv.reader(fh), [])
        if header != columns:
            raise InputError(f"{path}: existing columns {header} differ from {columns}; use another --out folder")
        mode = "a"
    else:
        mode = "w"
    with path.open(mode, encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        if mode == "w":
            writer.writeheader()
        writer.writerow(row)
    return path

