"""KD steps on the real Qwen2.5-Coder 1.5B -> 0.5B pair on the CPU: teacher signals (the online teacher, dense or
top-k, and the teacher cache) x loss paths (kdscope.fused, the default, and the full-logits path).

Needs the models assembled by `scripts/assemble_qwen_coder.py --dequantize --study-data` (in .cache/qwen-coder/).
Each variant runs in a fresh subprocess, so its process peak memory (ru_maxrss) is its own; a sampling thread also
records the resident set during the timed steps above what it was after the warm-up step (models paged in, AdamW's
state made): the step's own memory. The student trains LoRA adapters (the study's settings) with forward KL at
T=2 on the study's math training data; top-k signals keep k logits and the tail bucket. With ``--repeats R`` every
variant runs R times, alternating (variant order within each round), and the table gives medians.

    .venv/bin/python bench/bench_cache_real.py                                   # issue 7's cache vs online table
    .venv/bin/python bench/bench_cache_real.py --signals dense cache --paths fused plain --batch 4 \
        --max-length 256 --steps 2 --repeats 2                                    # issue 15's fused vs plain table
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(".cache/qwen-coder")
SIGNALS = ("online", "dense", "cache")  # online: OnlineTeacher(topk=k); dense: the study's whole-vocabulary teacher
PATHS = ("fused", "plain")


def _settings(args: argparse.Namespace, signal: str, path: str):  # type: ignore[no-untyped-def]
    from kdscope.train import TrainSettings

    return TrainSettings(objective="kd", teacher_topk=None if signal == "dense" else args.k, temperature=2.0,
                         max_length=args.max_length, micro_batch_size=args.batch, grad_accum=1, prompt_style="study",
                         lr=1e-4, fused=path == "fused",
                         **({} if args.fused_memory_budget is None else {"fused_memory_budget": args.fused_memory_budget}))


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


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class RssPeak:
    """The highest resident set seen every 20 ms while the context is open, above the one at its start."""

    def __enter__(self) -> "RssPeak":
        self.base = self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def run_variant(args: argparse.Namespace, signal: str, path: str) -> dict[str, float]:
    import torch

    from kdscope.cache import CachedTeacher, TeacherCache
    from kdscope.models import load_model
    from kdscope.prompts import encode_example
    from kdscope.teacher import OnlineTeacher
    from kdscope.train import batch_loss, collate, prepare_student, window_units

    torch.manual_seed(0)
    settings = _settings(args, signal, path)
    student, tok = load_model(str(ROOT / "qwen2.5-coder-0.5b-instruct-fp32"), device="cpu")
    student = prepare_student(student, settings)
    if signal == "cache":
        teacher_signal = CachedTeacher(TeacherCache.open(args.cache_root), temperature=2.0)
    else:
        teacher, _ = load_model(str(ROOT / "qwen2.5-coder-1.5b-instruct-fp32"), device="cpu")
        teacher_signal = OnlineTeacher(teacher, topk=settings.teacher_topk, temperature=2.0)
    encoded = [encode_example(tok, ex, "study", args.max_length) for ex in _examples(args)]
    batches = [collate(encoded[i:i + args.batch], tok.pad_token_id, "all") for i in range(0, len(encoded), args.batch)]
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    def step(batch):  # type: ignore[no-untyped-def]
        parts = batch_loss(student, batch, settings, teacher_signal, window_units([batch], settings))
        parts.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return parts.kd

    # the warm-up step pages the memory-mapped weights in, creates AdamW's state and warms allocators and kernels
    losses, tokens, seconds = [step(batches[0])], 0, 0.0
    with RssPeak() as rss:
        for batch in batches[1: args.steps + 1]:
            start = time.perf_counter()
            losses.append(step(batch))
            seconds += time.perf_counter() - start
            tokens += int(batch.attention_mask.sum())
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / args.steps, "first_loss": losses[0],
            "step_rss_mib": rss.peak - rss.base, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _median_row(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds of every variant")
    parser.add_argument("--signals", nargs="+", choices=SIGNALS, default=["online", "cache"])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=["plain"],
                        help="loss paths (the first table ran before kdscope.fused existed: plain)")
    parser.add_argument("--fused-memory-budget", type=int, default=None,
                        help="bytes per chunk of the fused losses (default: TrainSettings' default)")
    parser.add_argument("--cache-root", type=Path, default=None,
                        help="default .cache/kdscope-bench-real-cache-k{k}-b{batch}-l{max_length}-s{steps}")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # build, or SIGNAL:PATH in a child process
    args = parser.parse_args()
    if args.cache_root is None:
        args.cache_root = Path(f".cache/kdscope-bench-real-cache-k{args.k}-b{args.batch}-l{args.max_length}-s{args.steps}")
    if args.variant == "build":
        print(json.dumps(build_cache(args)))
        return
    if args.variant:
        print(json.dumps(run_variant(args, *args.variant.split(":"))))
        return
    common = [sys.executable, __file__, "--k", str(args.k), "--batch", str(args.batch), "--max-length",
              str(args.max_length), "--steps", str(args.steps), "--cache-root", str(args.cache_root)]
    if args.fused_memory_budget is not None:
        common += ["--fused-memory-budget", str(args.fused_memory_budget)]

    def child(variant: str) -> dict[str, float]:
        out = subprocess.run([*common, "--variant", variant], check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(variant, json.dumps(result), file=sys.stderr, flush=True)
        return result

    results: dict[str, object] = {}
    if "cache" in args.signals:
        results["build"] = child("build")
    variants = [f"{s}:{p}" for s in args.signals for p in args.paths]
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            runs[variant].append(child(variant))
    results["runs"] = runs
    results["medians"] = medians = {v: _median_row(r) for v, r in runs.items()}
    if len(args.paths) == 2:
        results["fused_vs_plain"] = {s: {key: medians[f"{s}:fused"][key] / medians[f"{s}:plain"][key]
                                         for key in ("tokens_per_s", "step_rss_mib", "peak_rss_mib")}
                                     for s in args.signals}
    if {"online", "cache"} <= set(args.signals):
        results["cache_vs_online"] = {p: {key: medians[f"cache:{p}"][key] / medians[f"online:{p}"][key]
                                          for key in ("tokens_per_s", "peak_rss_mib")} for p in args.paths}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
