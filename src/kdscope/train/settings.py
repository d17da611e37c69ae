"""`TrainSettings`: every training default and its validation, in one place.

The CLI (`kdscope train sft|kd`) and the study YAML (``training.*``) both build one of these; a field added here is an
option in both. Defaults follow the study's recipe (study.md section 2).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..losses import LOSS_NAMES
from ..models import LoraSettings

Objective = Literal["sft", "kd", "gkd", "seqkd"]


class TrainSettings(BaseModel):
    """Everything that determines a training run. Defaults follow the study's recipe (study.md section 2)."""

    model_config = ConfigDict(extra="forbid")

    objective: Objective = "sft"
    loss: str = Field("forward_kl", description="KD divergence: forward_kl, reverse_kl, jsd, skew_forward_kl, ...")
    temperature: float = Field(1.0, gt=0)
    kd_weight: float = Field(1.0, ge=0, le=1, description="w in (1-w)*CE + w*KD; the study used 1")
    beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation (GKD)")
    alpha: float = Field(0.1, ge=0, le=1, description="skew for skew KL losses")
    scale_by_t2: bool = True
    token_mask: Literal["all", "response"] = Field("all", description="'all': prompt too, as the study")
    reduction: Literal["token_mean", "sequence_mean"] = Field(
        "token_mean", description="sequence_mean = the study's mean over each sequence, then over the batch"
    )
    lmbda: float = Field(0.5, ge=0, le=1, description="GKD: probability that a step uses the student's own samples")
    sample_temperature: float = Field(1.0, gt=0, description="GKD on-policy sampling temperature")
    max_new_tokens: int = Field(64, ge=1, description="GKD / sequence-level KD generation length")
    noise_sigma: float = Field(0.0, ge=0, description="std of Gaussian noise added to teacher logits")
    teacher_topk: int | None = Field(None, ge=1, description="keep only the teacher's top-k logits (None: dense)")
    topk_tail: Literal["renormalise", "tail_bucket"] = "tail_bucket"
    base_teacher: bool = Field(False, description="ablation: the teacher without its task adapter")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = 0.0
    warmup_steps: int = Field(100, ge=0)
    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(4, ge=1)
    max_length: int = Field(256, ge=8)
    max_grad_norm: float | None = 1.0
    val_size: int = Field(500, ge=0, description="held-out items for validation / best-checkpoint selection")
    eval_every: int = Field(200, ge=1)
    save_every: int = Field(200, ge=1)
    log_every: int = Field(1, ge=1)
    seed: int = 6
    lora: LoraSettings | None = Field(default_factory=LoraSettings, description="None: full fine-tuning")
    prompt_style: str = "study"
    report_to: list[Literal["wandb", "mlflow"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "TrainSettings":
        if self.objective != "sft" and self.loss not in LOSS_NAMES:
            raise ValueError(f"loss {self.loss!r} is not one of {', '.join(LOSS_NAMES)}")
        return self
