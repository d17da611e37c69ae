"""`TrainSettings`: every training default and its validation, in one place.

The CLI (`kdscope train sft|kd`) and the study YAML (``training.*``) both build one of these; a field added here is an
option in both. Defaults follow the study's recipe (study.md section 2).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..fused import DEFAULT_MEMORY_BUDGET_BYTES
from ..losses import LOSS_NAMES
from ..models import LoraSettings
from ..xtok import XTOK_LOSS_NAMES

Objective = Literal["sft", "kd", "gkd", "seqkd"]
Reduction = Literal["token_mean", "sequence_mean"]

# The study's choices per objective (study.md section 2; restated in tests/test_study_reference.py).
DEFAULT_LOSS: dict[str, str | None] = {"sft": None, "seqkd": None, "kd": "forward_kl", "gkd": "jsd"}
DEFAULT_REDUCTION: dict[str, Reduction] = {
    "kd": "sequence_mean",  # its forward/reverse KL: mean over each sequence's positions, then over sequences
    "gkd": "token_mean",  # its generalized JSD: one mean over the micro-batch's masked positions
    "sft": "token_mean",  # Hugging Face's cross-entropy
    "seqkd": "token_mean",
}
# Options that sequence-level KD (cross-entropy on the teacher's responses) has no use for: setting one is an error.
SEQKD_IGNORES = ("loss", "temperature", "beta", "alpha", "lmbda", "kd_weight", "noise_sigma", "base_teacher",
                 "teacher_topk")


class TrainSettings(BaseModel):
    """Everything that determines a training run. Defaults follow the study's recipe (study.md section 2)."""

    model_config = ConfigDict(extra="forbid")

    objective: Objective = "sft"
    loss: str | None = Field(None, description="KD divergence: forward_kl, reverse_kl, jsd, skew_forward_kl, "
                             "skew_reverse_kl, tvd; default the study's: forward_kl (kd), jsd (gkd); a teacher with another "
                             "tokenizer: xtok_kl (exact KL on the shared vocabulary) or uld (kdscope.xtok)")
    temperature: float = Field(1.0, gt=0, description="T: logits divided by T, loss times T^2 (kd only; the "
                               "study's GKD uses none)")
    kd_weight: float = Field(1.0, ge=0, le=1, description="w in (1-w)*CE + w*KD; the study used 1")
    beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation (GKD)")
    alpha: float = Field(0.1, ge=0, le=1, description="skew for skew KL losses")
    scale_by_t2: bool = True
    token_mask: Literal["all", "response"] = Field("all", description="'all': prompt too, as the study")
    reduction: Reduction | None = Field(
        None, description="sequence_mean: mean over each sequence, then over the sequences; token_mean: one mean "
        "over all tokens of the window; default the study's: sequence_mean for kd, token_mean otherwise"
    )
    lmbda: float = Field(0.5, ge=0, le=1, description="GKD: probability that a step uses the student's own samples")
    sample_temperature: float = Field(1.0, gt=0, description="GKD on-policy sampling temperature")
    max_new_tokens: int | None = Field(
        None, ge=1, description="GKD samples / seqKD teacher responses: new tokens; default the study's: max_length "
        "minus the longest prompt of the batch")
    noise_sigma: float = Field(0.0, ge=0, description="std of Gaussian noise added to teacher logits")
    teacher_topk: int | None = Field(None, ge=1, description="keep only the teacher's top-k logits (None: dense)")
    topk_tail: Literal["renormalise", "tail_bucket"] = "tail_bucket"
    base_teacher: bool = Field(False, description="ablation: the teacher without its task adapter")
    fused: bool = Field(True, description="run the LM heads inside the losses, chunk by chunk, so no [batch, seq, "
                        "vocab] logits exist (kdscope.fused; same values); models whose logits are not head(hidden) "
                        "use full logits, announced once in the log")
    fused_memory_budget: int = Field(
        DEFAULT_MEMORY_BUDGET_BYTES, ge=1, description="bytes of vocabulary-wide temporaries one chunk of the fused "
        "losses may hold; sets the chunk size (kdscope.fused.chunk_rows), not the values")
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
    best_by: Literal["ce", "objective"] = Field(
        "ce", description="best checkpoint by the student's validation cross-entropy (the study's) or by the "
        "training objective")
    eval_every: int = Field(200, ge=1)
    save_every: int = Field(200, ge=1)
    log_every: int = Field(1, ge=1)
    seed: int = 6
    lora: LoraSettings | None = Field(default_factory=LoraSettings, description="None: full fine-tuning")
    prompt_style: str = "study"
    report_to: list[Literal["wandb", "mlflow"]] = Field(default_factory=list)

    @field_validator(*SEQKD_IGNORES)
    @classmethod
    def _honoured(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse an option the objective would silently ignore (runs only on values given, not on defaults)."""
        objective, name = info.data.get("objective"), info.field_name
        if name == "loss" and value is not None and value not in LOSS_NAMES + XTOK_LOSS_NAMES:
            raise ValueError(f"{value!r} is not one of {', '.join(LOSS_NAMES + XTOK_LOSS_NAMES)}")
        default = cls.model_fields[str(name)].get_default(call_default_factory=True)
        if objective == "seqkd" and value != default:
            raise ValueError(f"objective seqkd trains on the teacher's responses with cross-entropy and cannot "
                             f"honour {name}={value!r}; drop it, or use objective kd or gkd")
        if objective == "gkd" and name == "temperature" and value != 1.0:
            raise ValueError(f"the study's GKD uses no temperature (T=1), got {value}; drop it, or use objective kd")
        return value

    @model_validator(mode="after")
    def _resolve(self) -> "TrainSettings":
        """Fill the per-objective defaults, so what is stored and shown is what runs."""
        if self.loss is None:
            self.loss = DEFAULT_LOSS[self.objective]
        if self.reduction is None:
            self.reduction = DEFAULT_REDUCTION[self.objective]
        return self

    @property
    def resolved_reduction(self) -> Reduction:
        return self.reduction or DEFAULT_REDUCTION[self.objective]
