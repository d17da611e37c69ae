"""Data-parallel training: 2 CPU processes (gloo, started by torchrun) follow the same loss curve as one
process at the same global batch, rank 0 alone writes, and the replicas end with identical weights.

Tolerance: the two runs add the same per-micro-batch gradients in a different order (local sums, then an
all-reduce), so they agree to float32 rounding: a relative 1e-4 on every step's loss over 6 AdamW steps.

This file is also the worker: ``python tests/test_distributed.py OUT`` trains one rank (run under a launcher).
torchrun is the CPU launcher: `accelerate launch` starts several CPU processes only through MPI (mpirun), and on
GPUs it calls the same torch.distributed.run with the same environment (RANK, WORLD_SIZE, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
SETTINGS = dict(objective="kd", loss="forward_kl", temperature=2.0, max_steps=6, micro_batch_size=2, grad_accum=4,
                val_size=8, eval_every=3, save_every=3, warmup_steps=1, lr=3e-3, max_length=80,
                lora={"r": 4, "alpha": 8, "dropout": 0.1})


def run_rank(out: Path) -> list[dict]:
    """One rank of the run (or the whole run in a plain process): tiny teacher -> tiny student, LoRA KD."""
    from kdscope.distributed import close_distributed, init_distributed, place_teacher
    from kdscope.models import build_tiny_model
    from kdscope.teacher import OnlineTeacher
    from kdscope.synthetic import generate_domain
    from kdscope.train import TrainSettings, prepare_student, train

    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    settings = TrainSettings(**SETTINGS)
    teacher, tok = build_tiny_model("tiny-qwen-s", seed=1)
    student, _ = build_tiny_model("tiny-qwen-xs", seed=2)
    signal = OnlineTeacher(place_teacher(teacher, "replicate", ctx), temperature=settings.temperature)
    result = train(prepare_student(student, settings), tok, generate_domain("math", 40, seed=0), settings, out,
                   teacher=signal, progress=False, dist=ctx)
    weights = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    torch.save(weights, out / f"weights-rank{ctx.rank}.pt")
    close_distributed(ctx)
    return result.history


def _launch(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(__file__)), str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    single = run_rank(tmp_path / "single")
    proc = _launch(tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(ln) for ln in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    for one, two in zip(single, lines):
        assert two["loss"] == pytest.approx(one["loss"], rel=TOLERANCE), (one, two)
        assert two["tokens"] == one["tokens"]  # the ranks together saw exactly the one process's windows
        if "val_loss" in one:
            assert two["val_loss"] == pytest.approx(one["val_loss"], rel=TOLERANCE)
    w0 = torch.load(tmp_path / "ddp" / "weights-rank0.pt")
    w1 = torch.load(tmp_path / "ddp" / "weights-rank1.pt")
    ref = torch.load(tmp_path / "single" / "weights-rank0.pt")
    for name in ref:
        assert torch.equal(w0[name], w1[name]), name  # identical optimizer steps on every rank
        torch.testing.assert_close(w0[name], ref[name], rtol=1e-3, atol=1e-5)
    assert (tmp_path / "ddp" / "final" / "adapter_config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "ddp").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


def test_window_must_split_evenly() -> None:
    from kdscope.distributed import DistContext, check_window
    from kdscope.errors import InputError

    ctx = DistContext(rank=1, world_size=2)
    assert [i for i, _ in ctx.shard(["a", "b", "c", "d"])] == [1, 3]
    check_window(4, ctx)
    with pytest.raises(InputError, match="grad_accum=3"):
        check_window(3, ctx)


if __name__ == "__main__":
    target = Path(sys.argv[1])
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(target, ignore_errors=True)
    run_rank(target)
