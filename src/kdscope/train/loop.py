"""Training: SFT (cross-entropy), off-policy logit KD, GKD (on-policy) and sequence-level KD, exactly resumable.

Determinism and resume: the data order for the whole run is fixed up front from the seed, and every optimizer step
re-seeds torch (dropout, on-policy sampling, teacher noise) from ``(seed, step)``. A step is then a pure function of
(weights, optimizer state, step), so a run resumed from a checkpoint follows the same loss curve as one that never
stopped, with no RNG state to carry.

Normalisation under gradient accumulation: the loss of a micro-batch is divided by the token (or sequence) count of
the whole accumulation window, so a batch of 16 as 1x16 or 4x4 gives the same gradient.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import BaseModel, Field, model_validator

from .data import Example, build_prompt
from .errors import InputError
from .losses import LOSS_NAMES, cross_entropy_parts, distill_loss_parts, distill_loss_sparse
from .distributed import SINGLE, DistContext, check_window
from .models import LoraSettings, attach_lora, save_model
from .teacher import TeacherOutput, align_vocab

Objective = Literal["sft", "kd", "gkd", "seqkd"]


class TrainSettings(BaseModel):
    """Everything that determines a training run. Defaults follow the study's recipe (study.md section 2)."""

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


# --------------------------------------------------------------------------------------------------------------------
# Tokenisation and batches
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    input_ids: list[int]
    prompt_len: int


def encode_example(tokenizer: Any, ex: Example, style: str, max_length: int, response: str | None = None) -> Encoded:
    """Prompt + response + EOS, truncated to ``max_length`` like the study (EOS only when there is room)."""
    prompt = build_prompt(ex, style, train=True)
    text = prompt + (ex.output if response is None else response)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
    if len(ids) < max_length and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    prompt_len = min(len(tokenizer(prompt, add_special_tokens=False)["input_ids"]), len(ids))
    return Encoded(ids, prompt_len)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L], right padded
    attention_mask: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L-1]: which next-token predictions count
    prompts: list[list[int]]  # prompt ids of each row (for on-policy sampling)

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device), self.prompts)


def collate(items: Sequence[Encoded], pad_id: int, token_mask: str) -> Batch:
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    for i, e in enumerate(items):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attn[i, : len(e.input_ids)] = 1
    target_mask = attn[:, 1:].clone()
    if token_mask == "response":
        for i, e in enumerate(items):
            target_mask[i, : max(e.prompt_len - 1, 0)] = 0
    return Batch(ids, attn, target_mask, [e.input_ids[: e.prompt_len] for e in items])


def batch_schedule(n_items: int, settings: TrainSettings) -> list[list[list[int]]]:
    """The whole run's data order: a list of optimizer steps, each a list of micro-batches of item indices."""
    per_step = settings.micro_batch_size * settings.grad_accum
    steps_per_epoch = max(1, math.ceil(n_items / per_step))
    total = settings.max_steps or max(1, math.ceil(settings.epochs * steps_per_epoch))
    order: list[int] = []
    epoch = 0
    while len(order) < total * per_step:
        perm = list(range(n_items))
        random.Random(f"{settings.seed}:epoch:{epoch}").shuffle(perm)
        order.extend(perm)
        epoch += 1
    mb = settings.micro_batch_size
    return [
        [order[s * per_step + a * mb: s * per_step + (a + 1) * mb] for a in range(settings.grad_accum)]
        for s in range(total)
    ]


def split_validation(examples: Sequence[Example], val_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    if val_size and len(examples) <= val_size:
        raise InputError(f"val_size={val_size} but only {len(examples)} training examples; lower training.val_size")
    idx = list(range(len(examples)))
    random.Random(f"{seed}:val").shuffle(idx)
    val = sorted(idx[:val_size])
    val_set = set(val)
    return [examples[i] for i in idx if i not in val_set], [examples[i] for i in val]


# --------------------------------------------------------------------------------------------------------------------
# Losses on a batch
# --------------------------------------------------------------------------------------------------------------------
TeacherFn = Callable[[torch.Tensor, torch.Tensor], TeacherOutput]  # e.g. kdscope.teacher.OnlineTeacher


def units(mask: torch.Tensor, reduction: str) -> int:
    """How many units (tokens or sequences) a micro-batch contributes to its accumulation window's denominator."""
    return int(mask.sum()) if reduction == "token_mean" else int((mask.sum(-1) > 0).sum())


@dataclass
class StepLosses:
    total: torch.Tensor
    ce: float
    kd: float


def batch_loss(
    student: Any, batch: Batch, settings: TrainSettings, teacher: TeacherFn | None, denom: int
) -> StepLosses:
    """(1-w)*CE + w*KD of one micro-batch, as a share of the accumulation window (``denom`` units)."""
    logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    mask = batch.loss_mask
    w = settings.kd_weight if settings.objective in ("kd", "gkd") else 0.0
    zero = logits.new_zeros(())
    ce_sum = zero
    if w < 1:  # the study's w = 1 needs no cross-entropy pass
        ce_sum = cross_entropy_parts(logits, batch.input_ids[:, 1:], mask, reduction=settings.reduction).total
    kd_sum = zero
    if w > 0:
        assert teacher is not None
        kd_sum = _kd_sum(logits, teacher(batch.input_ids, batch.attention_mask), mask, settings)
    total = ((1 - w) * ce_sum + w * kd_sum) / max(denom, 1)
    return StepLosses(total, float(ce_sum.detach()) / max(denom, 1), float(kd_sum.detach()) / max(denom, 1))


def _kd_sum(logits: torch.Tensor, signal: TeacherOutput, mask: torch.Tensor, settings: TrainSettings) -> torch.Tensor:
    """Sum of the KD divergence over the micro-batch's units, from a dense or a top-k teacher signal."""
    kw = dict(loss=settings.loss, temperature=settings.temperature, beta=settings.beta, alpha=settings.alpha,
              scale_by_t2=settings.scale_by_t2)
    if signal.logits is not None:
        t_logits = signal.logits[:, :-1]
        if t_logits.shape[-1] != logits.shape[-1]:  # e.g. Qwen2.5-7B (152064) -> 0.5B (151936)
            logits, t_logits = align_vocab(logits, t_logits)
        return distill_loss_parts(logits, t_logits, mask, reduction=settings.reduction, **kw).total
    if settings.reduction != "token_mean":
        raise InputError("a top-k teacher signal supports reduction token_mean only")
    mean = distill_loss_sparse(logits, signal.topk_values[:, :-1], signal.topk_indices[:, :-1], mask,
                               teacher_log_normalizer=signal.topk_log_normalizer[:, :-1], tail=settings.topk_tail, **kw)
    return mean * mask.sum()


# --------------------------------------------------------------------------------------------------------------------
# On-policy samples (GKD) and teacher responses (sequence-level KD)
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_continuations(
    model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, temperature: float | None
) -> list[list[int]]:
    """Sample (or, with temperature None, greedily decode) continuations of tokenised prompts; cut after EOS."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    was_training = model.training
    model.eval()
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {"do_sample": False}
    out = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device),
                         max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **sampling)
    model.train(was_training)
    result = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        result.append(row)
    return result


def on_policy_batch(student: Any, tokenizer: Any, batch: Batch, settings: TrainSettings) -> Batch:
    """Replace a batch's responses by the student's own samples for the same prompts."""
    samples = sample_continuations(student, tokenizer, batch.prompts, settings.max_new_tokens, settings.sample_temperature)
    items = [Encoded(p + s, len(p)) for p, s in zip(batch.prompts, samples)]
    return collate(items, tokenizer.pad_token_id, settings.token_mask).to(batch.input_ids.device)


def teacher_responses(teacher: Any, tokenizer: Any, examples: Sequence[Example], settings: TrainSettings,
                      batch_size: int = 16) -> list[str]:
    """Greedy teacher responses for sequence-level KD (Kim & Rush): the student is then trained on them with CE."""
    out: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        prompts = [tokenizer(build_prompt(e, settings.prompt_style, train=True), add_special_tokens=False)["input_ids"]
                   for e in chunk]
        for ids in sample_continuations(teacher, tokenizer, prompts, settings.max_new_tokens, None):
            out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------
CHECKPOINT_STATE = "trainer_state.json"


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any],
                    teacher: Any = None) -> None:
    """Weights as safetensors; optimizer/scheduler via torch.save (reloaded with weights_only=True); atomic rename."""
    from safetensors.torch import save_file

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
    from safetensors.torch import load_file

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


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    ckpts = [c for c in ckpts if (c / CHECKPOINT_STATE).is_file()]
    return ckpts[-1] if ckpts else None


# --------------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------------
def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then linear decay to 0 (transformers' get_linear_schedule_with_warmup)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class MetricLog:
    """Per-step metrics as JSONL (appended, so a resumed run continues the same file), plus W&B / MLflow."""

    def __init__(self, path: Path, report_to: Sequence[str], run_name: str, config: dict[str, Any]) -> None:
        self.path = path
        self.sinks: list[Any] = []
        if "wandb" in report_to:
            import wandb

            self.sinks.append(wandb.init(name=run_name, config=config, resume="allow"))
        if "mlflow" in report_to:
            import mlflow

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


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    best_val_loss: float | None
    history: list[dict[str, Any]]


def prepare_student(model: Any, settings: TrainSettings) -> Any:
    """Attach fresh LoRA adapters (or train all weights when ``settings.lora`` is None)."""
    if settings.lora is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    with torch.random.fork_rng(devices=[]):  # LoRA's A matrices are random: seed them so runs are reproducible
        torch.manual_seed(settings.seed)
        return attach_lora(model, settings.lora)


def train(
    student: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    settings: TrainSettings,
    out_dir: str | Path,
    teacher: TeacherFn | None = None,
    teacher_model: Any = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    dist: DistContext = SINGLE,
) -> TrainResult:
    """Train ``student`` (already wrapped by `prepare_student`) and save the best weights to ``out_dir/final``.

    ``teacher`` maps (input_ids, attention_mask) to teacher logits aligned with the student's vocabulary (see
    kdscope.teacher); required for kd/gkd. ``teacher_model`` generates responses for seqkd. ``stop_after`` ends the
    run early after that many steps (used to test resumption); the checkpoint then allows ``resume``.

    ``dist`` (from `kdscope.distributed.init_distributed`) makes this one rank of a data-parallel run: every rank
    calls `train` with the same arguments, runs its share of each window and steps identically; rank 0 writes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if settings.objective in ("kd", "gkd") and settings.kd_weight > 0 and teacher is None:
        raise InputError(f"objective {settings.objective} needs a teacher; give --teacher")
    check_window(settings.grad_accum, dist)
    train_set, val_set = split_validation(examples, settings.val_size, settings.seed)
    responses = None
    if settings.objective == "seqkd":
        if teacher_model is None:
            raise InputError("objective seqkd needs a teacher model to generate the training responses; give --teacher")
        responses = _cached_teacher_responses(out, teacher_model, tokenizer, train_set, settings)
    encoded = [encode_example(tokenizer, ex, settings.prompt_style, settings.max_length,
                              None if responses is None else responses[i]) for i, ex in enumerate(train_set)]
    val_encoded = [encode_example(tokenizer, ex, settings.prompt_style, settings.max_length) for ex in val_set]
    schedule = batch_schedule(len(encoded), settings)
    device = next(student.parameters()).device

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = linear_warmup_decay(optimizer, settings.warmup_steps, len(schedule))
    log = MetricLog(out / "metrics.jsonl", settings.report_to, out.name, settings.model_dump()) if dist.is_main else None

    start, best_val, history = 0, None, []
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, student, optimizer, scheduler, teacher)
        start, best_val, history = state["step"], state["best_val_loss"], state["history"]
        if log is not None:
            log.truncate_after(start)
    elif not resume and dist.is_main:
        (out / "metrics.jsonl").unlink(missing_ok=True)

    bar = _progress(len(schedule), start, f"train {settings.objective}", progress and dist.is_main)
    student.train()
    for step in range(start, len(schedule)):
        torch.manual_seed(_step_seed(settings.seed, step))
        record = _train_step(student, tokenizer, encoded, schedule[step], settings, teacher, optimizer, scheduler,
                             device, step, dist)
        done = step + 1
        if val_encoded and (done % settings.eval_every == 0 or done == len(schedule)):
            record["val_loss"] = validation_loss(student, val_encoded, tokenizer, settings, teacher, device)
            if best_val is None or record["val_loss"] < best_val:
                best_val = record["val_loss"]
                if dist.is_main:
                    _save_weights(student, tokenizer, out / "best")
        history.append(record)
        if log is not None and (done % settings.log_every == 0 or "val_loss" in record):
            log.log(record)
        if dist.is_main and (done % settings.save_every == 0 or done == len(schedule) or done == stop_after):
            save_checkpoint(out / f"checkpoint-{done}", student, optimizer, scheduler,
                            {"step": done, "best_val_loss": best_val, "history": history}, teacher)
            _prune_checkpoints(out, keep=2)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if stop_after is not None and done >= stop_after:
            bar.close()
            dist.barrier()  # the checkpoint is on disk before any rank returns
            return TrainResult(out, done, best_val, history)
    bar.close()
    if dist.is_main:
        _write_final(student, tokenizer, out, settings, len(schedule), best_val)
    dist.barrier()
    return TrainResult(out, len(schedule), best_val, history)


def _write_final(student: Any, tokenizer: Any, out: Path, settings: TrainSettings, steps: int,
                 best_val: float | None) -> None:
    final = out / "final"
    if (out / "best").is_dir():
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(out / "best", final)
    else:
        _save_weights(student, tokenizer, final)
    (out / "train_summary.json").write_text(json.dumps(
        {"steps": steps, "best_val_loss": best_val, "settings": settings.model_dump()}, indent=1))


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def _micro_seed(seed: int, step: int, micro: int, phase: int) -> int:
    """Seed of one micro-batch's sampling (phase 0) or forward (phase 1): the same whichever rank runs it."""
    return (_step_seed(seed, step) * 4099 + 2 * micro + phase) % (2**63)


def _train_step(student: Any, tokenizer: Any, encoded: list[Encoded], micro_batches: list[list[int]],
                settings: TrainSettings, teacher: TeacherFn | None, optimizer: Any, scheduler: Any,
                device: torch.device, step: int, dist: DistContext = SINGLE) -> dict[str, Any]:
    # this rank's share of the window (all of it in a single process), with each micro-batch's global index
    mine = [(a, collate([encoded[i] for i in mb], tokenizer.pad_token_id, settings.token_mask).to(device))
            for a, mb in dist.shard(micro_batches) if mb]
    on_policy = settings.objective == "gkd" and random.Random(f"{settings.seed}:gkd:{step}").random() < settings.lmbda
    if on_policy:
        batches = []
        for a, b in mine:
            torch.manual_seed(_micro_seed(settings.seed, step, a, 0))
            batches.append((a, on_policy_batch(student, tokenizer, b, settings)))
        mine = batches
    # the normaliser is the whole window's unit count, summed over ranks (on-policy samples change it)
    (denom,) = dist.sum_values([sum(units(b.loss_mask, settings.reduction) for _, b in mine)])
    t0 = time.perf_counter()
    loss = ce = kd = 0.0
    for a, b in mine:
        torch.manual_seed(_micro_seed(settings.seed, step, a, 1))
        parts = batch_loss(student, b, settings, teacher, int(denom))
        parts.total.backward()
        loss += float(parts.total.detach())
        ce += parts.ce
        kd += parts.kd
    params = [p for p in student.parameters() if p.requires_grad]
    dist.sum_gradients(params)
    grad_norm = None
    if settings.max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b.attention_mask.sum()) for _, b in mine)
    loss, ce, kd, tokens = dist.sum_values([loss, ce, kd, tokens])
    return {"step": step + 1, "loss": loss, "ce": ce, "kd": kd, "on_policy": on_policy, "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm, "tokens": int(tokens), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def validation_loss(student: Any, val_encoded: list[Encoded], tokenizer: Any, settings: TrainSettings,
                    teacher: TeacherFn | None, device: torch.device) -> float:
    """The training objective (off-policy) on the held-out set, normalised over the whole set."""
    was_training = student.training
    student.eval()
    mb = settings.micro_batch_size
    batches = [collate(val_encoded[i: i + mb], tokenizer.pad_token_id, settings.token_mask).to(device)
               for i in range(0, len(val_encoded), mb)]
    denom = sum(units(b.loss_mask, settings.reduction) for b in batches)
    total = sum(float(batch_loss(student, b, settings, teacher, denom).total) for b in batches)
    student.train(was_training)
    return total


def _save_weights(model: Any, tokenizer: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _prune_checkpoints(out: Path, keep: int) -> None:
    ckpts = sorted((c for c in out.glob("checkpoint-*") if c.name.split("-")[1].isdigit()),
                   key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _cached_teacher_responses(out: Path, teacher_model: Any, tokenizer: Any, train_set: Sequence[Example],
                              settings: TrainSettings) -> list[str]:
    path = out / "teacher_responses.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if len(cached) == len(train_set):
            return cached
    responses = teacher_responses(teacher_model, tokenizer, train_set, settings)
    path.write_text(json.dumps(responses))
    return responses


def _progress(total: int, start: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, disable=not enabled)


def load_trained(base_ref: str, trained_dir: str | Path, **load_kwargs: Any) -> tuple[Any, Any]:
    """Load a model trained by `train`: LoRA adapter on ``base_ref``, or full weights saved in ``trained_dir``."""
    from .models import load_model

    trained = Path(trained_dir)
    if (trained / "adapter_config.json").is_file():
        return load_model(base_ref, adapter=trained, **load_kwargs)
    return load_model(str(trained), **load_kwargs)
