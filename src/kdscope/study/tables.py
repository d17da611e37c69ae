"""A study's tables: result, agreement, fidelity and joint-correctness tables from the store, the study's CSV
exports, and the analysis job (statistics and report) that assembles them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InputError
from ..report import render_report
from ..stats import analyse, json_ready
from .graph import Job, expand
from .spec import Study
from .store import StudyStore

TABLE_NAMES = {"math": "math_results.csv", "commonsense": "cs_results.csv"}

def _frame(rows: list[dict[str, Any]], keep_origin: bool = False) -> pd.DataFrame | None:
    """Rows as a table; ``keep_origin`` keeps the store's domain and seed as ``Domain``/``Seed`` columns."""
    if not rows:
        return None
    origin = {"_domain": "Domain", "_seed": "Seed"} if keep_origin else {}
    return pd.DataFrame([{origin.get(k, k): v for k, v in r.items() if not k.startswith("_") or k in origin}
                         for r in rows])


def study_tables(job: Job, store: StudyStore) -> dict[str, pd.DataFrame | None]:
    """Result, agreement, fidelity and joint-correctness tables of the jobs an analysis depends on."""
    keys = [d.key for d in job.deps.values()]
    results = _frame(store.rows("result", keys))
    return {
        "results": results,
        # every student's own row (per seed): stats attaches to each configuration the student it describes
        "agreement": _side_table(store, "agreement", keys),
        "fidelity": _side_table(store, "fidelity", keys),
        "joint": pooled_joint(_side_table(store, "joint", keys)),
    }


def _side_table(store: StudyStore, kind: str, keys: list[str]) -> pd.DataFrame | None:
    """Agreement, fidelity or joint-correctness rows with ``Domain`` and ``Seed``. Every fidelity job of a pair
    compares the same SFT evaluation with the same teacher evaluation, so its SFT rows repeat: they are kept once."""
    frame = _frame(store.rows(kind, keys), keep_origin=True)
    return None if frame is None else frame.drop_duplicates(ignore_index=True)


def pooled_joint(table: pd.DataFrame | None) -> pd.DataFrame | None:
    """Joint-correctness counts per (teacher, student, method, task), pooled over seeds."""
    if table is None:
        return None
    return table.drop(columns=["Domain", "Seed"]).groupby(["Teacher", "Student", "Method", "task"], sort=False, as_index=False).sum(numeric_only=True)


PAIR_KEYS = ["Domain", "Teacher", "Student", "Pair", "Method"]


def study_pairs(table: pd.DataFrame | None) -> pd.DataFrame | None:
    """The study's EM1/BLEU layout: one SFT and one KD row per pair and domain, seeds averaged; the KD row is the
    KD student with the best mean value (the full table keeps every method). ``table`` needs ``Domain`` and ``Seed``
    columns; the result has neither."""
    if table is None:
        return None
    means = table.drop(columns="Seed").groupby(PAIR_KEYS, sort=False, as_index=False).mean(numeric_only=True)
    means = means.dropna(axis=1, how="all")
    sft = means[means["Method"] == "SFT"]
    kd = means[means["Method"] != "SFT"]
    values = kd.drop(columns=PAIR_KEYS).mean(axis=1)
    best = kd.assign(_v=values).sort_values("_v", ascending=False, kind="stable")
    best = best.drop_duplicates(["Domain", "Teacher", "Student"]).drop(columns="_v").assign(Method="KD")
    return pd.concat([sft, best], ignore_index=True).drop(columns="Domain")


def run_analysis(job: Job, out: Path, root: Path, store: StudyStore, progress: bool) -> dict[str, Any]:
    """The analysis job: the study's CSV exports, statistics (stats.json) and the HTML report."""
    tables = study_tables(job, store)
    results = tables["results"]
    if results is None:
        raise ValueError("no evaluation results to analyse")
    exported = export_tables(store, job, root)
    with warnings.catch_warnings():
        # small studies hit degenerate inputs (a constant column, near-identical gains); the affected statistics
        # come out as NaN in the records and the report says so, so the warnings only clutter the run's output
        warnings.simplefilter("ignore", category=RuntimeWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        records = json_ready(analyse(results, tables["agreement"], tables["fidelity"], seed=0))
        report = render_report(results, root / "report.html", agreement=tables["agreement"],
                               fidelity=tables["fidelity"], joint=tables["joint"],
                               title=f"kdscope study: {job.params['study']}")
    (root / "stats.json").write_text(json.dumps(records, indent=1))
    return {"report": str(report), "tables": [str(p) for p in exported], "n_records": len(records)}


def report_from_store(root: Path, out: Path, seed: int = 0) -> Path:
    """Render the report of a study folder from its store (the study's last `kdscope run` defines its jobs)."""
    spec = root / "study.json"
    if not spec.is_file():
        raise InputError(f"{root}: no study.json; give the folder a `kdscope run` wrote")
    study = Study.model_validate_json(spec.read_text())
    analysis = next(job for job in expand(study) if job.kind == "analysis")
    tables = study_tables(analysis, StudyStore(root / "study.sqlite"))
    if tables["results"] is None:
        raise InputError(f"{root}: no evaluation results yet; run the study first")
    return render_report(tables["results"], out, agreement=tables["agreement"], fidelity=tables["fidelity"],
                         joint=tables["joint"], title=f"kdscope study: {study.name}", seed=seed)


def export_tables(store: StudyStore, job: Job, root: Path) -> list[Path]:
    """The study's CSV tables, one per domain, plus agreement / fidelity / joint-correctness tables."""
    keys = [d.key for d in job.deps.values()]
    written = []
    for domain, name in TABLE_NAMES.items():
        rows = [r for r in store.rows("result", keys) if r["_domain"] == domain]
        frame = _frame(rows)
        if frame is not None:
            frame = frame.dropna(axis=1, how="all")
            written.append(root / name)
            frame.to_csv(written[-1], index=False)
    for kind in ("agreement", "fidelity", "joint"):
        frame = _side_table(store, kind, keys)
        if frame is not None:
            written.append(root / f"{kind}.csv")
            frame.to_csv(written[-1], index=False)
    return written
