"""`kdscope stats` and `kdscope report`: the analysis of result tables and the HTML/Markdown report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..errors import InputError
from ..report import JOINT_COLUMNS, render_report
from ..stats import (ITEM_COLUMNS, analyse, headline, json_ready, markdown_report, read_side_tables, read_tables,
                     require_analysable)
from ..study.tables import report_from_store
from .common import app, user_errors


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
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; give an HTML file path, e.g. {out / 'report.html'}")
    if len(results) == 1 and (results[0] / "study.sqlite").is_file():
        path = report_from_store(results[0], out, seed=seed)
        typer.echo(f"wrote {path} and {path.with_suffix('.md')}")
        return
    path = render_report(read_tables(results), out, read_side_tables(agreement), read_side_tables(fidelity),
                         read_side_tables([joint] if joint else [], JOINT_COLUMNS), title=title, seed=seed)
    typer.echo(f"wrote {path} and {path.with_suffix('.md')}")
