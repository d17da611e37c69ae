"""Running a study: expand it, prepare its folder and store, and hand the jobs to an executor; or only resolve it
(``plan``) and show every job with its fully resolved settings, without loading a model or running anything.

A killed run resumes: finished jobs are skipped, an interrupted training job continues from its last checkpoint, an
interrupted evaluation from its last written batch.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

from ..evaluation import generation_preset
from ..train import TrainSettings
from .executors import RunSummary, make_backend, run_jobs
from .graph import Job, expand, job_dir, jobs_to_redo
from .spec import Study, check_inputs, check_training_settings
from .store import StudyStore
from .tables import exports_built_by


def study_dir(study: Study, out: str | Path | None) -> Path:
    return Path(out) if out is not None else Path("runs") / study.name


def run_study(study: Study, out: str | Path | None = None, progress: bool = True,
              log: Callable[[str], None] = print, redo: Sequence[str] = ()) -> RunSummary:
    """Run every job that is not done yet; a failed job is reported and blocks only its dependents. Jobs of the
    kinds in ``redo`` (and everything downstream of them) are computed again from scratch."""
    check_training_settings(study)
    check_inputs(study)  # a bad input fails here, not after hours of pretraining
    jobs = expand(study)
    again = jobs_to_redo(jobs, redo)
    root = study_dir(study, out)
    root.mkdir(parents=True, exist_ok=True)
    # as written (unset keys left out), so that reading it back is the same study, kd_runs and all
    (root / "study.json").write_text(study.model_dump_json(indent=1, exclude_unset=True))
    store = StudyStore(root / "study.sqlite")
    for job in again:
        if store.status(job.key) is not None:
            store.mark(job, "pending")
        shutil.rmtree(job_dir(root, job), ignore_errors=True)  # else the job would resume its old outputs
    analysis = next(job for job in jobs if job.kind == "analysis")
    if exports_built_by(root) != analysis.key and store.status(analysis.key) == "done":
        store.mark(analysis, "pending")  # the folder shows another design's tables: this design's are rebuilt
    backend = make_backend(study, root, progress)
    return run_jobs(jobs, store, backend, RunSummary(out_dir=root), log, progress)


# --------------------------------------------------------------------------------------------------------------------
# The plan: the resolved design, job by job
# --------------------------------------------------------------------------------------------------------------------
NOISE_MODEL = "N(0, sigma^2) added to every teacher logit, drawn afresh at each step (online teacher)"


def plan(study: Study) -> dict[str, Any]:
    """Every job of the study with what it is and its resolved settings, plus counts per kind. Loads no model.
    Inputs that do not exist on this machine are listed under ``missing_inputs`` (a run would refuse them)."""
    check_training_settings(study)
    missing = check_inputs(study, allow_missing=True)
    jobs = expand(study)
    kinds = Counter(job.kind for job in jobs)
    described = [describe_job(job) for job in jobs]
    kd_runs = Counter((d["domain"], d["kd_method"], d["temperature"], d["ablation"], d["cross_tokenizer"])
                      for d in described if d["kind"] == "kd")
    return {"study": study.name, "missing_inputs": missing, "counts": dict(sorted(kinds.items())), "jobs": described,
            "kd_runs": [{"domain": d, "kd_method": m, "temperature": t, "ablation": a, "cross_tokenizer": x,
                         "pairs": n} for (d, m, t, a, x), n in sorted(kd_runs.items())]}


def describe_job(job: Job) -> dict[str, Any]:
    """One job as the plan shows it: kind, key, who and what, and the settings the job will run with."""
    p = job.params
    teacher = p.get("teacher_name", p.get("teacher", ""))
    described: dict[str, Any] = {
        "kind": job.kind, "key": job.key, "name": job.name,
        "teacher": "" if teacher == "-" else teacher,
        "student": p.get("student_name", p.get("student", p.get("name", ""))),
        "domain": p.get("domain", ""),
        "method": p.get("label", p.get("method", "")),
        "kd_method": p.get("kd_method", ""),
        "temperature": p.get("temperature") if job.kind in ("kd", "eval", "fidelity") else None,
        "ablation": p.get("ablation", ""),
        "cross_tokenizer": p.get("cross_tokenizer", ""),  # a cross-family KD run's loss family (xtok_kl, uld)
        "seed": p.get("seed"),
        "depends_on": sorted(d.key for d in job.deps.values()),
    }
    if job.kind in ("sft", "kd"):
        described["settings"] = TrainSettings(**p["settings"]).model_dump(mode="json")
    if job.kind == "kd":
        s = described["settings"]
        described["sample_length"] = (
            "none: teacher-forced on the training sequences" if s["objective"] == "kd"
            else s["max_new_tokens"] or f"max_length ({s['max_length']}) - the longest prompt of the batch")
        described["teacher_signal"] = {
            "teacher": "base model (never fine-tuned)" if p["base_teacher"] else "SFT teacher",
            "source": f"cache {job.deps['cache'].folder}" if "cache" in job.deps else "online",
            "noise": NOISE_MODEL.replace("sigma", str(p["settings"]["noise_sigma"]))
            if p["settings"].get("noise_sigma") else "none",
        }
    if job.kind == "eval":
        ev = p["evaluation"]
        described["evaluation"] = ev
        if ev["mode"] == "generate":
            described["decoding"] = generation_preset(ev["preset"], max_new_tokens=ev.get("max_new_tokens"),
                                                      batch_size=ev["batch_size"]).model_dump(mode="json")
    if job.kind in ("pretrain", "cache"):
        described["settings"] = {k: v for k, v in p.items() if k not in ("model", "name", "teacher")}
    return described


# Settings the text plan shows per training job (the JSON plan has them all).
PLAN_COLUMNS = ("loss", "reduction", "token_mask", "kd_weight", "best_by", "teacher_topk")
SFT_PLAN_COLUMNS = ("reduction", "token_mask", "best_by")


def plan_text(resolved: dict[str, Any]) -> str:
    """The plan as lines of text: one line per job, then the KD runs per domain and the counts per kind."""
    lines = []
    for job in resolved["jobs"]:
        who = f"{job['teacher']}->{job['student']}" if job["teacher"] else job["student"]
        what = " ".join(str(x) for x in (job["kd_method"], f"T={job['temperature']}" if job["kd_method"] else "",
                                         job["ablation"]) if x)
        line = f"{job['kind']:<9} {job['key']} {job['domain'] or '-':<11} {who} {job['method']} {what}".rstrip()
        if job["seed"] is not None:
            line += f" seed {job['seed']}"
        settings = job.get("settings", {})
        columns = PLAN_COLUMNS if job["kind"] == "kd" else SFT_PLAN_COLUMNS if job["kind"] == "sft" else ()
        shown = [f"{k}={settings[k]}" for k in columns if k in settings]
        if job["kind"] == "kd":
            if job["settings"]["objective"] != "kd":
                shown.append(f"samples={job['sample_length']}")
            signal = job["teacher_signal"]
            shown.append(f"teacher={signal['source'].split()[0]}" + ("+noise" if signal["noise"] != "none" else ""))
        if "decoding" in job:
            d = job["decoding"]
            shown.append(f"decoding={d['preset']} sample={d['do_sample']} max_new_tokens={d['max_new_tokens']}")
        lines.append(line + (" | " + ", ".join(shown) if shown else ""))
    lines.append("KD runs (domain, method, temperature, ablation[, cross-tokenizer loss]: pairs):")
    lines += [f"  {r['domain']} {r['kd_method']} T={r['temperature']} {r['ablation'] or '-'}"
              f"{' ' + r['cross_tokenizer'] if r['cross_tokenizer'] else ''}: {r['pairs']}" for r in resolved["kd_runs"]]
    lines.append("jobs per kind: " + ", ".join(f"{k} {n}" for k, n in resolved["counts"].items()))
    return "\n".join(lines)
