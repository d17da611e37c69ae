"""`kdscope tasks|score|eval|fidelity`: the tasks, scoring saved generations, evaluation and fidelity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from ..data import find_task_file, load_examples, load_task
from ..errors import InputError, one_line
from ..evaluation import (HFGenerator, evaluate_generate_with, evaluate_loglik, generation_preset, make_generator,
                          score_records, summary_row, write_summary_csv)
from ..fidelity import compare_runs, load_run, paired, token_fidelity, write_tables
from ..models import load_model
from ..tasks import TASKS
from .common import app, option_name, output_folder, user_errors


@app.command("tasks")
@user_errors
def tasks_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="A study dataset folder (<task>/test.json); adds item counts."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the study's 14 tasks: domain, answer type, scoring rule, and loaded size when --data is given."""
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
    from rich.console import Console  # only the table view needs rich
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
    try:
        summary = score_records(task, predictions, field)
    except KeyError as e:
        raise InputError(str(e.args[0])) from None
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"{summary['task']}: {summary['correct']}/{summary['n']} correct, accuracy {summary['accuracy']:.4f}")


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
        raise one_line(e, name=option_name) from None
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
    student_model: Optional[str] = typer.Option(None, "--student-model", help="The student model (another tokenizer: compared on aligned spans)."),
    token_limit: Optional[int] = typer.Option(None, "--token-limit", help="Token-level fidelity on the first N items per task."),
    teacher_name: Optional[str] = typer.Option(None, "--teacher-name", help="Teacher column (default: the folder name)."),
    student_name: Optional[str] = typer.Option(None, "--student-name", help="Student column (default: the folder name)."),
    method: str = typer.Option("KD", "--method", help="Method column (e.g. SFT, KD)."),
) -> None:
    """Teacher-student agreement, BLEU/chrF (and embedding cosine, token-level KL) per task, as CSV tables and JSON."""
    if (teacher_model is None) != (student_model is None):
        raise InputError("token-level fidelity needs both --teacher-model and --student-model")
    if out is not None:
        output_folder(out)
    results = compare_runs(teacher, student, embed_model)
    if teacher_model is not None and student_model is not None:
        t_model, tok = load_model(teacher_model)
        s_model, s_tok = load_model(student_model)
        t_runs, s_runs = load_run(teacher), load_run(student)
        for task in results:
            pairs = paired(t_runs[task], s_runs[task], task)[:token_limit]
            results[task]["token"] = token_fidelity(t_model, s_model, tok, [t["prompt"] for t, _ in pairs],
                                                    [t["output"] for t, _ in pairs], student_tokenizer=s_tok)
    target = out or student / "fidelity"
    paths = write_tables(results, target, teacher_name or teacher.name, student_name or student.name, method)
    for task, res in results.items():
        typer.echo(f"{task}: agreement {100 * res['agreement']:.2f}, BLEU {res['bleu_corpus']:.2f}, chrF {res['chrf']:.2f}")
    typer.echo(f"wrote {', '.join(str(p) for p in paths)}")
