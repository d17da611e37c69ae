"""`kdscope train sft|kd` and `kdscope cache-teacher`: training settings from options, one teacher wiring."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional, Sequence

import typer
from pydantic import ValidationError
from tqdm.auto import tqdm

from ..cache import TeacherCache, build_teacher_signal, cache_key, encode_sequences
from ..data import load_training_data
from ..distributed import PLACEMENTS, close_distributed, default_placement, init_distributed, place_teacher
from ..errors import InputError, one_line
from ..models import load_model
from ..teacher import logit_width
from ..train import TrainSettings, prepare_student, train
from .common import app, option_name, output_folder, user_errors


train_app = typer.Typer(help="Train students and teachers: SFT baselines and distillation.", no_args_is_help=True)
app.add_typer(train_app, name="train")

_LORA_HELP = "Train LoRA adapters (the study's r=8, alpha=16, dropout 0.05, q/k/v/up/down) or all weights."


def _settings(objective: str, **fields: object) -> TrainSettings:
    values = {k: v for k, v in fields.items() if v is not None}
    lora = values.pop("lora", True)
    try:
        settings = TrainSettings(objective=objective, **values)
        return settings if lora else settings.model_copy(update={"lora": None})
    except ValidationError as e:
        raise one_line(e, name=option_name) from None


def _train(student_ref: str, data: str, out: Path, settings: TrainSettings, resume: bool,
           teacher_ref: Optional[str] = None, teacher_adapter: Optional[Path] = None, device: str = "auto",
           teacher_placement: Optional[str] = None, teacher_devices: Sequence[str] = ()) -> None:
    """Train in this process, or as one rank of a data-parallel run when started by torchrun / accelerate launch."""
    output_folder(out)
    ctx = init_distributed(device)
    examples = load_training_data(data, seed=settings.seed)
    # built-in models always start from the same init (seed 0), so a saved adapter matches `builtin:<name>` later
    student, tokenizer = load_model(student_ref, device=str(ctx.device))
    teacher_signal = teacher_model = None
    if teacher_ref is not None:
        placement = teacher_placement or default_placement()
        if placement not in PLACEMENTS:
            raise InputError(f"--teacher-placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
        # a replicated teacher loads straight onto this rank's device; the others go through the CPU and
        # place_teacher moves (device, spread) or shards (fsdp, zero3) them
        teacher_model, teacher_tok = load_model(
            teacher_ref, adapter=teacher_adapter, device=str(ctx.device) if placement == "replicate" else "cpu",
            dtype=str(next(student.parameters()).dtype).removeprefix("torch."))
        teacher_width = logit_width(teacher_model)  # before placement: a sharded head no longer shows its shape
        teacher_model = place_teacher(teacher_model, placement, ctx, teacher_devices)  # type: ignore[arg-type]
        teacher_signal = build_teacher_signal(settings, teacher_model, teacher_tok, tokenizer, logit_width(student),
                                              teacher_width=teacher_width)
    result = train(prepare_student(student, settings), tokenizer, examples, settings, out,
                   teacher=teacher_signal, teacher_model=teacher_model, resume=resume, progress=ctx.is_main, dist=ctx)
    close_distributed(ctx)
    if ctx.is_main:
        typer.echo(f"trained {result.steps} steps; best validation loss {result.best_val_loss}; weights in {out / 'final'}")


# Options shared by `train sft` and `train kd`.
_Lora = Annotated[bool, typer.Option("--lora/--full", help=_LORA_HELP)]
_Epochs = Annotated[Optional[float], typer.Option(help="Epochs (default 3).")]
_MaxSteps = Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")]
_Lr = Annotated[Optional[float], typer.Option(help="Peak learning rate (default 3e-4).")]
_MicroBatchSize = Annotated[Optional[int], typer.Option(help="Micro-batch size (default 4).")]
_GradAccum = Annotated[Optional[int], typer.Option(help="Gradient accumulation steps (default 4).")]
_MaxLength = Annotated[Optional[int], typer.Option(help="Max tokens per example (default 256).")]
_ValSize = Annotated[Optional[int], typer.Option(help="Held-out items for best-checkpoint selection (default 500).")]
_Seed = Annotated[Optional[int], typer.Option(help="Seed (default 6, the study's).")]
_Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N, mps.")]
_Resume = Annotated[bool, typer.Option("--resume/--restart", help="Continue from the last checkpoint in --out.")]
_Fused = Annotated[Optional[bool], typer.Option(
    "--fused/--no-fused", help="LM head inside the loss, chunk by chunk: no [batch, seq, vocab] logits (default on; "
                               "same values).")]
_FusedBudget = Annotated[Optional[int], typer.Option(
    help="Bytes of vocabulary-wide temporaries per chunk of the fused losses (default "
         f"{TrainSettings.model_fields['fused_memory_budget'].default // 2**20} MiB); sets the chunk size.")]
_Reduction = Annotated[Optional[str], typer.Option(
    help="sequence_mean (mean per sequence, then over sequences) or token_mean; default the study's: sequence_mean "
         "for kd, token_mean for gkd, seqkd and sft.")]


@train_app.command("sft")
@user_errors
def train_sft_cmd(
    model: str = typer.Option(..., "--model", help="Model to fine-tune: hub id, folder, .gguf or builtin:<name>."),
    data: str = typer.Option(..., "--data", help="Training data: study JSON/JSONL with 'output', or synthetic:<domain>[:n]."),
    out: Path = typer.Option(..., "--out", help="Output folder (checkpoints, metrics.jsonl, final/)."),
    lora: _Lora = True,
    epochs: _Epochs = None,
    max_steps: _MaxSteps = None,
    lr: _Lr = None,
    micro_batch_size: _MicroBatchSize = None,
    grad_accum: _GradAccum = None,
    max_length: _MaxLength = None,
    val_size: _ValSize = None,
    seed: _Seed = None,
    device: _Device = "auto",
    resume: _Resume = True,
    reduction: _Reduction = None,
    fused: _Fused = None,
    fused_memory_budget: _FusedBudget = None,
) -> None:
    """Supervised fine-tuning (cross-entropy): the teacher and the SFT baselines."""
    settings = _settings("sft", lora=lora, epochs=epochs, max_steps=max_steps, lr=lr, micro_batch_size=micro_batch_size,
                         grad_accum=grad_accum, max_length=max_length, val_size=val_size, seed=seed,
                         reduction=reduction, fused=fused, fused_memory_budget=fused_memory_budget)
    _train(model, data, out, settings, resume, device=device)


@train_app.command("kd")
@user_errors
def train_kd_cmd(
    student: str = typer.Option(..., "--student", help="Student model: hub id, folder, .gguf or builtin:<name>."),
    teacher: str = typer.Option(..., "--teacher", help="Teacher base model (same tokenizer as the student, or any with --loss xtok_kl / uld)."),
    teacher_adapter: Optional[Path] = typer.Option(None, help="Teacher's LoRA adapter folder (from `train sft`)."),
    data: str = typer.Option(..., "--data", help="Training data: study JSON/JSONL with 'output', or synthetic:<domain>[:n]."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    objective: str = typer.Option("kd", help="kd (off-policy logits), gkd (on-policy mix), seqkd (teacher responses)."),
    loss: Optional[str] = typer.Option(None, help="forward_kl (SeqKD), reverse_kl (RevKD), jsd (GKD), skew_forward_kl, skew_reverse_kl, tvd; default forward_kl for kd, jsd for gkd. A teacher with another tokenizer: xtok_kl or uld."),
    temperature: Optional[float] = typer.Option(None, help="Logit temperature T (loss scaled by T^2); kd only (the study's GKD uses none)."),
    weight: Optional[float] = typer.Option(None, "--weight", help="w in (1-w)*CE + w*KD (default 1, the study's)."),
    beta: Optional[float] = typer.Option(None, help="JSD beta (default 0.5)."),
    lmbda: Optional[float] = typer.Option(None, "--lambda", help="GKD: probability of an on-policy batch (default 0.5)."),
    noise_sigma: Optional[float] = typer.Option(None, help="Ablation: Gaussian noise std on teacher logits."),
    base_teacher: bool = typer.Option(False, "--base-teacher", help="Ablation: teacher with its adapter disabled."),
    teacher_topk: Optional[int] = typer.Option(None, help="Use only the teacher's top-k logits."),
    token_mask: Optional[str] = typer.Option(None, help="all (prompt too, the study) or response."),
    reduction: _Reduction = None,
    max_new_tokens: Optional[int] = typer.Option(
        None, help="GKD samples / seqkd teacher responses: new tokens (default: max length - longest prompt)."),
    best_by: Optional[str] = typer.Option(
        None, help="Best checkpoint by ce (the student's validation cross-entropy, the study's) or objective."),
    lora: _Lora = True,
    epochs: _Epochs = None,
    max_steps: _MaxSteps = None,
    lr: _Lr = None,
    micro_batch_size: _MicroBatchSize = None,
    grad_accum: _GradAccum = None,
    max_length: _MaxLength = None,
    val_size: _ValSize = None,
    seed: _Seed = None,
    device: _Device = "auto",
    resume: _Resume = True,
    fused: _Fused = None,
    fused_memory_budget: _FusedBudget = None,
    teacher_placement: Optional[str] = typer.Option(
        None, help="replicate, device, spread, fsdp or zero3 (default: replicate, or what the accelerate config "
                   "asks for); see docs/scale-out.md."),
    teacher_device: list[str] = typer.Option([], "--teacher-device", help="Teacher GPU(s) for placement device/spread."),
) -> None:
    """Distil a teacher into a student (forward/reverse KL, JSD/GKD, sequence-level KD) with the study's ablations."""
    if objective not in ("kd", "gkd", "seqkd"):
        raise InputError(f"--objective {objective!r}: use kd, gkd or seqkd")
    if base_teacher and teacher_adapter is None:
        raise InputError("--base-teacher disables the teacher's adapter; give --teacher-adapter too")
    settings = _settings(objective, loss=loss, temperature=temperature, kd_weight=weight, beta=beta, lmbda=lmbda,
                         noise_sigma=noise_sigma, base_teacher=base_teacher or None, teacher_topk=teacher_topk,
                         token_mask=token_mask, reduction=reduction, max_new_tokens=max_new_tokens, best_by=best_by,
                         lora=lora, epochs=epochs, max_steps=max_steps, lr=lr,
                         micro_batch_size=micro_batch_size, grad_accum=grad_accum, max_length=max_length,
                         val_size=val_size, seed=seed, fused=fused, fused_memory_budget=fused_memory_budget)
    _train(student, data, out, settings, resume, teacher_ref=teacher, teacher_adapter=teacher_adapter, device=device,
           teacher_placement=teacher_placement, teacher_devices=teacher_device)


@app.command("cache-teacher")
@user_errors
def cache_teacher_cmd(
    teacher: str = typer.Option(..., "--teacher", help="Teacher base model: hub id, folder, .gguf or builtin:<name>."),
    teacher_adapter: Optional[Path] = typer.Option(None, "--teacher-adapter", help="Teacher's LoRA adapter folder."),
    data: str = typer.Option(..., "--data", help="Training data: study JSON/JSONL with 'output', or synthetic:<domain>[:n]."),
    out: Path = typer.Option(..., "--out", help="Cache folder (rerun with the same options to resume)."),
    k: int = typer.Option(64, "--k", help="Top-k logits kept per position."),
    temperatures: str = typer.Option("1,2,5", "--temperatures", help="Comma-separated loss temperatures the cache serves."),
    max_length: int = typer.Option(256, "--max-length", help="Max tokens per example (as in training)."),
    prompt_style: str = typer.Option("study", "--prompt-style", help="Prompt template (as in training)."),
    shard_size: int = typer.Option(256, "--shard-size", help="Sequences per shard (the unit of resumption)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per teacher forward pass."),
    codec: str = typer.Option("zlib", "--codec", help="zlib (default), lzma (smaller, slower) or none (raw, zero-copy reads)."),
    vocab_width: Optional[int] = typer.Option(None, "--vocab-width", help="Cut teacher logits to this width (the student's)."),
    seed: int = typer.Option(0, "--seed", help="Data seed (synthetic data) and init seed of builtin: models."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps."),
    progress: bool = typer.Option(True, "--progress/--quiet", help="Show a progress bar."),
) -> None:
    """Run the teacher once over a training set and store its top-k signal (compressed, sharded, indexed) for KD."""
    try:
        temps = [float(t) for t in temperatures.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--temperatures {temperatures!r}: give comma-separated numbers, e.g. 1,2,5") from None
    output_folder(out)
    examples = load_training_data(data, seed=seed)
    model, tokenizer = load_model(teacher, adapter=teacher_adapter, device=device, seed=seed)
    sequences = encode_sequences(tokenizer, examples, prompt_style, max_length)
    key = cache_key(teacher, teacher_adapter, tokenizer, sequences, prompt_style, k, max_length, vocab_width, model)
    with tqdm(total=len({tuple(s) for s in sequences}), desc="cache teacher", unit="seq", disable=not progress) as bar:
        cache = TeacherCache.build(out, key, model, sequences, tokenizer.pad_token_id, temps, shard_size, batch_size,
                                   codec, on_batch=bar.update)  # type: ignore[arg-type]
    typer.echo(f"cached {len(cache)} sequences, top-{cache.k}, temperatures {cache.temperatures}, "
               f"{cache.bytes_per_token():.0f} bytes/token in {out}")
