"""What each kind of study job does: pretrain, SFT, KD, evaluation, fidelity, analysis.

A job reads its dependencies' outputs from ``<study>/jobs/<kind>-<key>/`` and returns a result dict (``rows`` by kind
and per-item ``items`` go to the study store). Jobs are idempotent: a re-run after a kill continues the training
checkpoint / evaluation JSONL that is already on disk.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from ..data import Example, load_task, load_training_data
from .spec import Job, StudyStore, job_dir

TABLE_NAMES = {"math": "math_results.csv", "commonsense": "cs_results.csv"}
SYNTHETIC_TEST_SEED_OFFSET = 10_000  # test items come from other seeds than training items


def run_job(job: Job, root: Path, store: StudyStore, progress: bool = True) -> dict[str, Any]:
    runner = {"pretrain": _pretrain, "sft": _sft, "cache": _cache, "kd": _kd, "eval": _eval, "fidelity": _fidelity,
              "analysis": _analysis}[job.kind]
    out = job_dir(root, job)
    out.mkdir(parents=True, exist_ok=True)
    return runner(job, out, root, store, progress)


# --------------------------------------------------------------------------------------------------------------------
# Models of a job
# --------------------------------------------------------------------------------------------------------------------
def _base_ref(job: Job, root: Path, model_key: str = "model", dep: str = "base") -> str:
    """The base weights: the pretraining job's output when there is one, else the study's model reference."""
    if dep in job.deps:
        return str(job_dir(root, job.deps[dep]) / "final")
    return job.params[model_key]


def _load(base_ref: str, trained: Path | None, job: Job) -> tuple[Any, Any]:
    from ..models import load_model
    from ..train import load_trained

    # built-in models start from one fixed init whatever the study's seed: every job must see the same base weights
    kwargs = {"device": job.params.get("device", "auto"), "trust_remote_code": job.params.get("trust_remote_code", False)}
    if trained is None:
        return load_model(base_ref, **kwargs)
    return load_trained(base_ref, trained, **kwargs)


def _train_run(job: Job, out: Path, student_ref: str, examples: list[Example], settings: dict[str, Any],
               progress: bool, teacher: Any = None, teacher_model: Any = None,
               teacher_tokenizer: Any = None) -> dict[str, Any]:
    from ..teacher import check_same_tokenizer
    from ..train import TrainSettings, prepare_student, train

    ts = TrainSettings(**settings)
    student, tok = _load(student_ref, None, job)
    if teacher_tokenizer is not None:
        check_same_tokenizer(teacher_tokenizer, tok)
    result = train(prepare_student(student, ts), tok, examples, ts, out, teacher=teacher, teacher_model=teacher_model,
                   resume=True, progress=progress)
    last = result.history[-1] if result.history else {}
    return {"steps": result.steps, "best_val_loss": result.best_val_loss, "final_loss": last.get("loss"),
            "final_kd": last.get("kd")}


def _pretrain(job: Job, out: Path, root: Path, store: StudyStore, progress: bool) -> dict[str, Any]:
    p = job.params
    examples = [ex for src in (p["data"], *p["extra_data"]) for ex in load_training_data(src, seed=p["seed"] + 1)]
    settings = {"objective": "sft", "lora": None, "max_steps": p["steps"], "lr": p["lr"], "warmup_steps": 10,
                "micro_batch_size": p["micro_batch_size"], "grad_accum": 1, "val_size": 0, "seed": p["seed"],
                "save_every": max(1, p["steps"] // 4), "max_length": 256, "prompt_style": p["prompt_style"],
                "token_mask": p["token_mask"]}
    return _train_run(job, out, p["model"], examples, settings, progress)


def _sft(job: Job, out: Path, root: Path, store: StudyStore, progress: bool) -> dict[str, Any]:
    p = job.params
    return _train_run(job, out, _base_ref(job, root), load_training_data(p["train"], seed=p["seed"]), p["settings"],
                      progress)


def _teacher_trained(job: Job, root: Path) -> Path | None:
    return None if job.params["base_teacher"] else job_dir(root, job.deps["teacher"]) / "final"


def _cache(job: Job, out: Path, root: Path, store: StudyStore, progress: bool) -> dict[str, Any]:
    """One teacher pass over the domain's training sequences, stored top-k (kdscope.cache)."""
    from ..cache import TeacherCache, cache_key, encode_sequences

    p = job.params
    teacher_base = _base_ref(job, root, "teacher", "teacher_base")
    trained = _teacher_trained(job, root)
    model, tok = _load(teacher_base, trained, job)
    sequences = encode_sequences(tok, load_training_data(p["train"], seed=p["seed"]), p["prompt_style"],
                                 p["max_length"])
    key = cache_key(teacher_base, trained, tok, sequences, p["prompt_style"], p["k"], p["max_length"])
    cache = TeacherCache.build(out / "cache", key, model, sequences, tok.pad_token_id, p["temperatures"])
    return {"sequences": len(sequences), "bytes_per_token": cache.bytes_per_token()}


def _kd(job: Job, out: Path, root: Path, store: StudyStore, progress: bool) -> dict[str, Any]:
    """Distil from the study's teacher: from its top-k cache when the study has one (GKD's on-policy batches fall
    back to the online teacher, so GKD still loads it), else online."""
    from ..cache import CachedTeacher, TeacherCache
    from ..models import load_tokenizer
    from ..teacher import OnlineTeacher

    p = job.params
    s = p["settings"]
    teacher_base = _base_ref(job, root, "teacher", "teacher_base")
    trained = _teacher_trained(job, root)
    needs_model = "cache" not in job.deps or s["objective"] == "gkd"  # seqkd runs never get a cache
    teacher_model, teacher_tok = _load(teacher_base, trained, job) if needs_model else (None, load_tokenizer(teacher_base))
    online = None if teacher_model is None else OnlineTeacher(
        teacher_model, topk=s.get("teacher_topk"), noise_sigma=s.get("noise_sigma", 0.0), seed=p["seed"],
        temperature=s.get("temperature", 1.0))
    signal: Any = online
    if "cache" in job.deps:
        cache = TeacherCache.open(job_dir(root, job.deps["cache"]) / "cache")
        signal = CachedTeacher(cache, temperature=s.get("temperature", 1.0), noise_sigma=s.get("noise_sigma", 0.0),
                               seed=p["seed"], fallback=online)
    examples = load_training_data(p["train"], seed=p["seed"])
    result = _train_run(job, out, _base_ref(job, root, "student"), examples, s, progress, signal, teacher_model,
                        teacher_tokenizer=teacher_tok)
    return {**result, "teacher_loaded": teacher_model is not None,
            "online_teacher_passes": 0 if online is None else online.calls}


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------
def task_examples(task: dict[str, Any], evaluation: dict[str, Any], seed: int) -> list[Example]:
    """Test items of a task entry: the given data, or built-in generated items (from seeds unseen in training)."""
    from ..synthetic import GENERATORS, generate
    from ..tasks import get_task

    name = get_task(task["task"]).name
    if task.get("data"):
        return load_task(name, task["data"], limit=evaluation.get("limit"))
    if name not in GENERATORS:
        raise ValueError(f"task {name} needs a data: path (only built-in generated tasks can omit it)")
    return generate(name, evaluation.get("limit") or evaluation["synthetic_items"], seed + SYNTHETIC_TEST_SEED_OFFSET)


def _eval(job: Job, out: Path, root: Path, store: StudyStore, progress: bool) -> dict[str, Any]:
    from ..evaluation import evaluate_generate, evaluate_loglik, generation_preset, read_done, summary_row

    p = job.params
    ev = p["evaluation"]
    trained = job_dir(root, job.deps["trained"]) / "final" if "trained" in job.deps else None
    model, tok = _load(_base_ref(job, root), trained, job)
    model.eval()
    settings = generation_preset(ev["preset"], max_new_tokens=ev.get("max_new_tokens"), batch_size=ev["batch_size"])
    summaries, items = [], []
    for task in p["tasks"]:
        examples = task_examples(task, ev, seed=0)
        path = out / f"{task['task']}.jsonl"
        if ev["mode"] == "loglik":
            summary = evaluate_loglik(model, tok, task["task"], examples, path, limit=ev.get("limit"),
                                      batch_size=ev["batch_size"], progress=progress)
        else:
            summary = evaluate_generate(model, tok, task["task"], examples, settings, path,
                                        prompt_style=ev["prompt_style"], limit=ev.get("limit"), progress=progress)
        summaries.append(summary)
        items.extend(read_done(path).values())
    row = summary_row(summaries, student=p["student"], teacher=p["teacher"], method=p["method"])
    if p["seed"] is not None:
        row["Seed"] = p["seed"]
    return {"rows": {"result": [row]}, "items": items, "accuracy": row["Average"]}


# --------------------------------------------------------------------------------------------------------------------
# Fidelity and analysis
# --------------------------------------------------------------------------------------------------------------------
def _by_task(items: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    grouped: dict[str, dict[int, dict[str, Any]]] = {}
    for rec in items:
        grouped.setdefault(rec["task"], {})[rec["index"]] = rec
    return grouped


def _fidelity(job: Job, out: Path, root: Path, store: StudyStore, progress: bool) -> dict[str, Any]:
    """Agreement (EM1 layout), rationale BLEU (BLEU layout) and joint correctness of the SFT and the KD student."""
    from ..fidelity import TABLES, compare_task, table_row

    p = job.params
    teacher = _by_task(store.items(job.deps["teacher_eval"].key))
    rows: dict[str, list[dict[str, Any]]] = {"agreement": [], "fidelity": [], "joint": []}
    for method, student_job in (("SFT", job.deps["student_sft_eval"]), (p["method"], job.deps["student_eval"])):
        student = _by_task(store.items(student_job.key))
        results = {task: compare_task(task, teacher[task], student[task]) for task in teacher if task in student}
        for kind, table in (("agreement", "agreement"), ("fidelity", "bleu_corpus")):
            measure, scale = TABLES[table]
            rows[kind].append(table_row(results, measure, scale, p["teacher"], p["student"], method))
        rows["joint"].extend({"Teacher": p["teacher"], "Student": p["student"], "Method": method, "task": task,
                              **res["joint"]} for task, res in results.items())
    return {"rows": rows}


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
        "agreement": study_pairs(_side_table(store, "agreement", keys)),
        "fidelity": study_pairs(_side_table(store, "fidelity", keys)),
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


def _analysis(job: Job, out: Path, root: Path, store: StudyStore, progress: bool) -> dict[str, Any]:
    import json

    from ..report import render_report
    from ..stats import analyse, json_ready

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
    from ..errors import InputError
    from ..report import render_report
    from .spec import Study, expand

    spec = root / "study.json"
    if not spec.is_file():
        raise InputError(f"{root}: no study.json; give the folder a `kdscope run` wrote")
    study = Study.model_validate_json(spec.read_text())
    tables = study_tables(expand(study)[-1], StudyStore(root / "study.sqlite"))
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
