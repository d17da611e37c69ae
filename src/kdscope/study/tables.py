"""A study's tables: result, agreement, fidelity and joint-correctness tables from the store, the study's CSV
exports, and the analysis job (statistics and report) that assembles them.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InputError
from ..labels import SFT_LABEL
from ..report import render_report
from ..stats import (ABLATION_COLUMN, KD_METHOD_COLUMN, SEED_COLUMN, TEMPERATURE_COLUMN, analyse,
                     json_ready)
from .graph import Job, expand
from .spec import Study
from .store import StudyStore

TABLE_NAMES = {"math": "math_results.csv", "commonsense": "cs_results.csv"}
# The row kinds that get the typed columns (KDMethod, Temperature, Ablation: kdscope.stats names them)
DESCRIBED_KINDS = ("result", "agreement", "fidelity")


def _frame(rows: list[dict[str, Any]], keep_origin: bool = False) -> pd.DataFrame | None:
    """Rows as a table; ``keep_origin`` keeps the store's domain and seed as ``Domain``/``Seed`` columns."""
    if not rows:
        return None
    origin = {"_domain": "Domain", "_seed": SEED_COLUMN} if keep_origin else {}
    return pd.DataFrame([{origin.get(k, k): v for k, v in r.items() if not k.startswith("_") or k in origin}
                         for r in rows])


def _rows(store: StudyStore, kind: str, job: Job) -> list[dict[str, Any]]:
    """The ``kind`` rows of the jobs an analysis depends on, in graph order (so any executor and worker count gives
    the same table), each with the typed columns of the student it describes, from the job that made it: KDMethod,
    Temperature (NaN for SFT and BaseModel rows) and Ablation."""
    deps = {d.key: (i, d) for i, d in enumerate(job.deps.values())}
    found = [r for r in store.rows(kind, list(deps)) if r["_job"] in deps]
    found.sort(key=lambda r: deps[r["_job"]][0])  # stable: a job's own rows keep their order
    if kind in DESCRIBED_KINDS:
        for row in found:
            params = deps[row["_job"]][1].params
            kd = bool(params.get("kd_method")) and row.get("Method") != SFT_LABEL
            row[KD_METHOD_COLUMN] = params["kd_method"] if kd else ""
            row[TEMPERATURE_COLUMN] = float(params["temperature"]) if kd else math.nan
            row[ABLATION_COLUMN] = params["ablation"] if kd else ""
    return found


def study_tables(job: Job, store: StudyStore) -> dict[str, pd.DataFrame | None]:
    """Result, agreement, fidelity and joint-correctness tables of the jobs an analysis depends on."""
    results = _frame(_rows(store, "result", job))
    return {
        "results": results,
        # every student's own row (per seed): stats attaches to each configuration the student it describes
        "agreement": _side_table(store, "agreement", job),
        "fidelity": _side_table(store, "fidelity", job),
        "joint": pooled_joint(_side_table(store, "joint", job)),
    }


def _side_table(store: StudyStore, kind: str, job: Job) -> pd.DataFrame | None:
    """Agreement, fidelity or joint-correctness rows with ``Domain`` and ``Seed``. Every fidelity job of a pair
    compares the same SFT evaluation with the same teacher evaluation, so its SFT rows repeat: they are kept once."""
    frame = _frame(_rows(store, kind, job), keep_origin=True)
    return None if frame is None else frame.drop_duplicates(ignore_index=True)


def pooled_joint(table: pd.DataFrame | None) -> pd.DataFrame | None:
    """Joint-correctness counts per (teacher, student, method, task), pooled over seeds."""
    if table is None:
        return None
    return table.drop(columns=["Domain", SEED_COLUMN]).groupby(["Teacher", "Student", "Method", "task"], sort=False, as_index=False).sum(numeric_only=True)


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
    record_exports(root, job, [*exported, root / "stats.json", report, report.with_suffix(".md")])
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
    written = []
    for domain, name in TABLE_NAMES.items():
        frame = _frame([r for r in _rows(store, "result", job) if r["_domain"] == domain])
        if frame is not None:
            frame = frame.dropna(axis=1, how="all")
            written.append(root / name)
            frame.to_csv(written[-1], index=False)
    for kind in ("agreement", "fidelity", "joint"):
        frame = _side_table(store, kind, job)
        if frame is not None:
            written.append(root / f"{kind}.csv")
            frame.to_csv(written[-1], index=False)
    return written


# --------------------------------------------------------------------------------------------------------------------
# Which design the exports show
# --------------------------------------------------------------------------------------------------------------------
MANIFEST = "exports.json"  # the analysis job that wrote the study folder's tables and report, and what it wrote
# Every file an analysis may write: a file of this list that the current design does not produce is stale.
EXPORT_NAMES = (*TABLE_NAMES.values(), "agreement.csv", "fidelity.csv", "joint.csv", "stats.json", "report.html",
                "report.md")


def exports_built_by(root: Path) -> str | None:
    """The key of the analysis job whose tables and report the study folder shows (None: none written yet)."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("analysis")
    except (ValueError, AttributeError):
        return None  # a damaged manifest: the exports are rebuilt


def record_exports(root: Path, job: Job, written: list[Path]) -> None:
    """Remove exports the current design does not produce (another domain's table, say) and record which analysis
    wrote the rest, so a later run of a different design rebuilds them."""
    keep = {p.name for p in written}
    for name in EXPORT_NAMES:
        if name not in keep:
            (root / name).unlink(missing_ok=True)
    tmp = root / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"analysis": job.key, "files": sorted(keep)}, indent=1))
    tmp.replace(root / MANIFEST)
