"""`kdscope run|demo|status`: studies as code (plan, run, resume, status)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import typer

from ..errors import InputError
from ..study import StudyStore, builtin_study, expand, load_study, run_study, study_dir
from ..study.run import plan, plan_text
from .common import app, output_folder, user_errors


def _run_study(study_path: Path, out: Optional[Path], progress: bool, redo: Sequence[str] = ()) -> Path:
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
        resolved = plan(load_study(study, allow_missing_inputs=True))
        typer.echo(json.dumps(resolved, indent=1) if as_json else plan_text(resolved))
        missing = sorted({m["path"] for m in resolved["missing_inputs"]})
        if missing:  # the design is shown; a run would refuse these (the JSON plan names every key)
            typer.echo(f"warning: {study}: not on this machine: {', '.join(missing)}; kdscope run refuses a study "
                       "until they exist (paths are relative to the working folder)", err=True)
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
    from rich.console import Console  # only the table view needs rich
    from rich.table import Table

    table = Table(title=", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for col in ("status", "kind", "name", "seconds", "error"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["status"], r["kind"], r["name"], str(r["seconds"] or "-"),
                      (r["error"] or "").splitlines()[0] if r.get("error") else "")
    Console().print(table)
