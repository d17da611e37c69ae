"""The study file: a YAML schema (pydantic) that says which models, domains, methods, temperatures, ablations and
settings a study runs. Loading validates everything a study names before any job runs; errors name the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ..errors import InputError
from ..models import LoraSettings
from ..tasks import get_task
from ..train import TrainSettings

METHODS: dict[str, dict[str, Any]] = {
    # study name -> training settings; row label in the study's tables
    "SeqKD": {"objective": "kd", "loss": "forward_kl", "label": "KD"},
    "RevKD": {"objective": "kd", "loss": "reverse_kl", "label": "RevKD"},
    "GKD": {"objective": "gkd", "loss": "jsd", "label": "GKD"},
}


class _Strict(BaseModel):
    model_config = {"extra": "forbid"}


class ModelEntry(_Strict):
    name: str = Field(description="display name in result tables; end it with the size, e.g. Qwen2.5-0.5B")
    model: str = Field(description="hub id, local folder, .gguf file or builtin:<name>")
    trust_remote_code: bool = False


class Family(_Strict):
    """Models that share one tokenizer; distillation happens only within a family."""

    name: str
    teachers: list[ModelEntry]
    students: list[ModelEntry]


class TaskEntry(_Strict):
    task: str
    data: str | None = Field(None, description="study dataset folder or file; omit for built-in generated tasks")

    @field_validator("task")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            get_task(v)
        except KeyError as e:
            raise ValueError(str(e.args[0])) from None
        return v


class DomainSpec(_Strict):
    """One domain of the study: its training set, test tasks and training overrides."""

    name: Literal["math", "commonsense"]
    train: str = Field(description="training data: study JSON/JSONL file or synthetic:<domain>[:n]")
    tasks: list[TaskEntry]
    training: dict[str, Any] = Field(default_factory=dict, description="TrainSettings overrides for this domain, "
                                     "e.g. {epochs: 4} for math as in the study")


class Ablations(_Strict):
    base_teacher: bool = Field(False, description="KD from the teacher before task fine-tuning")
    noise_sigmas: list[float] = Field(default_factory=list, description="Gaussian noise on teacher logits")
    method: Literal["SeqKD", "RevKD", "GKD"] = "SeqKD"
    temperature: float = 1.0
    teachers: list[str] | None = Field(None, description="teacher names the ablations run for (default: all)")


class Evaluation(_Strict):
    mode: Literal["generate", "loglik"] = "generate"
    preset: Literal["greedy", "study"] = "greedy"
    limit: int | None = Field(None, ge=1, description="items per task (smoke runs)")
    max_new_tokens: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    prompt_style: Literal["study", "alpaca"] = "study"
    synthetic_items: int = Field(100, ge=1, description="test items per built-in generated task")


class Pretrain(_Strict):
    """Local pretraining of built-in tiny models on generated text (the demo's stand-in for a pretrained base)."""

    steps: dict[str, int] = Field(default_factory=dict, description="steps per model name; missing: 0 (no pretraining)")
    data: str = "synthetic:math:400"
    extra_data: list[str] = Field(default_factory=lambda: ["synthetic:commonsense:400"])
    lr: float = 3e-3
    micro_batch_size: int = 16
    token_mask: Literal["all", "response"] = "all"


class Training(_Strict):
    """Overrides of kdscope.train.TrainSettings for each kind of run (the study's recipe is the default)."""

    common: dict[str, Any] = Field(default_factory=dict)
    teacher_sft: dict[str, Any] = Field(default_factory=dict)
    student_sft: dict[str, Any] = Field(default_factory=dict)
    kd: dict[str, Any] = Field(default_factory=dict)
    lora: LoraSettings | None = Field(default_factory=LoraSettings, description="null: full fine-tuning")


class Executor(_Strict):
    kind: Literal["local", "ray"] = "local"
    workers: int = Field(1, ge=1, description="local: jobs run at once, each in its own process (1: in-process)")
    address: str | None = Field(None, description="Ray cluster address; None starts a local Ray instance")
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0


class Study(_Strict):
    name: str
    seeds: list[int] = Field(default_factory=lambda: [6])
    device: str = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (1 is fastest for tiny models on a busy CPU)")
    families: list[Family]
    domains: list[DomainSpec]
    methods: list[Literal["SeqKD", "RevKD", "GKD"]] = Field(default_factory=lambda: ["SeqKD", "RevKD", "GKD"])
    temperatures: list[float] = Field(default_factory=lambda: [1.0, 2.0, 5.0])
    ablations: Ablations = Field(default_factory=Ablations)
    training: Training = Field(default_factory=Training)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    pretrain: Pretrain = Field(default_factory=Pretrain)
    executor: Executor = Field(default_factory=Executor)

    @model_validator(mode="after")
    def _check(self) -> "Study":
        parts = [(f"training.{p}", {**self.training.common, **getattr(self.training, p)})
                 for p in ("common", "teacher_sft", "student_sft", "kd")]
        parts += [(f"domains.{d.name}.training", {**self.training.common, **d.training}) for d in self.domains]
        for where, values in parts:
            try:
                TrainSettings(**values)
            except ValidationError as e:
                err = e.errors()[0]
                raise ValueError(f"{where}.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        if any(t <= 0 for t in self.temperatures):
            raise ValueError("temperatures must all be > 0")
        return self


def load_study(path: str | Path) -> Study:
    """Parse and validate a study YAML; errors name the key, the bad value and the fix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such study file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a study file is a mapping with keys name, families, domains, ...")
    try:
        return Study(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        bad = f" (got {err['input']!r})" if not isinstance(err.get("input"), (dict, list)) else ""
        hint = " - remove it or check the spelling" if err["type"] == "extra_forbidden" else ""
        raise InputError(f"{path}: {key}: {err['msg']}{bad}{hint}") from None


def builtin_study(name: str = "demo") -> Path:
    """Path of a study YAML shipped in the package (``demo``)."""
    path = Path(__file__).parent.parent / "studies" / f"{name}.yaml"
    if not path.is_file():
        raise InputError(f"no built-in study {name!r}")
    return path
