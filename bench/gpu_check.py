"""GPU check of the real teacher/student pair: KD steps/s, generation items/s (HF, and vLLM when installed), peak GPU
memory. One command, sized for under 8 minutes on one H200; prints one JSON object (and writes it with --json).

    python bench/gpu_check.py                                   # Qwen2.5-Coder-1.5B-Instruct -> 0.5B-Instruct (hub)
    python bench/gpu_check.py --teacher .cache/qwen-coder/qwen2.5-coder-1.5b-instruct-fp32 \\
                              --student .cache/qwen-coder/qwen2.5-coder-0.5b-instruct-fp32   # offline copies
    python bench/gpu_check.py --teacher builtin:tiny-qwen-l --student builtin:tiny-qwen-s --steps 3 --items 8  # smoke

Model references are anything kdscope.models.load_model takes (hub id, HF folder, .gguf, builtin:<name>); vLLM needs
a hub id or an HF folder (scripts/assemble_qwen_coder.py --dequantize writes those from the GGUF pair).
Phases run one after another and each frees its GPU memory, so each peak is that phase's own.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TEACHER = "Qwen/Qwen2.5-Coder-1.5B-Instruct"
STUDENT = "Qwen/Qwen2.5-Coder-0.5B-Instruct"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=TEACHER)
    p.add_argument("--student", default=STUDENT)
    p.add_argument("--steps", type=int, default=30, help="KD optimizer steps (the first is warm-up, not timed)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--items", type=int, default=256, help="prompts for each generation backend")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gen-batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM phase even when vLLM is installed")
    p.add_argument("--json", type=Path, help="also write the result here")
    return p.parse_args(argv)


def _examples(n: int) -> list[Any]:
    """Study-format math items: the study's training file when the shared data is present, generated ones otherwise."""
    from kdscope.data import load_examples, load_training_data

    shared = Path(__file__).resolve().parents[2] / "shared/data/kd-generalization/ft-training_set/math_data.json"
    if shared.is_file():  # 3 of its 3260 rows have no response: skip them
        return [ex for ex in load_examples(shared) if ex.output][:n]
    return load_training_data(f"synthetic:math:{max(1, n // 3)}")[:n]


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def kd_phase(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from kdscope.models import load_model
    from kdscope.teacher import OnlineTeacher
    from kdscope.train import TrainSettings, prepare_student, train

    _reset_peak(device)
    t0 = time.perf_counter()
    teacher, _ = load_model(args.teacher, device=str(device))
    student, tok = load_model(args.student, device=str(device))
    load_s = time.perf_counter() - t0
    settings = TrainSettings(objective="kd", loss="forward_kl", temperature=2.0, max_steps=args.steps,
                             micro_batch_size=args.micro_batch_size, grad_accum=args.grad_accum,
                             max_length=args.max_length, val_size=0, warmup_steps=0, save_every=10**6)
    examples = _examples(args.steps * args.micro_batch_size * args.grad_accum)
    with tempfile.TemporaryDirectory() as out:
        result = train(prepare_student(student, settings), tok, examples, settings, out,
                       teacher=OnlineTeacher(teacher, temperature=2.0, vocab_width=student.config.vocab_size),
                       resume=False, progress=False)
    timed = result.history[1:] or result.history
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    row = {"load_s": round(load_s, 1), "steps": len(timed), "steps_per_s": round(len(timed) / seconds, 3),
           "tokens_per_s": round(tokens / seconds, 1), "final_loss": result.history[-1]["loss"],
           "peak_gib": _peak_gib(device)}
    del teacher, student
    return row


def _prompts(n: int) -> list[str]:
    from kdscope.prompts import build_prompt

    return [build_prompt(ex, "study") for ex in _examples(n)]


def hf_generation_phase(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from kdscope.evaluation import HFGenerator, generation_preset, run_generation
    from kdscope.models import load_model

    _reset_peak(device)
    model, tok = load_model(args.student, device=str(device))
    model.eval()
    prompts = _prompts(args.items)
    settings = generation_preset("greedy", max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size)
    t0 = time.perf_counter()
    texts = run_generation(HFGenerator(model, tok), prompts, settings, progress=False)
    seconds = time.perf_counter() - t0
    del model
    return {"items": len(texts), "items_per_s": round(len(texts) / seconds, 2), "seconds": round(seconds, 1),
            "peak_gib": _peak_gib(device)}


def vllm_generation_phase(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from kdscope.evaluation import VLLMGenerator, generation_preset, run_generation

    _reset_peak(device)
    t0 = time.perf_counter()
    generator = VLLMGenerator(args.student)
    load_s = time.perf_counter() - t0
    prompts = _prompts(args.items)
    # one call with every prompt: vLLM batches continuously itself
    settings = generation_preset("greedy", max_new_tokens=args.max_new_tokens, batch_size=len(prompts))
    t0 = time.perf_counter()
    texts = run_generation(generator, prompts, settings, progress=False)
    seconds = time.perf_counter() - t0
    free, total = torch.cuda.mem_get_info(device)
    del generator
    # vLLM reserves gpu_memory_utilization of the GPU up front, outside torch's allocator statistics
    return {"items": len(texts), "items_per_s": round(len(texts) / seconds, 2), "seconds": round(seconds, 1),
            "load_s": round(load_s, 1), "gpu_used_gib": round((total - free) / 2**30, 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --device cpu with builtin: models for a smoke run)")
    t0 = time.perf_counter()
    report: dict[str, Any] = {"teacher": args.teacher, "student": args.student, "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    report["kd"] = kd_phase(args, device)
    report["generate_hf"] = hf_generation_phase(args, device)
    if args.no_vllm or device.type != "cuda" or importlib.util.find_spec("vllm") is None:
        report["generate_vllm"] = {"skipped": "vllm not installed" if not args.no_vllm else "--no-vllm"}
    else:
        report["generate_vllm"] = vllm_generation_phase(args, device)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
