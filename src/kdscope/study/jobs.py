"""What each kind of study job does: pretrain, SFT, teacher cache, KD, evaluation, fidelity (the analysis job
assembles tables, so kdscope.study.tables runs it).

A job reads its dependencies' outputs from ``<study>/jobs/<kind>-<key>/`` and returns a result dict (``rows`` by kind
and per-item ``items`` go to the study store). Jobs are idempotent: a re-run after a kill continues the training
checkpoint / evaluation JSONL that is already on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..cache import CachedTeacher, TeacherCache, build_teacher_signal, cache_key, encode_sequences
from ..data import load_task, load_training_data
from ..evaluation import evaluate_generate, evaluate_loglik, generation_preset, read_done, summary_row
from ..fidelity import TABLES, compare_task, table_row
from ..models import config_logit_width, load_model, load_tokenizer, load_trained
from ..prompts import Example
from ..stats import SEED_COLUMN
from ..synthetic import GENERATORS, generate
from ..tasks import get_task
from ..teacher import common_vocab_width, logit_width
from ..train import TrainSettings, prepare_student, train
from .graph import Job, job_dir
from .store import StudyStore

SYNTHETIC_TEST_SEED_OFFSET = 10_000  # test items come from other seeds than training items


def run_job(job: Job, root: Path, store: StudyStore, progress: bool = True) -> dict[str, Any]:
    """Run one job of any kind but the analysis (kdscope.study.tables runs that one)."""
    out = job_dir(root, job)
    out.mkdir(parents=True, exist_ok=True)
    return RUNNERS[job.kind](job, out, root, store, progress)


# --------------------------------------------------------------------------------------------------------------------
# Models of a job
# --------------------------------------------------------------------------------------------------------------------
def _base_ref(job: Job, root: Path, model_key: str = "model", dep: str = "base") -> str:
    """The base weights: the pretraining job's output when there is one, else the study's model reference."""
    if dep in job.deps:
        return str(job_dir(root, job.deps[dep]) / "final")
    return job.params[model_key]


def _load(base_ref: str, trained: Path | None, job: Job) -> tuple[Any, Any]:
    # built-in models start from one fixed init whatever the study's seed: every job must see the same base weights
    kwargs = {"device": job.params.get("device", "auto"), "trust_remote_code": job.params.get("trust_remote_code", False)}
    if trained is None:
        return load_model(base_ref, **kwargs)
    return load_trained(base_ref, trained, **kwargs)


def _train_run(job: Job, out: Path, student_ref: str, examples: list[Example], settings: dict[str, Any],
               progress: bool, signal_for: Callable[[TrainSettings, Any, Any], Any] | None = None,
               teacher_model: Any = None) -> dict[str, Any]:
    """Train the student; ``signal_for(settings, student, tokenizer)`` builds its teacher signal once it is loaded."""
    ts = TrainSettings(**settings)
    student, tok = _load(student_ref, None, job)
    teacher = None if signal_for is None else signal_for(ts, student, tok)
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
    p = job.params
    teacher_base = _base_ref(job, root, "teacher", "teacher_base")
    trained = _teacher_trained(job, root)
    model, tok = _load(teacher_base, trained, job)
    sequences = encode_sequences(tok, load_training_data(p["train"], seed=p["seed"]), p["prompt_style"],
                                 p["max_length"])
    built = {}
    for width in cache_widths(model, tok, p["students"]):
        key = cache_key(teacher_base, trained, tok, sequences, p["prompt_style"], p["k"], p["max_length"], width,
                        model)
        built[width] = TeacherCache.build(cache_folder(out, width), key, model, sequences, tok.pad_token_id,
                                          p["temperatures"])
    return {"sequences": len(sequences), "logit_widths": sorted(built),
            "bytes_per_token": {str(w): c.bytes_per_token() for w, c in sorted(built.items())}}


def cache_widths(teacher: Any, teacher_tok: Any, students: list[tuple[str, bool]]) -> list[int]:
    """The common vocabulary widths of the teacher with each student that reads its cache (checked by token
    strings, kdscope.teacher.common_vocab_width): one cache is built per width."""
    teacher_width = logit_width(teacher)
    return sorted({common_vocab_width(teacher_tok, load_tokenizer(ref, trust), teacher_width,
                                      config_logit_width(ref, trust)) for ref, trust in students})


def cache_folder(out: Path, width: int) -> Path:
    return out / f"cache-w{width}"


def open_cache_for(job: Job, root: Path, student_width: int) -> TeacherCache:
    """The cache of the KD job's cache dependency built for this student: the widest at most its logit width (the
    pair's common width; kdscope.cache.build_teacher_signal checks it exactly)."""
    folder = job_dir(root, job.deps["cache"])
    caches = sorted((TeacherCache.open(path) for path in folder.glob("cache-w*")), key=lambda c: c.logit_width)
    if not caches:
        raise FileNotFoundError(f"{folder}: the cache job stored no cache; run it again (kdscope run --redo cache)")
    fitting = [c for c in caches if c.logit_width <= student_width]
    return fitting[-1] if fitting else caches[0]


def _kd(job: Job, out: Path, root: Path, store: StudyStore, progress: bool) -> dict[str, Any]:
    """Distil from the study's teacher, its signal built by kdscope.cache.build_teacher_signal (as `train kd` does):
    from its top-k cache when the study has one (GKD's on-policy batches fall back to the online teacher, so GKD
    still loads it; noise runs get no cache), else online. The base-teacher ablation loads the base weights."""
    p = job.params
    settings = TrainSettings(**p["settings"])
    teacher_base = _base_ref(job, root, "teacher", "teacher_base")
    trained = _teacher_trained(job, root)
    uses_cache = "cache" in job.deps
    needs_model = not uses_cache or settings.objective == "gkd" or settings.noise_sigma > 0
    teacher_model, teacher_tok = _load(teacher_base, trained, job) if needs_model else (None, load_tokenizer(teacher_base))
    signals: list[Any] = []

    def signal_for(ts: TrainSettings, student: Any, tok: Any) -> Any:
        width = logit_width(student)
        cache = open_cache_for(job, root, width) if uses_cache else None
        signals.append(build_teacher_signal(ts, teacher_model, teacher_tok, tok, width, cache))
        return signals[-1]

    examples = load_training_data(p["train"], seed=p["seed"])
    result = _train_run(job, out, _base_ref(job, root, "student"), examples, p["settings"], progress, signal_for,
                        teacher_model)
    online = signals[0].fallback if isinstance(signals[0], CachedTeacher) else signals[0]
    return {**result, "teacher_loaded": teacher_model is not None,
            "online_teacher_passes": 0 if online is None else online.calls}


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------
def task_examples(task: dict[str, Any], evaluation: dict[str, Any], seed: int) -> list[Example]:
    """Test items of a task entry: the given data, or built-in generated items (from seeds unseen in training)."""
    name = get_task(task["task"]).name
    if task.get("data"):
        return load_task(name, task["data"], limit=evaluation.get("limit"))
    if name not in GENERATORS:
        raise ValueError(f"task {name} needs a data: path (only built-in generated tasks can omit it)")
    return generate(name, evaluation.get("limit") or evaluation["synthetic_items"], seed + SYNTHETIC_TEST_SEED_OFFSET)


def _eval(job: Job, out: Path, root: Path, store: StudyStore, progress: bool) -> dict[str, Any]:
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
        row[SEED_COLUMN] = p["seed"]
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


Runner = Callable[[Job, Path, Path, StudyStore, bool], dict[str, Any]]
RUNNERS: dict[str, Runner] = {"pretrain": _pretrain, "sft": _sft, "cache": _cache, "kd": _kd, "eval": _eval,
                              "fidelity": _fidelity}
