"""Likelihood scoring: packed scores equal direct ones, acc_norm, records and resume, lm-eval parity on SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kdscope.data import load_task
from kdscope.evaluation import ChoiceRequest, choice_requests, choose, evaluate_loglik, read_done, score_choice_requests

from conftest import require
from eval_helpers import direct_loglik, olmo_folder, scaled_tiny_model, smollm2


@pytest.fixture(scope="module")
def sharp_model() -> tuple[object, object]:
    """A built-in tiny model with weights scaled up, so greedy decoding is decisive and differs between prompts
    (at the default init scale every prompt decodes to the same whitespace)."""
    return scaled_tiny_model("tiny-qwen-m")


@pytest.mark.parametrize("prompt", ["study", "lm_eval"])
def test_loglik_equals_direct_computation(sharp_model, shared_data: Path, prompt: str) -> None:
    model, tok = sharp_model
    items = []
    for task in ("arc_easy", "winogrande", "boolq", "aqua"):
        items += [choice_requests(task, ex, prompt)[0] for ex in load_task(task, shared_data / "dataset", limit=3)]
    scores = score_choice_requests(model, tok, items, batch_size=5)
    for requests, values in zip(items, scores):
        assert values == pytest.approx([direct_loglik(model, tok, r) for r in requests], abs=1e-4)


@pytest.mark.parametrize("variant", ["llama", "qwen-eager", "qwen-lora", "qwen-no-head-split"])
def test_packed_scoring_equals_direct_computation(shared_data: Path, variant: str) -> None:
    """The packed pass (context + all choices in one row under a block mask, LM head only where scored) against one
    plain forward per choice: on another architecture, eager attention, through a PEFT LoRA wrapper with non-zero
    adapters, and on the full-logits fallback taken for models whose logits are more than ``head(hidden)``."""
    from kdscope.evaluation.loglik import _decoder_and_head
    from kdscope.models import attach_lora

    name = "tiny-llama-s" if variant == "llama" else "tiny-qwen-m"
    model, tok = scaled_tiny_model(name, "eager" if variant == "qwen-eager" else "sdpa")
    if variant == "qwen-lora":
        model = attach_lora(model).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    if variant == "qwen-no-head-split":
        model.config.final_logit_softcapping = 30.0  # Qwen2 ignores it; kdscope must take the full-logits path
        assert _decoder_and_head(model) is None
    else:
        assert _decoder_and_head(model) is not None
    items = [choice_requests(t, ex, "lm_eval")[0] for t in ("arc_easy", "piqa", "winogrande")
             for ex in load_task(t, shared_data / "dataset", limit=3)]
    scores = score_choice_requests(model, tok, items, batch_size=4)
    for requests, values in zip(items, scores):
        assert values == pytest.approx([direct_loglik(model, tok, r) for r in requests], abs=1e-4)


def test_acc_norm_divides_by_choice_characters() -> None:
    requests = [ChoiceRequest("c", " ab", 2), ChoiceRequest("c", " abcdef", 6)]
    assert choose([-3.0, -4.0], requests) == (0, 1)
    assert choose([-2.0, -2.0], requests)[0] == 0  # ties go to the first choice, like numpy's argmax


def test_evaluate_loglik_records_and_resume(sharp_model, shared_data: Path, tmp_path: Path) -> None:
    model, tok = sharp_model
    items = load_task("arc_easy", shared_data / "dataset", limit=6)
    out = tmp_path / "arc.jsonl"
    summary = evaluate_loglik(model, tok, "arc_easy", items, out, prompt="lm_eval", limit=4, batch_size=3, progress=False)
    assert summary["n"] == 4 and 0.0 <= summary["acc_norm"] <= 1.0
    again = evaluate_loglik(model, tok, "arc_easy", items, out, prompt="lm_eval", batch_size=3, progress=False)
    assert again["n"] == 6 and len(out.read_text().splitlines()) == 6
    rec = read_done(out)[5]
    requests, gold = choice_requests("arc_easy", items[5], "lm_eval")
    assert rec["logliks"] == pytest.approx([direct_loglik(model, tok, r) for r in requests], abs=1e-4)
    assert rec["correct"] == (choose(rec["logliks"], requests)[0] == gold)


@pytest.mark.slow
def test_lm_eval_parity_on_arc_easy() -> None:
    require(importlib.util.find_spec("lm_eval") is not None, "lm-eval is not installed (requirements-test.txt)")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = smollm2()
    items = load_task("arc_easy", str(olmo_folder("ai2_arc", "ARC-Easy", "validation")), split="validation", limit=100)
    built = [choice_requests("arc_easy", ex, "lm_eval") for ex in items]
    ours = score_choice_requests(model, tok, [reqs for reqs, _ in built], batch_size=16)

    harness = HFLM(pretrained=model, tokenizer=tok, batch_size=16)
    instances = [Instance("loglikelihood", {}, (r.context, r.continuation), k) for reqs, _ in built for k, r in enumerate(reqs)]
    theirs = [ll for ll, _ in harness.loglikelihood(instances, disable_tqdm=True)]
    start = 0
    for (requests, _), values in zip(built, ours):
        reference = theirs[start : start + len(requests)]
        start += len(requests)
        assert choose(values, requests) == choose(reference, requests)  # acc and acc_norm choices
        assert values == pytest.approx(reference, abs=1e-3)

