"""Checkpoint I/O and the metrics log: what makes a killed run resume exactly where it stopped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..models import save_model

CHECKPOINT_STATE = "trainer_state.json"


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                    teacher: Any = None) -> None:
    """Weights as safetensors; optimizer/scheduler via torch.save (reloaded with weights_only=True); atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "teacher": teacher.state_dict() if hasattr(teacher, "state_dict") else None}, tmp / "optim.pt")
    (tmp / CHECKPOINT_STATE).write_text(json.dumps(state))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, teacher: Any = None) -> dict[str, Any]:
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optim = torch.load(path / "optim.pt", weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    if optim.get("teacher") is not None and hasattr(teacher, "load_state_dict"):
        teacher.load_state_dict(optim["teacher"])  # the noise generator continues where it stopped
    return json.loads((path / CHECKPOINT_STATE).read_text())


def _numbered_checkpoints(out_dir: Path) -> list[Path]:
    found = [c for c in out_dir.glob("checkpoint-*") if c.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = [c for c in _numbered_checkpoints(out_dir) if (c / CHECKPOINT_STATE).is_file()]
    return ckpts[-1] if ckpts else None


def prune_checkpoints(out: Path, keep: int) -> None:
    for old in _numbered_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_weights(model: Any, tokenizer: Any, path: Path) -> None:
    """Save loadable weights (HF format) to ``path`` atomically: a kill leaves the old folder or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(model, tokenizer, tmp)
    except BaseException:  # a failed save must not leave a half-written folder beside the results
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


class MetricLog:
    """Per-step metrics as JSONL (appended, so a resumed run continues the same file), plus W&B / MLflow."""

    def __init__(self, path: Path, report_to: Sequence[str], run_name: str, config: dict[str, Any]) -> None:
        self.path = path
        self.sinks: list[Any] = []
        if "wandb" in report_to:
            import wandb  # optional dependency, only when asked for

            self.sinks.append(wandb.init(name=run_name, config=config, resume="allow"))
        if "mlflow" in report_to:
            import mlflow  # optional dependency, only when asked for

            mlflow.start_run(run_name=run_name)
            mlflow.log_params({k: str(v) for k, v in config.items()})
            self.sinks.append(mlflow)

    def truncate_after(self, step: int) -> None:
        """Drop records beyond ``step`` (written after the checkpoint we resume from)."""
        if not self.path.is_file():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            if sink.__class__.__name__ == "module":
                sink.log_metrics({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
            else:
                sink.log(record, step=record["step"])
