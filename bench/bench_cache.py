"""Benchmark the teacher-signal cache: bytes per token, KD-loss error vs the dense teacher per k, and one KD training
step reading the cache vs running the teacher online (tokens/s, peak memory).

Parts:
- ``size``: bytes per cached token for k in {8, 32, 64, 256} and each codec, on the real-vocabulary twin (tiny random
  Qwen2 teacher with the Qwen2.5 logit width 151,936, so ids need int32) and, when its folder exists, on
  SmolLM2-135M-Instruct (a trained model, vocab 49,152, uint16 ids) over the built-in math training texts.
- ``error``: per-token KD loss from the cached top-k vs from the dense teacher (``kdscope.cache.cache_divergence_error``)
  with the trained SmolLM2 teacher (a random teacher is near-uniform and says nothing about top-k truncation) and a
  tiny random student of the same vocabulary.
- ``step``: one KD step (student forward, teacher signal, top-k tail-bucket forward KL at T = 2, backward, AdamW) on
  the real-vocabulary twin (teacher hidden 128 x 4 layers, student hidden 64 x 2 layers, batch 4 x 256), each variant
  in a fresh subprocess: ``online`` = ``OnlineTeacher(topk=64)`` with the teacher loaded, ``cache`` =
  ``CachedTeacher`` over a cache built beforehand (the teacher never loaded). "step peak" is the resident-set
  high-water mark during the timed steps minus the resident set before them; "process peak" the whole process's.

Command (kdscope's own environment; SmolLM2 as a safetensors folder, see docs/offline.md for the GGUF source):
    .venv/bin/python bench/bench_cache.py --smollm .cache/smollm2-135m-f32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from kdscope.cache import CachedTeacher, CacheKey, TeacherCache, cache_divergence_error, cache_key, data_digest
from kdscope.losses import distill_loss_sparse
from kdscope.teacher import OnlineTeacher

VOCAB = 151936  # Qwen2.5-0.5B/1.5B/3B logit width
BATCH, SEQ = 4, 256
KS = (8, 32, 64, 256)
STEP_K = 64
TEMPERATURE = 2.0
TIMED_STEPS = 2
CODECS = ("zlib", "lzma", "none")


def tiny_qwen(hidden: int, layers: int, seed: int, vocab: int = VOCAB) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return Qwen2ForCausalLM(config).eval()


def twin_teacher() -> Qwen2ForCausalLM:
    return tiny_qwen(hidden=128, layers=4, seed=2)


def twin_sequences(n_batches: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (n_batches * BATCH, SEQ), generator=generator).tolist()


def twin_key(sequences: list[list[int]], k: int) -> CacheKey:
    """The twin has no tokenizer (random ids), so its key names the synthetic data instead."""
    return CacheKey(teacher="twin-qwen2-h128-l4", adapter=None, adapter_digest=None, weights=None,
                    data=data_digest(sequences), prompt_style="random-ids", tokenizer="none", k=k, max_length=SEQ,
                    vocab_width=None)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# --------------------------------------------------------------------------------------------------------------------
# size and error
# --------------------------------------------------------------------------------------------------------------------
def size_rows(name: str, model: torch.nn.Module, sequences: list[list[int]], key_of: Any, pad_id: int,
              work: Path) -> list[dict[str, Any]]:
    rows = []
    for k in KS:
        for codec in CODECS:
            start = time.perf_counter()
            cache = TeacherCache.build(work / f"{name}-{k}-{codec}", key_of(k), model, sequences, pad_id,
                                       (1.0, 2.0, 5.0), shard_size=64, batch_size=4, codec=codec)  # type: ignore[arg-type]
            rows.append({"model": name, "k": k, "codec": codec, "bytes_per_token": cache.bytes_per_token(),
                         "build_s": time.perf_counter() - start, "positions": cache.manifest["n_positions"]})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def smollm_inputs(folder: Path, n_examples: int) -> tuple[Any, Any, list[list[int]]]:
    from kdscope.cache import encode_sequences
    from kdscope.models import load_model
    from kdscope.synthetic import generate_domain

    model, tok = load_model(str(folder), dtype="float32", device="cpu")
    sequences = encode_sequences(tok, generate_domain("math", n_examples, seed=0), "study", 256)
    return model.eval(), tok, sequences


@torch.no_grad()
def error_rows(model: Any, sequences: list[list[int]]) -> list[dict[str, Any]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    width = int(model.get_output_embeddings().weight.shape[0])
    student = LlamaForCausalLM(LlamaConfig(vocab_size=width, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    teacher_rows, student_rows = [], []
    for ids in sequences:
        batch = torch.tensor([ids])
        teacher_rows.append(model(input_ids=batch).logits[0, :-1])
        student_rows.append(student(input_ids=batch).logits[0, :-1])
    errors = cache_divergence_error(torch.cat(student_rows), torch.cat(teacher_rows), ks=KS,
                                    losses=("forward_kl", "reverse_kl"), temperatures=(1.0, 2.0))
    return [e.__dict__ for e in errors]


# --------------------------------------------------------------------------------------------------------------------
# step
# --------------------------------------------------------------------------------------------------------------------
def build_twin_cache(root: Path) -> None:
    sequences = twin_sequences(1 + TIMED_STEPS)
    TeacherCache.build(root, twin_key(sequences, STEP_K), twin_teacher(), sequences, 0, (1.0, TEMPERATURE),
                       shard_size=BATCH, batch_size=BATCH)


def run_step_variant(variant: str, cache_root: Path) -> dict[str, float]:
    sequences = twin_sequences(1 + TIMED_STEPS)
    if variant == "online":
        signal: Any = OnlineTeacher(twin_teacher(), topk=STEP_K, temperature=TEMPERATURE)
    else:
        signal = CachedTeacher(TeacherCache.open(cache_root, twin_key(sequences, STEP_K)), temperature=TEMPERATURE)
    student = tiny_qwen(hidden=64, layers=2, seed=1).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4)

    def one_step(step: int) -> float:
        input_ids = torch.tensor(sequences[step * BATCH : (step + 1) * BATCH])
        attention = torch.ones_like(input_ids)
        logits = student(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
        out = signal(input_ids, attention)
        loss = distill_loss_sparse(logits, out.topk_values[:, :-1], out.topk_indices[:, :-1], attention[:, 1:],
                                   "forward_kl", TEMPERATURE, tail="tail_bucket",
                                   teacher_log_normalizer=out.topk_log_normalizer[:, :-1],
                                   teacher_log_tail=out.topk_log_tail[:, :-1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first_loss = one_step(0)
    before_kib = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    start = time.perf_counter()
    for step in range(1, 1 + TIMED_STEPS):
        one_step(step)
    elapsed = time.perf_counter() - start
    peak_kib = rss_kib("VmHWM")
    return {"tokens_per_s": TIMED_STEPS * BATCH * SEQ / elapsed, "seconds_per_step": elapsed / TIMED_STEPS,
            "step_peak_mib": (peak_kib - before_kib) / 1024, "process_peak_mib": peak_kib / 1024,
            "first_loss": first_loss}


# --------------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------------
def markdown(size: list[dict[str, Any]], errors: list[dict[str, Any]], steps: dict[str, dict[str, float]]) -> str:
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads)", "", "Bytes per cached token (temperatures 1, 2, 5 stored):", "",
             "| model | k | codec | bytes/token | build s | positions |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['k']} | {r['codec']} | {r['bytes_per_token']:.0f} | {r['build_s']:.1f} | "
              f"{r['positions']} |" for r in size]
    if errors:
        lines += ["", "Per-token KD loss from the cache vs the dense teacher (SmolLM2-135M teacher, float16 log-probs):",
                  "", "| k | loss | T | tail | tokens | dense mean | mean abs error | relative error | max abs error |",
                  "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {e['k']} | {e['loss']} | {e['temperature']:g} | {e['tail']} | {e['tokens']} | "
                  f"{e['dense_mean']:.4f} | {e['mean_abs_error']:.5f} | {100 * e['relative_error']:.2f} % | "
                  f"{e['max_abs_error']:.4f} |" for e in errors]
    if steps:
        online = steps["online"]
        lines += ["", f"KD step, real-vocabulary twin, batch {BATCH} x {SEQ}, top-{STEP_K}, T = {TEMPERATURE:g}, "
                  f"{TIMED_STEPS} timed steps after 1 warm-up:", "",
                  "| variant | tokens/s | s/step | step peak MiB | process peak MiB | loss at step 1 | tokens/s vs online "
                  "| process peak vs online |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {name} | {r['tokens_per_s']:.0f} | {r['seconds_per_step']:.2f} | {r['step_peak_mib']:.0f} | "
                  f"{r['process_peak_mib']:.0f} | {r['first_loss']:.6f} | "
                  f"{r['tokens_per_s'] / online['tokens_per_s']:.2f}x | "
                  f"{r['process_peak_mib'] / online['process_peak_mib']:.2f}x |" for name, r in steps.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="size,error,step", help="comma-separated: size, error, step")
    parser.add_argument("--smollm", type=Path, default=Path(".cache/smollm2-135m-f32"),
                        help="SmolLM2-135M-Instruct as a HF folder (skipped when absent)")
    parser.add_argument("--examples", type=int, default=8, help="math training examples per task for SmolLM2")
    parser.add_argument("--variant", choices=("online", "cache"), help=argparse.SUPPRESS)
    parser.add_argument("--cache-root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_step_variant(args.variant, args.cache_root)))
        return
    parts = set(args.parts.split(","))
    size: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    steps: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "size" in parts:
            twin = twin_sequences(2)
            size += size_rows("twin-151936", twin_teacher(), twin, lambda k: twin_key(twin, k), 0, work)
        if ("size" in parts or "error" in parts) and args.smollm.is_dir():
            model, tok, sequences = smollm_inputs(args.smollm, args.examples)
            if "size" in parts:
                size += size_rows("SmolLM2-135M", model, sequences,
                                  lambda k: cache_key(str(args.smollm), None, tok, sequences, "study", k, 256), tok.pad_token_id,
                                  work)
            if "error" in parts:
                errors = error_rows(model, sequences)
            del model
        if "step" in parts:
            build_twin_cache(work / "step-cache")
            for variant in ("online", "cache"):
                command = [sys.executable, __file__, "--variant", variant, "--cache-root", str(work / "step-cache")]
                done = subprocess.run(command, check=True, capture_output=True, text=True)
                steps[variant] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{variant}: {steps[variant]}", file=sys.stderr)
    print(markdown(size, errors, steps))


if __name__ == "__main__":
    main()
