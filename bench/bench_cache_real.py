"""KD step with the teacher cache vs the online teacher on the real Qwen2.5-Coder 1.5B -> 0.5B pair, on the CPU.

Needs the models assembled by `scripts/assemble_qwen_coder.py --dequantize --study-data` (in .cache/qwen-coder/).
Each variant runs in a fresh subprocess, so its process peak memory (ru_maxrss) is its own. The student trains LoRA
adapters (the study's settings), top-k forward KL with the tail bucket at T=2, on the study's math training data.

    .venv/bin/python bench/bench_cache_real.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(".cache/qwen-coder")


def _settings(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from kdscope.train import TrainSettings

    return TrainSettings(objective="kd", teacher_topk=args.k, temperature=2.0, max_length=args.max_length,
                         micro_batch_size=args.batch, grad_accum=1, prompt_style="study", lr=1e-4)


def _examples(args: argparse.Namespace) -> list:  # type: ignore[type-arg]
    from kdscope.data import load_training_data

    return load_training_data(ROOT / "math_train.json")[: args.batch * (args.steps + 1)]


def build_cache(args: argparse.Namespace) -> dict[str, float]:
    from kdscope.cache import TeacherCache, cache_key, encode_sequences
    from kdscope.models import load_model

    teacher, tok = load_model(str(ROOT / "qwen2.5-coder-1.5b-instruct-fp32"), device="cpu")
    sequences = encode_sequences(tok, _examples(args), "study", args.max_length)
    key = cache_key(str(ROOT / "qwen2.5-coder-1.5b-instruct-fp32"), None, tok, sequences, "study", args.k,
                    args.max_length)
    start = time.perf_counter()
    cache = TeacherCache.build(args.cache_root, key, teacher, sequences, tok.pad_token_id, (1.0, 2.0),
                               batch_size=args.batch)
    return {"build_s": time.perf_counter() - start, "bytes_per_token": cache.bytes_per_token(),
            "sequences": len(sequences)}


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from kdscope.cache import CachedTeacher, TeacherCache
    from kdscope.models import load_model
    from kdscope.teacher import OnlineTeacher
    from kdscope.prompts import encode_example
    from kdscope.train import batch_loss, collate, prepare_student, window_units

    torch.manual_seed(0)
    settings = _settings(args)
    student, tok = load_model(str(ROOT / "qwen2.5-coder-0.5b-instruct-fp32"), device="cpu")
    student = prepare_student(student, settings)
    if args.variant == "online":
        teacher, _ = load_model(str(ROOT / "qwen2.5-coder-1.5b-instruct-fp32"), device="cpu")
        signal = OnlineTeacher(teacher, topk=args.k, temperature=2.0)
    else:
        signal = CachedTeacher(TeacherCache.open(args.cache_root), temperature=2.0)
    encoded = [encode_example(tok, ex, "study", args.max_length) for ex in _examples(args)]
    batches = [collate(encoded[i:i + args.batch], tok.pad_token_id, "all") for i in range(0, len(encoded), args.batch)]
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    losses, tokens, seconds = [], 0, 0.0
    for step, batch in enumerate(batches[: args.steps + 1]):
        start = time.perf_counter()
        parts = batch_loss(student, batch, settings, signal, window_units([batch], settings))
        parts.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:  # the first step warms up allocators and kernels
            seconds += time.perf_counter() - start
            tokens += int(batch.attention_mask.sum())
        losses.append(parts.kd)
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / args.steps, "first_loss": losses[0],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--cache-root", type=Path, default=Path("/tmp/kdscope-bench-real-cache"))
    parser.add_argument("--variant", choices=("build", "online", "cache"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant == "build":
        print(json.dumps(build_cache(args)))
        return
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    common = [sys.executable, __file__, "--k", str(args.k), "--batch", str(args.batch), "--max-length",
              str(args.max_length), "--steps", str(args.steps), "--cache-root", str(args.cache_root)]
    results = {}
    for variant in ("build", "online", "cache"):
        out = subprocess.run([*common, "--variant", variant], check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    online, cached = results["online"], results["cache"]
    results["ratios"] = {"tokens_per_s": cached["tokens_per_s"] / online["tokens_per_s"],
                         "peak_rss": cached["peak_rss_mib"] / online["peak_rss_mib"]}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
