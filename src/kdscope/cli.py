"""The `kdscope` command line: a thin typer layer over the pipeline modules.

Every command turns an `InputError` into a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional, Sequence, TypeVar

import typer
from pydantic import ValidationError

from . import __version__
from .errors import InputError, one_line

if TYPE_CHECKING:
    from .train import TrainSettings

app = typer.Typer(
    help="kdscope: run, measure and explain knowledge-distillation studies of causal language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
F = TypeVar("F", bound=Callable[..., object])


def user_errors(fn: F) -> F:
    """Report bad input as one line on stderr with exit code 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
            # a path given on the command line that is of the wrong kind (a file where a folder goes, ...)
            typer.echo(f"error: {e.filename or 'a path'}: {e.strerror or e}; check the paths given on the command line",
                       err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def output_folder(path: Path, option: str = "--out") -> Path:
    """Refuse an output folder that names an existing file before any work starts (and never overwrite the file)."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path}: is a file; give a folder (new or from an earlier run)")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise InputError(f"{option} {path}: {blocking} is a file, so no folder can be made inside it")
    return path


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdscope {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Distil teachers into students, evaluate them on the study's 14 tasks, and analyse the results."""


@app.command("tasks")
@user_errors
def tasks_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="A study dataset folder (<task>/test.json); adds item counts."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the study's 14 tasks: domain, answer type, scoring rule, and loaded size when --data is given."""
    from .data import find_task_file, load_examples
    from .tasks import TASKS

    rows = []
    for task in TASKS.values():
        row: dict[str, object] = {
            "task": task.name,
            "domain": task.domain,
            "answer_type": task.answer_type,
            "study_folder": task.study_folder,
            "answers": "/".join(task.choices) or "number (last, +-0.001)",
            "study_test_size": task.test_size,
        }
        if data is not None:
            found = find_task_file(data, task.name)
            row["loaded"] = len(load_examples(found)) if found else None
        rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kdscope tasks")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*("-" if v is None else str(v) for v in row.values()))
    Console().print(table)


@app.command("score")
@user_errors
def score_cmd(
    task: str = typer.Option(..., "--task", help="Task name or alias (e.g. gsm8k, ARC-Easy)."),
    predictions: Path = typer.Option(..., "--predictions", help="JSON list or JSONL with 'answer' and a text field."),
    field: str = typer.Option("output", "--field", help="Field holding the generated text (the study saved 'output_pred')."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object."),
) -> None:
    """Re-score saved generations with the study's exact parsing and correctness rule."""
    from .evaluation import score_records

    try:
        summary = score_records(task, predictions, field)
    except KeyError as e:
        raise InputError(str(e.args[0])) from None
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"{summary['task']}: {summary['correct']}/{summary['n']} correct, accuracy {summary['accuracy']:.4f}")


train_app = typer.Typer(help="Train students and teachers: SFT baselines and distillation.", no_args_is_help=True)
app.add_typer(train_app, name="train")

_LORA_HELP = "Train LoRA adapters (the study's r=8, alpha=16, dropout 0.05, q/k/v/up/down) or all weights."


def _settings(objective: str, **fields: object) -> "TrainSettings":
    from .train import TrainSettings

    values = {k: v for k, v in fields.items() if v is not None}
    lora = values.pop("lora", True)
    try:
        settings = TrainSettings(objective=objective, **values)
        return settings if lora else settings.model_copy(update={"lora": None})
    except ValidationError as e:
        raise one_line(e, name=_option_name) from None


# TrainSettings fields whose command-line option is not simply the field name with dashes
_OPTION_OF_FIELD = {"kd_weight": "--weight", "lmbda": "--lambda", "objective": "--objective"}


def _option_name(loc: Sequence[object]) -> str:
    """The option a user typed for a TrainSettings field (pydantic reports the field: kd_weight is --weight)."""
    field = str(loc[0])
    return _OPTION_OF_FIELD.get(field, "--" + field.replace("_", "-"))


def _train(student_ref: str, data: str, out: Path, settings: "TrainSettings", resume: bool,
           teacher_ref: Optional[str] = None, teacher_adapter: Optional[Path] = None, device: str = "auto",
           teacher_placement: Optional[str] = None, teacher_devices: Sequence[str] = ()) -> None:
    """Train in this process, or as one rank of a data-parallel run when started by torchrun / accelerate launch."""
    from .data import load_training_data
    from .distributed import PLACEMENTS, close_distributed, default_placement, init_distributed, place_teacher
    from .cache import build_teacher_signal
    from .models import load_model
    from .teacher import logit_width
    from .train import prepare_student, train

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
) -> None:
    """Supervised fine-tuning (cross-entropy): the teacher and the SFT baselines."""
    settings = _settings("sft", lora=lora, epochs=epochs, max_steps=max_steps, lr=lr, micro_batch_size=micro_batch_size,
                         grad_accum=grad_accum, max_length=max_length, val_size=val_size, seed=seed,
                         reduction=reduction)
    _train(model, data, out, settings, resume, device=device)


@train_app.command("kd")
@user_errors
def train_kd_cmd(
    student: str = typer.Option(..., "--student", help="Student model: hub id, folder, .gguf or builtin:<name>."),
    teacher: str = typer.Option(..., "--teacher", help="Teacher base model (same tokenizer as the student)."),
    teacher_adapter: Optional[Path] = typer.Option(None, help="Teacher's LoRA adapter folder (from `train sft`)."),
    data: str = typer.Option(..., "--data", help="Training data: study JSON/JSONL with 'output', or synthetic:<domain>[:n]."),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    objective: str = typer.Option("kd", help="kd (off-policy logits), gkd (on-policy mix), seqkd (teacher responses)."),
    loss: Optional[str] = typer.Option(None, help="forward_kl (SeqKD), reverse_kl (RevKD), jsd (GKD), skew_forward_kl, skew_reverse_kl, tvd; default forward_kl for kd, jsd for gkd."),
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
                         val_size=val_size, seed=seed)
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
    from tqdm.auto import tqdm

    from .cache import TeacherCache, cache_key, encode_sequences
    from .data import load_training_data
    from .models import load_model

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


@app.command("stats")
@user_errors
def stats_cmd(
    results: list[Path] = typer.Argument(..., help="Result tables in the study's CSV layout (several files are concatenated)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every test as a list of JSON records here."),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Write study-style Markdown tables here."),
    agreement: list[Path] = typer.Option([], "--agreement", help="Agreement table(s), layout of the study's EM1*.csv."),
    fidelity: list[Path] = typer.Option([], "--fidelity", help="Fidelity table(s), layout of the study's BLEU*.csv."),
    items: Optional[Path] = typer.Option(None, "--items", help="Per-item records (Teacher, Student, Method, task, item, correct)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap intervals."),
) -> None:
    """Reproduce the study's statistical analysis (t-tests, ANOVA, Spearman) and add adjusted p-values, effect sizes,
    robustness tests and a regression. Prints the headline tests (Average, pooled over methods)."""
    from .stats import (ITEM_COLUMNS, analyse, headline, json_ready, markdown_report, read_side_tables, read_tables,
                        require_analysable)

    for option, target in (("--json", json_out), ("--markdown", markdown_out)):
        if target is not None and target.is_dir():
            raise InputError(f"{option} {target}: is a folder; give a file path, e.g. {target / 'stats.json'}"
                             if option == "--json" else
                             f"{option} {target}: is a folder; give a file path, e.g. {target / 'stats.md'}")
    table = read_tables(results)
    require_analysable(table, results)
    records = analyse(table, read_side_tables(agreement), read_side_tables(fidelity), seed,
                      read_side_tables([items] if items else [], ITEM_COLUMNS))
    if json_out is not None:
        json_out.write_text(json.dumps(json_ready(records), indent=1))
    if markdown_out is not None:
        markdown_out.write_text(markdown_report(records))
    typer.echo("\n".join(headline(records)))


@app.command("report")
@user_errors
def report_cmd(
    results: list[Path] = typer.Argument(..., help="Result tables in the study's CSV layout, or a study folder."),
    out: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write; the Markdown twin goes beside it."),
    agreement: list[Path] = typer.Option([], "--agreement", help="Agreement table(s), layout of the study's EM1*.csv."),
    fidelity: list[Path] = typer.Option([], "--fidelity", help="Fidelity table(s), layout of the study's BLEU*.csv."),
    joint: Optional[Path] = typer.Option(None, "--joint", help="Joint-correctness table (Teacher, Student, Method, task, both, teacher_only, student_only, neither)."),
    title: str = typer.Option("kdscope report", "--title", help="Page title."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap intervals."),
) -> None:
    """Render one self-contained HTML report (tables, tests, plots) and a Markdown twin.

    Given a study folder (with study.sqlite), the report is rendered from the study's store."""
    from .report import JOINT_COLUMNS, render_report
    from .stats import read_side_tables, read_tables

    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; give an HTML file path, e.g. {out / 'report.html'}")
    if len(results) == 1 and (results[0] / "study.sqlite").is_file():
        from .study.tables import report_from_store

        path = report_from_store(results[0], out, seed=seed)
        typer.echo(f"wrote {path} and {path.with_suffix('.md')}")
        return
    path = render_report(read_tables(results), out, read_side_tables(agreement), read_side_tables(fidelity),
                         read_side_tables([joint] if joint else [], JOINT_COLUMNS), title=title, seed=seed)
    typer.echo(f"wrote {path} and {path.with_suffix('.md')}")


def _run_study(study_path: Path, out: Optional[Path], progress: bool, redo: Sequence[str] = ()) -> Path:
    from .study import load_study, run_study, study_dir

    study = load_study(study_path)
    root = output_folder(study_dir(study, out))
    summary = run_study(study, root, progress=progress, log=lambda m: typer.echo(m, err=True), redo=redo)
    typer.echo(f"{len(summary.ran)} jobs run, {len(summary.skipped)} already done, {len(summary.failed)} failed, "
               f"{len(summary.blocked)} blocked; outputs in {root}")
    for key, err in summary.failed.items():
        typer.echo(f"  failed {key}: {err}", err=True)
    if (root / "report.html").is_file():
        typer.echo(f"report: {root / 'report.html'} (and report.md); tables: {root}/*.csv; store: {root / 'study.sqlite'}")
    if summary.failed:
        raise typer.Exit(1)
    return root


@app.command("run")
@user_errors
def run_cmd(
    study: Path = typer.Argument(..., help="Study YAML file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Study folder (default runs/<study name>)."),
    progress: bool = typer.Option(True, "--progress/--quiet", help="Show progress bars."),
    redo: list[str] = typer.Option([], "--redo", help="Compute the jobs of this kind again from scratch, and "
                                   "everything downstream (repeatable): pretrain, sft, cache, kd, eval, fidelity, "
                                   "analysis. E.g. --redo analysis after upgrading kdscope."),
    show_plan: bool = typer.Option(False, "--plan", help="Resolve the study and list every job with its resolved "
                                   "settings and the counts per kind; runs nothing and loads no model."),
    as_json: bool = typer.Option(False, "--json", help="With --plan: print the plan as JSON."),
) -> None:
    """Run a study: expand it into jobs and run what is missing or changed (a killed run resumes)."""
    if show_plan:
        from .study import load_study
        from .study.run import plan, plan_text

        resolved = plan(load_study(study))
        typer.echo(json.dumps(resolved, indent=1) if as_json else plan_text(resolved))
        return
    if as_json:
        raise InputError("--json: only with --plan (a run reports on the console and in its output folder)")
    _run_study(study, out, progress, redo)


@app.command("demo")
@user_errors
def demo_cmd(
    out: Path = typer.Option(Path("kdscope-demo"), "--out", help="Where the demo study writes its outputs."),
    progress: bool = typer.Option(True, "--progress/--quiet", help="Show progress bars."),
) -> None:
    """The study's whole design in miniature on built-in tiny models: offline, CPU, a few minutes."""
    from .study import builtin_study

    typer.echo(f"kdscope demo: the built-in study {builtin_study('demo')} -> {out}", err=True)
    _run_study(builtin_study("demo"), out, progress)


@app.command("status")
@user_errors
def status_cmd(
    study: Path = typer.Argument(..., help="Study YAML file (or its output folder with study.sqlite)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Study folder when a YAML is given."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show the jobs of a study with their state and times: pending, running, interrupted (its run was killed;
    the next `kdscope run` resumes it), done, failed, blocked (a job it depends on failed)."""
    from .study import StudyStore, expand, load_study, study_dir

    if study.is_dir():
        store, jobs = StudyStore(study / "study.sqlite", create=False), None
    else:
        spec = load_study(study)
        path = study_dir(spec, out) / "study.sqlite"
        store, jobs = (StudyStore(path, create=False) if path.is_file() else None), expand(spec)
    known = {j["key"]: j for j in store.jobs()} if store is not None else {}
    rows = []
    for job in jobs or []:
        j = known.get(job.key, {"status": "pending", "started": None, "finished": None, "error": None})
        rows.append({"key": job.key, "kind": job.kind, "name": job.name, **{k: j[k] for k in ("status", "started", "finished", "error")}})
    if jobs is None:
        rows = list(known.values())
    for r in rows:
        r["seconds"] = round(r["finished"] - r["started"], 1) if r.get("finished") and r.get("started") else None
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    from rich.console import Console
    from rich.table import Table

    table = Table(title=", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for col in ("status", "kind", "name", "seconds", "error"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["status"], r["kind"], r["name"], str(r["seconds"] or "-"),
                      (r["error"] or "").splitlines()[0] if r.get("error") else "")
    Console().print(table)


@app.command("eval")
@user_errors
def eval_cmd(
    model: str = typer.Option(..., "--model", help="Model: builtin:<name>, a folder, a .gguf file or a hub id."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A LoRA adapter folder applied on the model."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated task names or aliases (e.g. gsm8k,ARC-Easy)."),
    data: str = typer.Option(..., "--data", help="The study's dataset folder, a JSON/JSONL file, or a HF save_to_disk folder."),
    mode: str = typer.Option("generate", "--mode", help="generate (parse generated answers) or loglik (multiple choice)."),
    preset: str = typer.Option("greedy", "--preset", help="Decoding preset: greedy (default) or study (sampling T=1)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Override the preset's token budget."),
    batch_size: int = typer.Option(16, "--batch-size", help="Items per batch."),
    prompt: str = typer.Option("study", "--prompt", help="loglik prompts: study (instruction format) or lm_eval."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N items of each task (smoke runs)."),
    backend: str = typer.Option("auto", "--backend", help="auto (vLLM when installed and a GPU is present), hf or vllm."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, float16 or bfloat16."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    out: Path = typer.Option(..., "--out", help="Output folder: <task>.jsonl per task, summary.csv, summary.json."),
    teacher_name: str = typer.Option("-", "--teacher-name", help="Teacher column of the summary row."),
    student_name: Optional[str] = typer.Option(None, "--student-name", help="Student column (default: the model name)."),
    method: str = typer.Option("SFT", "--method", help="Method column of the summary row (e.g. SFT, KD, BaseModel)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Evaluate a model on tasks (generative or likelihood); resumes from existing per-item records in --out."""
    from .data import load_task
    from .evaluation import (HFGenerator, evaluate_generate_with, evaluate_loglik, generation_preset, make_generator,
                             summary_row, write_summary_csv)

    if mode not in ("generate", "loglik"):
        raise InputError(f"--mode {mode!r}: use generate or loglik")
    if backend not in ("auto", "hf", "vllm"):
        raise InputError(f"--backend {backend!r}: use auto, hf or vllm")
    if mode == "loglik" and backend == "vllm":
        raise InputError("--mode loglik runs on the HF backend; drop --backend vllm")
    output_folder(out)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    try:
        loaded = {name: load_task(name, data, limit=limit) for name in names}
    except KeyError as e:
        raise InputError(str(e.args[0])) from None
    try:
        settings = generation_preset(preset, max_new_tokens=max_new_tokens, batch_size=batch_size)
    except ValidationError as e:
        raise one_line(e, name=_option_name) from None
    generator = make_generator(model, adapter, "hf" if mode == "loglik" else backend, dtype, device)  # type: ignore[arg-type]
    summaries = []
    for name, examples in loaded.items():
        path = out / f"{name}.jsonl"
        if mode == "generate":
            summary = evaluate_generate_with(generator, name, examples, settings, path, progress=not quiet)
        else:
            assert isinstance(generator, HFGenerator)
            summary = evaluate_loglik(generator.model, generator.tokenizer, name, examples, path, prompt=prompt,  # type: ignore[arg-type]
                                      batch_size=batch_size, progress=not quiet)
        summaries.append(summary)
        clean = f", cleaned parse {summary['accuracy_clean']:.4f}" if "accuracy_clean" in summary else ""
        typer.echo(f"{summary['task']}: {summary['correct']}/{summary['n']} correct, accuracy {summary['accuracy']:.4f}{clean}")
    row = summary_row(summaries, student=student_name or Path(model).name, teacher=teacher_name, method=method)
    write_summary_csv(out / "summary.csv", row)
    (out / "summary.json").write_text(json.dumps({"row": row, "tasks": summaries}, indent=1), encoding="utf-8")
    typer.echo(f"Average {row['Average']:.2f}; wrote {out / 'summary.csv'}")


@app.command("fidelity")
@user_errors
def fidelity_cmd(
    teacher: Path = typer.Option(..., "--teacher", help="The teacher's `kdscope eval --mode generate` output folder."),
    student: Path = typer.Option(..., "--student", help="The student's output folder (same tasks and items)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the tables (default: <student>/fidelity)."),
    embed_model: Optional[Path] = typer.Option(None, "--embed-model", help="A sentence-transformers model folder: adds embedding cosine."),
    teacher_model: Optional[str] = typer.Option(None, "--teacher-model", help="With --student-model: token-level KL and top-1 agreement."),
    student_model: Optional[str] = typer.Option(None, "--student-model", help="The student model (shares the teacher's tokenizer)."),
    token_limit: Optional[int] = typer.Option(None, "--token-limit", help="Token-level fidelity on the first N items per task."),
    teacher_name: Optional[str] = typer.Option(None, "--teacher-name", help="Teacher column (default: the folder name)."),
    student_name: Optional[str] = typer.Option(None, "--student-name", help="Student column (default: the folder name)."),
    method: str = typer.Option("KD", "--method", help="Method column (e.g. SFT, KD)."),
) -> None:
    """Teacher-student agreement, BLEU/chrF (and embedding cosine, token-level KL) per task, as CSV tables and JSON."""
    from .fidelity import compare_runs, load_run, paired, token_fidelity, write_tables

    if (teacher_model is None) != (student_model is None):
        raise InputError("token-level fidelity needs both --teacher-model and --student-model")
    if out is not None:
        output_folder(out)
    results = compare_runs(teacher, student, embed_model)
    if teacher_model is not None and student_model is not None:
        from .models import load_model

        t_model, tok = load_model(teacher_model)
        s_model, _ = load_model(student_model)
        t_runs, s_runs = load_run(teacher), load_run(student)
        for task in results:
            pairs = paired(t_runs[task], s_runs[task], task)[:token_limit]
            results[task]["token"] = token_fidelity(t_model, s_model, tok, [t["prompt"] for t, _ in pairs],
                                                    [t["output"] for t, _ in pairs])
    target = out or student / "fidelity"
    paths = write_tables(results, target, teacher_name or teacher.name, student_name or student.name, method)
    for task, res in results.items():
        typer.echo(f"{task}: agreement {100 * res['agreement']:.2f}, BLEU {res['bleu_corpus']:.2f}, chrF {res['chrf']:.2f}")
    typer.echo(f"wrote {', '.join(str(p) for p in paths)}")


def run() -> None:  # pragma: no cover - entry point for `python -m kdscope`
    app(prog_name="kdscope")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
