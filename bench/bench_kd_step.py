"""Benchmark one KD training step: study dense, TRL's GKD loss, kdscope chunked, kdscope fused, Liger fused linear JSD.

One step = student forward, teacher forward (no grad), forward-KL loss, backward, AdamW step, on a tiny
Qwen2-architecture student and teacher with the real Qwen2.5 logit width (151,936) and a batch of 4 x 256 tokens
(``--batch`` to change). Each run is a fresh subprocess so peak memories do not mix; the peak is the resident-set
high-water mark during the timed steps (reset through /proc/self/clear_refs after the warm-up step) minus the resident
set before them, i.e. what the step itself needs on top of models, batch and optimizer state. Variants run alternately
(``--repeats`` rounds of every variant, at every ``--temperatures`` value) and the table gives medians and ratios of
medians, so all variants see the same machine load.

Variants (same models, batch, token set and optimizer; only the loss path differs):
- study:   the released study code's forward KL, restated here: full-vocabulary log-softmax of the student, softmax of
  the teacher plus 1e-9, elementwise KL summed over the vocabulary, masked, averaged per sequence then over the batch,
  times T^2.
- trl:     ``trl.experimental.gkd.GKDTrainer.compute_loss`` itself with beta = 0 (forward KL) and no on-policy
  sampling (lambda = 0), called with a stand-in for the trainer object (its ``generalized_jsd_loss`` bound to the
  temperature; TRL applies no T^2 factor).
- kdscope: ``kdscope.teacher.OnlineTeacher`` + ``kdscope.losses.distill_loss(loss="forward_kl")`` on full logits,
  which compares the unshifted logits position by position and drops the last position through the mask.
- fused:   ``kdscope.fused.fused_distill_parts``: both models stop at their last hidden states
  (``kdscope.fused.last_hidden_states``) and the heads run inside the loss, chunk by chunk (default memory budget).
- liger64 / liger1024: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (beta = 0: forward KL, hard-loss weight
  0, soft 1, ``compiled=False``) at chunk 64 and at Liger's default 1024 rows; Liger applies no T^2 factor.

Loss values are reported times T^2 for TRL and Liger, so every row shows the same quantity.

Needs the benchmark environment (TRL and Liger are not kdscope dependencies):
    python3 -m venv .bench-venv && .bench-venv/bin/pip install torch==2.13.0
    .bench-venv/bin/pip install -e . -r bench/requirements-bench.txt
    .bench-venv/bin/python bench/bench_kd_step.py
    .bench-venv/bin/python bench/bench_kd_step.py --profile   # model FLOP utilisation and a profile of the fused step
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from kdscope.fused import LinearHead, fused_distill_parts, fused_supported, last_hidden_states
from kdscope.losses import distill_loss
from kdscope.teacher import OnlineTeacher

VOCAB = 151936  # Qwen2.5-0.5B/1.5B/3B logit width
SEQ = 256  # default tokens per sequence (--seq)
VARIANTS = ("study", "trl", "kdscope", "fused", "liger64", "liger1024")
PEER_WITHOUT_T2 = ("trl", "liger64", "liger1024")

Batch = dict[str, torch.Tensor]
StepLoss = Callable[[Qwen2ForCausalLM, Qwen2ForCausalLM, Batch], torch.Tensor]


def tiny_qwen(hidden: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    return Qwen2ForCausalLM(config)


def make_batch(seed: int, batch: int, seq: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def next_token_mask(batch: Batch) -> torch.Tensor:
    """Mask over unshifted positions: position t counts when token t + 1 is a label (TRL's token set)."""
    mask = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    mask[:, :-1] = batch["labels"][:, 1:] != -100
    return mask


def kdscope_loss(temperature: float) -> StepLoss:
    teacher_signal: OnlineTeacher | None = None

    def step_loss(student: Qwen2ForCausalLM, teacher: Qwen2ForCausalLM, batch: Batch) -> torch.Tensor:
        nonlocal teacher_signal
        teacher_signal = teacher_signal or OnlineTeacher(teacher)
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher_logits = teacher_signal(batch["input_ids"], batch["attention_mask"]).logits
        return distill_loss(student_logits, teacher_logits, next_token_mask(batch), "forward_kl", temperature)

    return step_loss


def fused_loss(temperature: float) -> StepLoss:
    def step_loss(student: Qwen2ForCausalLM, teacher: Qwen2ForCausalLM, batch: Batch) -> torch.Tensor:
        assert fused_supported(student) and fused_supported(teacher)
        hidden = last_hidden_states(student, batch["input_ids"], batch["attention_mask"])
        with torch.no_grad():
            teacher.eval()
            teacher_hidden = last_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
        parts = fused_distill_parts(hidden, LinearHead.of(student), teacher_hidden, LinearHead.of(teacher),
                                    next_token_mask(batch), "forward_kl", temperature)
        return parts.mean()

    return step_loss


def liger_loss(temperature: float, chunk_size: int) -> StepLoss:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # a peer's import, paid only by its variants

    jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=temperature,
                                  compiled=False, chunk_size=chunk_size)

    def step_loss(student: Qwen2ForCausalLM, teacher: Qwen2ForCausalLM, batch: Batch) -> torch.Tensor:
        hidden = last_hidden_states(student, batch["input_ids"], batch["attention_mask"])
        with torch.no_grad():
            teacher.eval()
            teacher_hidden = last_hidden_states(teacher, batch["input_ids"], batch["attention_mask"])
        labels = torch.full_like(batch["labels"], -100)
        labels[:, :-1] = batch["labels"][:, 1:]  # position t predicts token t + 1; the last predicts nothing
        return jsd(hidden.flatten(0, 1), student.lm_head.weight, teacher_hidden.flatten(0, 1),
                   teacher.lm_head.weight, labels.flatten())

    return step_loss


def trl_loss(temperature: float) -> StepLoss:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    generalized_jsd_loss = functools.partial(GKDTrainer.generalized_jsd_loss, temperature=temperature)

    def step_loss(student: Qwen2ForCausalLM, teacher: Qwen2ForCausalLM, batch: Batch) -> torch.Tensor:
        trainer = SimpleNamespace(teacher_model=teacher, beta=0.0, generalized_jsd_loss=generalized_jsd_loss)
        return GKDTrainer.compute_loss(trainer, student, batch)

    return step_loss


def study_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """The study's forward KL, restated: dense over the vocabulary, per-sequence token mean, then batch mean."""
    student_scaled = student_logits / temperature
    teacher_scaled = teacher_logits / temperature
    student_scaled = student_scaled - student_scaled.max(dim=-1, keepdim=True).values
    teacher_scaled = teacher_scaled - teacher_scaled.max(dim=-1, keepdim=True).values
    student_log_probs = F.log_softmax(student_scaled, dim=-1)
    teacher_probs = F.softmax(teacher_scaled, dim=-1) + 1e-9
    per_token = F.kl_div(student_log_probs, teacher_probs, reduction="none").sum(dim=-1) * mask
    per_sequence = per_token.sum(dim=-1) / mask.sum(dim=-1)
    return per_sequence.mean() * temperature**2


def study_loss(temperature: float) -> StepLoss:
    def step_loss(student: Qwen2ForCausalLM, teacher: Qwen2ForCausalLM, batch: Batch) -> torch.Tensor:
        student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            teacher.eval()
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = (batch["labels"][:, 1:] != -100).to(student_logits.dtype)
        return study_forward_kl(student_logits[:, :-1], teacher_logits[:, :-1], mask, temperature)

    return step_loss


LOSSES: dict[str, Callable[[float], StepLoss]] = {
    "study": study_loss,
    "trl": trl_loss,
    "kdscope": kdscope_loss,
    "fused": fused_loss,
    "liger64": functools.partial(liger_loss, chunk_size=64),
    "liger1024": functools.partial(liger_loss, chunk_size=1024),
}


def rss_kib(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def run_variant(variant: str, steps: int, temperature: float, batch_size: int, seq: int) -> dict[str, float]:
    step_loss = LOSSES[variant](temperature)
    student = tiny_qwen(hidden=64, seed=1).train()
    teacher = tiny_qwen(hidden=128, seed=2).eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4)
    batch = make_batch(seed=3, batch=batch_size, seq=seq)

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
        "tokens_per_s": steps * batch_size * seq / elapsed,
        "seconds_per_step": elapsed / steps,
        "step_peak_mib": (peak_kib - before_kib) / 1024,
        "process_peak_mib": peak_kib / 1024,
        "first_loss": first_loss * (temperature**2 if variant in PEER_WITHOUT_T2 else 1.0),
    }


def model_flops_per_token(model: Qwen2ForCausalLM, seq: int, training: bool) -> float:
    """PaLM's count: 6N + 12 L H S per token for a training step (2N + 4 L H S for a forward), N the parameters
    that multiply (all but the input embedding), L layers, H hidden size, S tokens per sequence (attention)."""
    config = model.config
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    attention = config.num_hidden_layers * config.hidden_size * seq
    return 6 * n + 12 * attention if training else 2 * n + 4 * attention


def matmul_flops_per_s(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Best-of-``repeats`` float32 FLOP/s of an [m, k] x [k, n] product on this machine now."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def profile_fused(args: argparse.Namespace) -> str:
    """Model FLOP utilisation of the fused step against matmuls measured in the same process, and a profile table."""
    temperature = args.temperatures[0]
    step_loss = fused_loss(temperature)
    student, teacher = tiny_qwen(hidden=64, seed=1).train(), tiny_qwen(hidden=128, seed=2).eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-4)
    batch = make_batch(seed=3, batch=args.batch, seq=args.seq)

    def one_step() -> None:
        step_loss(student, teacher, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one_step()
    start = time.perf_counter()
    for _ in range(args.steps):
        one_step()
    seconds = (time.perf_counter() - start) / args.steps
    tokens = args.batch * args.seq
    flops = tokens * (model_flops_per_token(student, args.seq, True) + model_flops_per_token(teacher, args.seq, False))
    square = matmul_flops_per_s(2048, 2048, 2048)
    head = matmul_flops_per_s(tokens, 128, VOCAB)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        one_step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
    return "\n".join([
        f"fused KD step, T={temperature:g}, batch {args.batch} x {args.seq}, torch threads {torch.get_num_threads()}: "
        f"{seconds:.2f} s/step, {tokens / seconds:.0f} tokens/s",
        f"model FLOPs per step {flops / 1e9:.1f} GFLOP (student 6N + attention, teacher 2N + attention): "
        f"{flops / seconds / 1e9:.2f} GFLOP/s",
        f"ceiling, float32 matmul 2048^3: {square / 1e9:.2f} GFLOP/s -> MFU {flops / seconds / square:.1%}; "
        f"head-shaped [{tokens}, 128] x [128, {VOCAB}]: {head / 1e9:.2f} GFLOP/s -> {flops / seconds / head:.1%}",
        "",
        table,
    ])


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in ("torch", "transformers", "trl", "liger-kernel"))


def markdown_report(runs: dict[tuple[float, str], list[dict[str, float]]], args: argparse.Namespace) -> str:
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch threads {torch.get_num_threads()}; {versions()}",
        f"batch {args.batch} x {args.seq} tokens, vocab {VOCAB}, {args.steps} timed steps after 1 warm-up step per run, "
        f"{args.repeats} alternating rounds; medians, and ratios of medians; glibc MALLOC_MMAP_THRESHOLD_ "
        f"{args.malloc_mmap_threshold if args.malloc_mmap_threshold is not None else 'dynamic (default)'}",
        "",
        "| T | variant | tokens/s | s/step | step peak MiB | process peak MiB | loss at step 1 | tokens/s vs TRL "
        "| tokens/s vs kdscope | step peak vs TRL | step peak vs liger64 |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for temperature in args.temperatures:
        med = {}
        for name in args.variants:
            name_runs = runs[(temperature, name)]
            med[name] = {key: statistics.median(r[key] for r in name_runs) for key in name_runs[0]}

        def ratio(name: str, key: str, base: str) -> str:
            return f"{med[name][key] / med[base][key]:.2f}x" if base in med else "-"

        for name in args.variants:
            m = med[name]
            lines.append(
                f"| {temperature:g} | {name} | {m['tokens_per_s']:.0f} | {m['seconds_per_step']:.2f} | "
                f"{m['step_peak_mib']:.0f} | {m['process_peak_mib']:.0f} | {m['first_loss']:.6f} | "
                f"{ratio(name, 'tokens_per_s', 'trl')} | {ratio(name, 'tokens_per_s', 'kdscope')} | "
                f"{ratio(name, 'step_peak_mib', 'trl')} | {ratio(name, 'step_peak_mib', 'liger64')} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of every variant")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=SEQ, help="tokens per sequence")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process and print JSON")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="run each variant with glibc's MALLOC_MMAP_THRESHOLD_ fixed at BYTES (e.g. 131072): every "
                        "larger allocation is mapped and unmapped when freed, so the resident set follows the live "
                        "tensors and the step peak does not depend on what the heap kept from earlier steps")
    parser.add_argument("--profile", action="store_true", help="the fused step only: model FLOP utilisation against "
                        "matmuls measured in the same process, and a torch.profiler table (first temperature)")
    parser.add_argument("--profile-rows", type=int, default=15, help="rows of the profiler table")
    args = parser.parse_args()
    if args.profile:
        print(profile_fused(args))
        return
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.temperatures[0], args.batch, args.seq)))
        return
    runs: dict[tuple[float, str], list[dict[str, float]]] = {}
    for round_index in range(args.repeats):
        for temperature in args.temperatures:
            for name in args.variants:
                command = [sys.executable, __file__, "--variant", name, "--steps", str(args.steps), "--batch",
                           str(args.batch), "--seq", str(args.seq), "--temperatures", str(temperature)]
                env = dict(os.environ)
                if args.malloc_mmap_threshold is not None:
                    env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
                completed = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
                result = json.loads(completed.stdout.strip().splitlines()[-1])
                runs.setdefault((temperature, name), []).append(result)
                print(f"round {round_index + 1} T={temperature:g} {name}: {result}", file=sys.stderr, flush=True)
    print(markdown_report(runs, args))


if __name__ == "__main__":
    main()
