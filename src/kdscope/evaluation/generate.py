"""Generative evaluation: decoding presets, the HF and vLLM generation backends, and the resumable per-item loop.

Batches are planned over the whole item list (sorted by prompt length, longest first) *before* skipping finished
items, so a resumed run generates exactly the batches an uninterrupted run would have, with the same per-batch seeds.

Determinism on CPU (HF backend): for the same prompts, settings (including ``batch_size``) and library versions the
outputs are identical run to run, for greedy and sampled decoding, because every batch reseeds the RNG with
``seed + the smallest item index in the batch``. Greedy outputs do not depend on the batch size beyond
floating-point effects of padding (checked equal on the tiny models). Sampled outputs depend on which items share a
batch, so changing ``batch_size`` or ``limit`` changes them. The vLLM backend seeds every request with
``seed + item index``, which makes it independent of batching.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

import torch
from pydantic import BaseModel, Field

from ..errors import InputError
from ..models import load_model
from ..progress import progress_bar
from ..prompts import RESPONSE_MARKER, Example, build_prompt
from ..tasks import Task, get_task
from .records import json_prediction, open_for_append, read_done, select_items, summarize


# --------------------------------------------------------------------------------------------------------------------
# Generation settings
# --------------------------------------------------------------------------------------------------------------------
INSTRUCTION_STOP = "### Instruction"
AnswerParse = Literal["study", "clean"]


class GenerationSettings(BaseModel):
    """Decoding settings. ``top_k=0`` disables top-k; ``stop_strings`` end a response (the text is cut there);
    ``parse`` picks the text that is scored (`answer_text`): the study's split, or the cleaned cut."""

    preset: str = "greedy"
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1)
    seed: int = 6
    stop_strings: list[str] = Field(default_factory=lambda: [INSTRUCTION_STOP])
    parse: AnswerParse = "clean"


# `greedy` is the default for new studies (no sampling noise); `study` is the released evaluate.py's decoding
# (sampling at T=1.0, top_p 1, top_k 0, 256 new tokens, seed 6, no stop string: the whole sequence is decoded and
# parsed as the study parsed it), batched here instead of one item at a time.
PRESETS: dict[str, GenerationSettings] = {
    "greedy": GenerationSettings(preset="greedy"),
    "study": GenerationSettings(
        preset="study", do_sample=True, temperature=1.0, top_p=1.0, top_k=0, seed=6, stop_strings=[], parse="study"
    ),
}


def generation_preset(name: str = "greedy", **overrides: Any) -> GenerationSettings:
    """A named preset with optional field overrides, e.g. ``generation_preset("study", max_new_tokens=64)``."""
    if name not in PRESETS:
        raise InputError(f"unknown generation preset {name!r}; use one of {', '.join(PRESETS)}")
    # validated again: model_copy(update=...) would let a batch size of 0 through to the generation loop
    given = {k: v for k, v in overrides.items() if v is not None}
    return GenerationSettings.model_validate({**PRESETS[name].model_dump(), **given})


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first stop string."""
    cut = len(text)
    for stop in stop_strings:
        pos = text.find(stop)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


def study_answer_text(prompt: str, generation: str) -> str:
    """The study's answer text: ``decoded.split("### Response:")[1].strip()`` with decoded = prompt + generation, i.e.
    the text after the prompt's response marker up to a second marker, a run-on ``### Instruction: ...`` included.
    (The study decodes special tokens too; they hold no digit, capital A-E or answer word, so scores are the same.)"""
    parts = (prompt + generation).split(RESPONSE_MARKER)
    return (parts[1] if len(parts) > 1 else parts[0]).strip()


def clean_answer_text(generation: str) -> str:
    """The generation cut before the first invented ``### Instruction`` or ``### Response:`` section."""
    return cut_at_stop(generation, [INSTRUCTION_STOP, RESPONSE_MARKER]).strip()


def answer_text(prompt: str, generation: str, parse: AnswerParse) -> str:
    """The text a generation is scored on under ``parse``."""
    return study_answer_text(prompt, generation) if parse == "study" else clean_answer_text(generation)


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
        from vllm import LLM  # optional extra, imported only for the vllm backend
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
        from vllm import SamplingParams  # optional extra (see __init__)

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


GenerationBackend = Literal["auto", "hf", "vllm"]


def make_generator(
    model_ref: str, adapter: str | Path | None = None, backend: GenerationBackend = "auto", dtype: str = "auto", device: str = "auto"
) -> Generator:
    """The generation backend for a model reference: vLLM when asked for (or ``auto`` and available), else HF."""
    use_vllm = backend == "vllm" or (backend == "auto" and vllm_available() and not model_ref.startswith("builtin:"))
    if use_vllm:
        if not vllm_available():
            raise InputError("backend vllm: needs `pip install kdscope[vllm]` and a CUDA GPU; use --backend hf")
        return VLLMGenerator(model_ref, adapter, dtype=dtype)
    model, tokenizer = load_model(model_ref, adapter=adapter, dtype=dtype, device=device)
    model.eval()
    return HFGenerator(model, tokenizer)


def run_generation(
    generator: Generator, prompts: Sequence[str], settings: GenerationSettings, progress: bool = True
) -> list[str]:
    """Generate a response for every prompt with any backend; results come back in the prompts' order."""
    results: list[str] = [""] * len(prompts)
    with progress_bar(len(prompts), "generate", progress) as bar:
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
    items = select_items(examples, limit)
    prompts = [build_prompt(ex, prompt_style) for ex in items]
    out = Path(out_jsonl)
    done = {i: r for i, r in read_done(out).items() if i < len(items)}
    with open_for_append(out) as fh, progress_bar(len(items), task.name, progress) as bar:
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
                rec = _generation_record(task, i, items[i], prompts[i], text, settings.parse)
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                done[i] = rec
            fh.flush()
            bar.update(len(todo))
    return summarize(task.name, [done[i] for i in range(len(items))])


def _generation_record(task: Task, index: int, ex: Example, prompt: str, generation: str, parse: AnswerParse) -> dict[str, Any]:
    """The full generation, the text scored under ``parse`` (``output``, ``pred``, ``correct``) and the cleaned parse
    (``output_clean``, ``pred_clean``, ``correct_clean``), so both readings of a run-on generation are kept."""
    gold = task.gold(ex.answer)
    output, clean = answer_text(prompt, generation, parse), clean_answer_text(generation)
    pred, pred_clean = task.parse(output), task.parse(clean)
    return {
        "task": task.name,
        "index": index,
        "prompt": prompt,
        "generation": generation,
        "output": output,
        "pred": json_prediction(pred),
        "gold": gold,
        "answer": ex.answer,
        "correct": bool(task.is_correct(pred, gold)),
        "output_clean": clean,
        "pred_clean": json_prediction(pred_clean),
        "correct_clean": bool(task.is_correct(pred_clean, gold)),
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
    """Generate, parse and score every item; one JSONL record per item (task, index, prompt, generation, output, pred,
    gold, answer, correct, and the cleaned parse's output_clean, pred_clean, correct_clean), appended and flushed per
    batch. Items already in ``out_jsonl`` are skipped (resume). Returns ``{task, n, correct, accuracy,
    accuracy_clean}``."""
    return evaluate_generate_with(
        HFGenerator(model, tokenizer), task_name, examples, settings, out_jsonl, prompt_style, limit, progress
    )


