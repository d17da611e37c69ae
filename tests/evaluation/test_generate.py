"""Generative evaluation: batching, stop strings, resume, backend selection."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytest
import torch

from kdscope.data import load_task
from kdscope.errors import InputError
from kdscope.evaluation import (
    GenerationSettings,
    HFGenerator,
    evaluate_generate,
    evaluate_generate_with,
    generate_responses,
    generation_preset,
    make_generator,
    read_done,
    vllm_available,
)
from kdscope.prompts import Example, build_prompt

from bos_tokenizer import bos_model
from eval_helpers import scaled_tiny_model


@pytest.fixture(scope="module")
def sharp_model() -> tuple[object, object]:
    """A built-in tiny model with weights scaled up, so greedy decoding is decisive and differs between prompts
    (at the default init scale every prompt decodes to the same whitespace)."""
    return scaled_tiny_model("tiny-qwen-m")


@pytest.fixture(scope="module")
def gsm8k_items(shared_data: Path) -> list:
    return load_task("gsm8k", shared_data / "dataset", limit=7)


def test_batched_greedy_equals_unbatched(sharp_model, gsm8k_items) -> None:
    model, tok = sharp_model
    prompts = [build_prompt(ex) for ex in gsm8k_items]
    settings = generation_preset("greedy", max_new_tokens=12, batch_size=4)
    batched = generate_responses(model, tok, prompts, settings, progress=False)
    single = generate_responses(model, tok, prompts, settings.model_copy(update={"batch_size": 1}), progress=False)
    assert batched == single
    assert len(set(batched)) > 1  # the outputs depend on the prompt: a meaningful comparison


def test_stop_string_cuts_the_response(sharp_model) -> None:
    model, tok = sharp_model
    prompt = "### Response:\n"
    free = generate_responses(model, tok, [prompt], generation_preset("greedy", max_new_tokens=10, stop_strings=[]), progress=False)[0]
    stop = free[2:6]
    cut = generate_responses(model, tok, [prompt], generation_preset("greedy", max_new_tokens=10, stop_strings=[stop]), progress=False)[0]
    assert cut == free[: free.index(stop)]


class CountingGenerator(HFGenerator):
    """The HF backend, counting the items it generates."""

    generated = 0

    def generate_batch(self, prompts, indices, settings):  # type: ignore[no-untyped-def]
        self.generated += len(indices)
        return super().generate_batch(prompts, indices, settings)


def test_resume_after_interruption_gives_the_same_records(sharp_model, gsm8k_items, tmp_path: Path) -> None:
    model, tok = sharp_model
    settings = generation_preset("study", max_new_tokens=8, batch_size=3)  # sampled: resume must reuse the seeds
    full = tmp_path / "full.jsonl"
    summary = evaluate_generate(model, tok, "gsm8k", gsm8k_items, settings, full, progress=False)
    assert summary["n"] == len(gsm8k_items) and set(summary) == {"task", "n", "correct", "accuracy", "accuracy_clean"}

    lines = full.read_text().splitlines()
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # two finished batches and a torn write
    generator = CountingGenerator(model, tok)
    again = evaluate_generate_with(generator, "gsm8k", gsm8k_items, settings, part, progress=False)
    assert again == summary
    assert read_done(part) == read_done(full)
    assert generator.generated < len(gsm8k_items)  # finished batches were not generated again
    rec = read_done(full)[0]
    assert set(rec) == {"task", "index", "prompt", "generation", "output", "pred", "gold", "answer", "correct",
                        "output_clean", "pred_clean", "correct_clean"}


def test_vllm_backend_is_selected_only_when_available() -> None:
    if vllm_available():
        pytest.skip("vLLM and a GPU are present: the fallback path is not reachable here")
    assert isinstance(make_generator("builtin:tiny-qwen-xs", backend="auto"), HFGenerator)
    with pytest.raises(InputError, match="vllm"):
        make_generator("builtin:tiny-qwen-xs", backend="vllm")


# --------------------------------------------------------------------------------------------------------------------
# The study's answer parse: the whole generation decoded, the text after the first "### Response:" up to a second one
# --------------------------------------------------------------------------------------------------------------------
def study_answer_text(prompt: str, generation: str) -> str:
    """Restated from the study's evaluate.py: ``decoded.split("### Response:")[1].strip()``, decoded = prompt + new."""
    return (prompt + generation).split("### Response:")[1].strip()


RUN_ON = " The answer is 4.\n\n### Instruction:\nNow add 2 and 5.\n\n### Response:\n2 + 5 = 7. The answer is 7."


class ScriptedGenerator:
    """A generation backend that writes a fixed run-on continuation (the model invents a next instruction), so the
    study's parse and the cleaned parse disagree on a known text."""

    name = "scripted"

    def prompt_lengths(self, prompts: Sequence[str]) -> list[int]:
        return [len(p) for p in prompts]

    def generate_batch(self, prompts: Sequence[str], indices: Sequence[int], settings: GenerationSettings) -> list[str]:
        return [RUN_ON for _ in prompts]


def test_study_preset_scores_a_run_on_generation_as_the_study_did(tmp_path: Path) -> None:
    items = [Example(instruction="Add 1 and 3.", answer="4")]
    out = tmp_path / "gsm8k.jsonl"
    summary = evaluate_generate_with(ScriptedGenerator(), "gsm8k", items, generation_preset("study"), out, progress=False)
    rec = read_done(out)[0]
    study_text = study_answer_text(build_prompt(items[0]), RUN_ON)
    assert "### Instruction" in study_text and not study_text.endswith("7.")  # kept the run-on, cut at the 2nd marker
    assert rec["generation"] == RUN_ON
    assert rec["output"] == study_text
    assert rec["pred"] == 5.0 and rec["correct"] is False  # the study's last number: the invented instruction's 5
    assert rec["output_clean"] == "The answer is 4." and rec["correct_clean"] is True
    assert summary["accuracy"] == 0.0 and summary["accuracy_clean"] == 1.0
    greedy = evaluate_generate_with(ScriptedGenerator(), "gsm8k", items, generation_preset("greedy"), tmp_path / "g.jsonl",
                                    progress=False)
    assert greedy["accuracy"] == greedy["accuracy_clean"] == 1.0  # the greedy preset scores the cleaned parse


@pytest.mark.parametrize("bos", [False, True])
def test_study_preset_keeps_the_whole_generation(sharp_model, gsm8k_items, tmp_path: Path, bos: bool) -> None:
    """No stop string: the stored generation is what the model's own sampling loop decodes, item by item, from the
    prompt as the tokenizer encodes it by default (``bos``: a tokenizer that adds BOS, as Llama-3's does)."""
    model, tok = sharp_model
    if bos:
        model, tok = bos_model("tiny-qwen-m")
        assert tok("a")["input_ids"][0] == tok.bos_token_id
    settings = generation_preset("study", max_new_tokens=12, batch_size=1)
    assert settings.stop_strings == []
    out = tmp_path / "gsm8k.jsonl"
    evaluate_generate(model, tok, "gsm8k", gsm8k_items[:3], settings, out, progress=False)
    for i, rec in read_done(out).items():
        ids = tok(build_prompt(gsm8k_items[i]), return_tensors="pt")["input_ids"]
        torch.manual_seed(settings.seed + i)
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_p=1.0, top_k=0, max_new_tokens=12, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert rec["generation"] == tok.decode(new, skip_special_tokens=True)
        assert rec["output"] == study_answer_text(rec["prompt"], rec["generation"])
