"""Benchmark one KD training step: kdscope's chunked forward KL vs TRL's GKD loss vs the study's dense formulation.

One step = student forward, teacher forward (no grad), forward-KL loss, backward, AdamW step, on a tiny
Qwen2-architecture student and teacher with the real Qwen2.5 logit width (151,936) and a batch of 4 x 256 tokens.
Each variant runs in a fresh subprocess so peak memories do not mix; the peak is the resident-set high-water mark
during the timed steps (reset through /proc/self/clear_refs after the warm-up step) minus the resident set before them,
i.e. what the step itself needs on top of models, batch and optimizer state.

Variants (same models, batch, token set and optimizer; only the loss path differs):
- kdscope: ``kdscope.teacher.OnlineTeacher`` + ``kdscope.losses.distill_loss(loss="forward_kl")``, which compares the
  unshifted logits position by position and drops the last position through the mask (no logit slicing).
- trl:     ``trl.experimental.gkd.GKDTrainer.compute_loss`` itself with beta = 0 (forward KL) and no on-policy
  sampling (lambda = 0), called with a stand-in for the trainer object.
- study:   the released study code's forward KL, restated here: full-vocabulary log-softmax of the student, softmax of
  the teacher plus 1e-9, elementwise KL summed over the vocabulary, masked, averaged per sequence then over the batch,
  times T^2.

Needs the benchmark environment (TRL is not a kdscope dependency):
    python3 -m venv .bench-venv && .bench-venv/bin/pip install torch==2.13.0
    .bench-venv/bin/pip install -e . -r bench/requirements-bench.txt
    .bench-venv/bin/python bench/bench_kd_step.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

VOCAB = 151936  # Qwen2.5-0.5B/1.5B/3B logit width
BATCH, SEQ = 4, 256
TEMPERATURE = 1.0  # TRL's compute_loss does not pass a temperature, so compare at 1
VARIANTS = ("kdscope", "trl", "study")

StepLoss = Callable[[Qwen2ForCausalLM, Qwen2ForCausalLM, dict[str, torch.Tensor]], torch.Tensor]


def tiny_qwen(hidden: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
    )
    return Qwen2ForCausalLM(config)


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def next_token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mask over unshifted positions: position t counts when token t + 1 is a label (TRL's token set)."""
    mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    mask[:, :-1] = batch["labels"][:, 1:] != -100
    return mask


def kdscope_loss() -> StepLoss:
    from kdscope.losses import distill_loss
    from kdscope.teacher import OnlineTeacher

    teacher_signal: OnlineTeacher | None = None

    def step_loss(student: Qwen2ForCausalLM, teacher: Qwen2ForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nonlocal teacher_signal
        teacher_signal = teacher_signal or OnlineTeacher(teacher)
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = teacher_signal(batch["input_ids"], batch["attention_mask"]).logits
        return distill_loss(student_logits, teacher_logits, next_token_mask(batch), "forward_kl", TEMPERATURE)

    return step_loss


def trl_loss() -> StepLoss:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    def step_loss(student: Qwen2ForCausalLM, teacher: Qwen2ForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        trainer = SimpleNamespace(teacher_model=teacher, beta=0.0, generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)
        return GKDTrainer.compute_loss(trainer, student, batch)

    return step_loss


def study_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The study's forward KL, restated: dense over the vocabulary, per-sequence token mean, then batch mean."""
    student_scaled = student_logits / TEMPERATURE
    teacher_scaled = teacher_logits / TEMPERATURE
    student_scaled = student_scaled - student_scaled.max(dim=-1, keepdim=True).values
    teacher_scaled = teacher_scaled - teacher_scaled.max(dim=-1, keepdim=True).values
    student_log_probs = F.log_softmax(student_scaled, dim=-1)
    teacher_probs = F.softmax(teacher_scaled, dim=-1) + 1e-9
    per_token = F.kl_div(student_log_probs, teacher_probs, reduction="none").sum(dim=-1) * mask
    per_sequence = per_token.sum(dim=-1) / mask.sum(dim=-1)
    return per_sequence.mean() * TEMPERATURE**2


def study_loss() -> StepLoss:
    def step_loss(student: Qwen2ForCausalLM, teacher: Qwen2ForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            teacher.eval()
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = (batch["labels"][:, 1:] != -100).to(student_logits.dtype)
        return study_forward_kl(student_logits[:, :-1], teacher_logits[:, :-1], mask)

    return step_loss


LOSSES: dict[str, Callable[[], StepLoss]] = {"kdscope": kdscope_loss, "trl": trl_loss, "study": study_loss}


def rss_kib(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def run_variant(variant: str, steps: int) -> dict[str, float]:
    step_loss = LOSSES[variant]()
    student = tiny_qwen(hidden=64, seed=1).train()
    teacher = tiny_qwen(hidden=128, seed=2).eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4)
    batch = make_batch(seed=3)

    def one_step() -> float:
        loss = step_loss(student, teacher, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first_loss = one_step()  # warm-up: allocates optimizer state, loads kernels
    before_kib = rss_kib("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    for _ in range(steps):
        one_step()
    elapsed = time.perf_counter() - start
    peak_kib = rss_kib("VmHWM")
    return {
        "tokens_per_s": steps * BATCH * SEQ / elapsed,
        "seconds_per_step": elapsed / steps,
        "step_peak_mib": (peak_kib - before_kib) / 1024,
        "process_peak_mib": peak_kib / 1024,
        "first_loss": first_loss,
    }


def versions() -> str:
    import transformers
    import trl

    return f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"


def markdown_report(results: dict[str, dict[str, float]], steps: int) -> str:
    trl = results["trl"]
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch threads {torch.get_num_threads()}; {versions()}",
        f"batch {BATCH} x {SEQ} tokens, vocab {VOCAB}, {steps} timed steps after 1 warm-up step, one run",
        "",
        "| variant | tokens/s | s/step | step peak MiB | process peak MiB | loss at step 1 | tokens/s vs TRL "
        "| step peak vs TRL |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in VARIANTS:
        r = results[name]
        lines.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['seconds_per_step']:.2f} | {r['step_peak_mib']:.0f} | "
            f"{r['process_peak_mib']:.0f} | {r['first_loss']:.6f} | {r['tokens_per_s'] / trl['tokens_per_s']:.2f}x | "
            f"{r['step_peak_mib'] / trl['step_peak_mib']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process and print JSON")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps)))
        return
    results = {}
    for name in VARIANTS:
        command = [sys.executable, __file__, "--variant", name, "--steps", str(args.steps)]
        completed = subprocess.run(command, check=True, capture_output=True, text=True)
        results[name] = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr)
    print(markdown_report(results, args.steps))


if __name__ == "__main__":
    main()
