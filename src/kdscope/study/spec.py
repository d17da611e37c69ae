"""Studies as code: a YAML study expands into a graph of content-keyed jobs, run (and resumed) by an executor.

teacher/student pretraining (built-in models only) -> SFT (teachers and student baselines) -> KD runs
(methods x temperatures x ablations x seeds) -> evaluations -> fidelity -> statistics -> report.

Every job is keyed by a hash of everything that determines its output (its settings and the keys of the jobs it
reads), so re-running a study does only what is missing or changed. Job state, result rows and per-item records
live in one SQLite file per study, each job's results written in one transaction. A killed run resumes: finished
jobs are skipped, an interrupted training job continues from its last checkpoint, an interrupted evaluation from
its last written batch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ..errors import InputError
from ..models import LoraSettings
from ..tasks import get_task

# --------------------------------------------------------------------------------------------------------------------
# The study file
# --------------------------------------------------------------------------------------------------------------------
METHODS: dict[str, dict[str, Any]] = {
    # study name -> training settings; row label in the study's tables
    "SeqKD": {"objective": "kd", "loss": "forward_kl", "label": "KD"},
    "RevKD": {"objective": "kd", "loss": "reverse_kl", "label": "RevKD"},
    "GKD": {"objective": "gkd", "loss": "jsd", "label": "GKD"},
}


class _Strict(BaseModel):
    model_config = {"extra": "forbid"}


class ModelEntry(_Strict):
    name: str = Field(description="display name in result tables; end it with the size, e.g. Qwen2.5-0.5B")
    model: str = Field(description="hub id, local folder, .gguf file or builtin:<name>")
    trust_remote_code: bool = False


class Family(_Strict):
    """Models that share one tokenizer; distillation happens only within a family."""

    name: str
    teachers: list[ModelEntry]
    students: list[ModelEntry]


class TaskEntry(_Strict):
    task: str
    data: str | None = Field(None, description="study dataset folder or file; omit for built-in generated tasks")

    @field_validator("task")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            get_task(v)
        except KeyError as e:
            raise ValueError(str(e.args[0])) from None
        return v


class Domain(_Strict):
    name: Literal["math", "commonsense"]
    train: str = Field(description="training data: study JSON/JSONL file or synthetic:<domain>[:n]")
    tasks: list[TaskEntry]
    training: dict[str, Any] = Field(default_factory=dict, description="TrainSettings overrides for this domain, "
                                     "e.g. {epochs: 4} for math as in the study")


class Ablations(_Strict):
    base_teacher: bool = Field(False, description="KD from the teacher before task fine-tuning")
    noise_sigmas: list[float] = Field(default_factory=list, description="Gaussian noise on teacher logits")
    method: Literal["SeqKD", "RevKD", "GKD"] = "SeqKD"
    temperature: float = 1.0
    teachers: list[str] | None = Field(None, description="teacher names the ablations run for (default: all)")


class Evaluation(_Strict):
    mode: Literal["generate", "loglik"] = "generate"
    preset: Literal["greedy", "study"] = "greedy"
    limit: int | None = Field(None, ge=1, description="items per task (smoke runs)")
    max_new_tokens: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    prompt_style: Literal["study", "alpaca"] = "study"
    synthetic_items: int = Field(100, ge=1, description="test items per built-in generated task")


class Pretrain(_Strict):
    """Local pretraining of built-in tiny models on generated text (the demo's stand-in for a pretrained base)."""

    steps: dict[str, int] = Field(default_factory=dict, description="steps per model name; missing: 0 (no pretraining)")
    data: str = "synthetic:math:400"
    extra_data: list[str] = Field(default_factory=lambda: ["synthetic:commonsense:400"])
    lr: float = 3e-3
    micro_batch_size: int = 16
    token_mask: Literal["all", "response"] = "all"


class Training(_Strict):
    """Overrides of kdscope.train.TrainSettings for each kind of run (the study's recipe is the default)."""

    common: dict[str, Any] = Field(default_factory=dict)
    teacher_sft: dict[str, Any] = Field(default_factory=dict)
    student_sft: dict[str, Any] = Field(default_factory=dict)
    kd: dict[str, Any] = Field(default_factory=dict)
    lora: LoraSettings | None = Field(default_factory=LoraSettings, description="null: full fine-tuning")


class Executor(_Strict):
    kind: Literal["local", "ray"] = "local"
    workers: int = Field(1, ge=1, description="local: jobs run at once, each in its own process (1: in-process)")
    address: str | None = Field(None, description="Ray cluster address; None starts a local Ray instance")
    cpus_per_job: float = 1.0
    gpus_per_job: float = 0.0


class Study(_Strict):
    name: str
    seeds: list[int] = Field(default_factory=lambda: [6])
    device: str = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (1 is fastest for tiny models on a busy CPU)")
    families: list[Family]
    domains: list[Domain]
    methods: list[Literal["SeqKD", "RevKD", "GKD"]] = Field(default_factory=lambda: ["SeqKD", "RevKD", "GKD"])
    temperatures: list[float] = Field(default_factory=lambda: [1.0, 2.0, 5.0])
    ablations: Ablations = Field(default_factory=Ablations)
    training: Training = Field(default_factory=Training)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    pretrain: Pretrain = Field(default_factory=Pretrain)
    executor: Executor = Field(default_factory=Executor)

    @model_validator(mode="after")
    def _check(self) -> "Study":
        from ..train import TrainSettings

        parts = [(f"training.{p}", {**self.training.common, **getattr(self.training, p)})
                 for p in ("common", "teacher_sft", "student_sft", "kd")]
        parts += [(f"domains.{d.name}.training", {**self.training.common, **d.training}) for d in self.domains]
        for where, values in parts:
            try:
                TrainSettings(**values)
            except ValidationError as e:
                err = e.errors()[0]
                raise ValueError(f"{where}.{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
        if any(t <= 0 for t in self.temperatures):
            raise ValueError("temperatures must all be > 0")
        return self


def load_study(path: str | Path) -> Study:
    """Parse and validate a study YAML; errors name the key, the bad value and the fix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such study file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a study file is a mapping with keys name, families, domains, ...")
    try:
        return Study(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        bad = f" (got {err['input']!r})" if not isinstance(err.get("input"), (dict, list)) else ""
        hint = " - remove it or check the spelling" if err["type"] == "extra_forbidden" else ""
        raise InputError(f"{path}: {key}: {err['msg']}{bad}{hint}") from None


def builtin_study(name: str = "demo") -> Path:
    """Path of a study YAML shipped in the package (``demo``)."""
    path = Path(__file__).parent.parent / "studies" / f"{name}.yaml"
    if not path.is_file():
        raise InputError(f"no built-in study {name!r}")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------------------------------
JobKind = Literal["pretrain", "sft", "cache", "kd", "eval", "fidelity", "analysis"]


@dataclass
class Job:
    kind: JobKind
    name: str
    params: dict[str, Any]
    deps: dict[str, "Job"] = field(default_factory=dict)

    @property
    def key(self) -> str:
        payload = {"kind": self.kind, "params": self.params, "deps": {k: d.key for k, d in sorted(self.deps.items())}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def folder(self) -> str:
        return f"{self.kind}-{self.key}"


def job_dir(root: Path, job: Job) -> Path:
    """Where a job of the study folder ``root`` keeps its outputs (checkpoints, per-item JSONL, caches)."""
    return root / "jobs" / job.folder


def _settings(study: Study, domain: Domain, part: str, **extra: Any) -> dict[str, Any]:
    lora = study.training.lora.model_dump() if study.training.lora else None
    return {**study.training.common, **domain.training, **getattr(study.training, part), "lora": lora, **extra}


def _sft_job(study: Study, entry: ModelEntry, domain: Domain, seed: int, base: "Job | None", teacher: bool) -> Job:
    part = "teacher_sft" if teacher else "student_sft"
    params = {"model": entry.model, "name": entry.name, "train": domain.train, "seed": seed,
              "settings": _settings(study, domain, part, objective="sft", seed=seed), "device": study.device,
              "trust_remote_code": entry.trust_remote_code}
    return Job("sft", f"SFT {entry.name} {domain.name} seed {seed}", params, {"base": base} if base else {})


def expand(study: Study) -> list[Job]:
    """All jobs of a study in dependency order."""
    jobs: dict[str, Job] = {}

    def add(job: Job) -> Job:
        return jobs.setdefault(job.key, job)

    evals: list[Job] = []
    for family in study.families:
        bases: dict[str, Job | None] = {}
        for entry in (*family.teachers, *family.students):
            steps = study.pretrain.steps.get(entry.name, 0)
            bases[entry.name] = add(Job("pretrain", f"pretrain {entry.name}", {
                "model": entry.model, "name": entry.name, "steps": steps, "data": study.pretrain.data,
                "extra_data": study.pretrain.extra_data, "lr": study.pretrain.lr,
                "micro_batch_size": study.pretrain.micro_batch_size, "seed": study.seeds[0],
                "prompt_style": study.training.common.get("prompt_style", "study"),
                "token_mask": study.pretrain.token_mask})) if steps else None
        for domain in study.domains:
            for entry in (*family.teachers, *family.students):
                evals.append(add(_eval_job(study, domain, entry, "-", "BaseModel", None, bases[entry.name], None)))
            for seed in study.seeds:
                teacher_sft = {}
                for entry in family.teachers:
                    teacher_sft[entry.name] = sft = add(_sft_job(study, entry, domain, seed, bases[entry.name], True))
                    evals.append(add(_eval_job(study, domain, entry, "-", "SFT", sft, bases[entry.name], seed)))
                for student in family.students:
                    if student.name in teacher_sft:  # a model that is also a teacher has one SFT row: the teacher's
                        continue
                    sft = add(_sft_job(study, student, domain, seed, bases[student.name], False))
                    evals.append(add(_eval_job(study, domain, student, "-", "SFT", sft, bases[student.name], seed)))
                for teacher in family.teachers:
                    caches = {variant: add(job) for variant, job in _cache_jobs(
                        study, domain, seed, teacher, teacher_sft[teacher.name], bases[teacher.name]).items()}
                    for student in family.students:
                        if not teacher_larger(teacher, student):
                            continue
                        for kd in _kd_variants(study, teacher.name):
                            job = add(_kd_job(study, domain, seed, teacher, student, kd, teacher_sft[teacher.name],
                                              bases[teacher.name], bases[student.name],
                                              caches.get(kd.get("base_teacher", False))))
                            evals.append(add(_eval_job(study, domain, student, teacher.name, kd["label"], job,
                                                       bases[student.name], seed, teacher_entry=teacher)))
    ordered = list(jobs.values())
    fidelity = _fidelity_jobs(study, evals)
    analysis = Job("analysis", "statistics and report", {"study": study.name}, {e.key: e for e in evals + fidelity})
    return ordered + fidelity + [analysis]


def teacher_larger(teacher: ModelEntry, student: ModelEntry) -> bool:
    """The study distils only into smaller students; sizes come from the names (e.g. Qwen2.5-7B), and a pair whose
    sizes cannot be read is kept unless it is the same model."""
    from ..stats import student_size

    if teacher.name == student.name:
        return False
    try:
        return student_size(teacher.name) > student_size(student.name)
    except InputError:
        return True


def _kd_variants(study: Study, teacher: str) -> list[dict[str, Any]]:
    out = []
    for method in study.methods:
        for t in study.temperatures:
            out.append({"method": method, "temperature": t, "label": f"student_{METHODS[method]['label']}_temp_{t}"})
    ab = study.ablations
    if not _ablated(study, teacher):
        return out
    label = METHODS[ab.method]["label"]
    if ab.base_teacher:
        out.append({"method": ab.method, "temperature": ab.temperature, "base_teacher": True,
                    "label": f"student_{label}_base_teacher_temp_{ab.temperature}"})
    for sigma in ab.noise_sigmas:
        out.append({"method": ab.method, "temperature": ab.temperature, "noise_sigma": sigma,
                    "label": f"student_{label}_noise_{sigma}_temp_{ab.temperature}"})
    return out


def _ablated(study: Study, teacher: str) -> bool:
    """Whether the teacher-signal ablations run for this teacher (``ablations.teachers``, default all)."""
    return study.ablations.teachers is None or teacher in study.ablations.teachers


def _cache_jobs(study: Study, domain: Domain, seed: int, teacher: ModelEntry, teacher_sft: Job,
                teacher_base: Job | None) -> dict[bool, Job]:
    """With ``training.kd.teacher_topk`` set, one teacher pass per (teacher, domain, seed) - and one more for the
    base-teacher ablation - serves every student, method and temperature (keyed: base_teacher True/False)."""
    kd = _settings(study, domain, "kd")
    if not kd.get("teacher_topk"):
        return {}
    temperatures = sorted({1.0, *study.temperatures, study.ablations.temperature})
    variants = [False, True] if study.ablations.base_teacher and _ablated(study, teacher.name) else [False]
    jobs = {}
    for base in variants:
        params = {"teacher": teacher.model, "train": domain.train, "seed": seed, "k": kd["teacher_topk"],
                  "temperatures": temperatures, "prompt_style": kd.get("prompt_style", "study"),
                  "max_length": kd.get("max_length", 256), "base_teacher": base, "device": study.device,
                  "trust_remote_code": teacher.trust_remote_code}
        deps = {} if base else {"teacher": teacher_sft}
        if teacher_base:
            deps["teacher_base"] = teacher_base
        label = "base teacher" if base else "teacher"
        jobs[base] = Job("cache", f"cache {label} {teacher.name} {domain.name} seed {seed}", params, deps)
    return jobs


def _kd_job(study: Study, domain: Domain, seed: int, teacher: ModelEntry, student: ModelEntry, kd: dict[str, Any],
            teacher_sft: Job, teacher_base: Job | None, student_base: Job | None, cache: Job | None = None) -> Job:
    method = METHODS[kd["method"]]
    settings = _settings(study, domain, "kd", objective=method["objective"], loss=method["loss"], temperature=kd["temperature"],
                         noise_sigma=kd.get("noise_sigma", 0.0), seed=seed)
    base_teacher = kd.get("base_teacher", False)
    params = {"student": student.model, "teacher": teacher.model, "train": domain.train, "seed": seed,
              "settings": settings, "base_teacher": base_teacher, "device": study.device, "label": kd["label"],
              "trust_remote_code": student.trust_remote_code or teacher.trust_remote_code}
    deps: dict[str, Job] = {} if base_teacher else {"teacher": teacher_sft}
    if teacher_base:
        deps["teacher_base"] = teacher_base
    if student_base:
        deps["base"] = student_base
    if cache is not None and method["objective"] != "seqkd":
        deps["cache"] = cache
    return Job("kd", f"{kd['label']} {teacher.name}->{student.name} {domain.name} seed {seed}", params, deps)


def _eval_job(study: Study, domain: Domain, entry: ModelEntry, teacher: str, method: str, trained: Job | None,
              base: Job | None, seed: int | None, teacher_entry: ModelEntry | None = None) -> Job:
    params = {"model": entry.model, "student": entry.name, "teacher": teacher, "method": method, "domain": domain.name,
              "seed": seed, "tasks": [t.model_dump() for t in domain.tasks], "evaluation": study.evaluation.model_dump(),
              "device": study.device, "trust_remote_code": entry.trust_remote_code}
    deps = {k: v for k, v in (("trained", trained), ("base", base)) if v is not None}
    return Job("eval", f"eval {method} {teacher}->{entry.name} {domain.name} seed {seed}", params, deps)


def _fidelity_jobs(study: Study, evals: list[Job]) -> list[Job]:
    """Agreement and rationale fidelity of every student row against its teacher's SFT evaluation."""
    teacher_evals = {(e.params["student"], e.params["domain"], e.params["seed"]): e
                     for e in evals if e.params["method"] == "SFT"}
    jobs = []
    for e in evals:
        p = e.params
        if p["method"] in ("BaseModel", "SFT") or p["teacher"] == "-":
            continue
        teacher_eval = teacher_evals.get((p["teacher"], p["domain"], p["seed"]))
        student_sft = teacher_evals.get((p["student"], p["domain"], p["seed"]))
        if teacher_eval is None or student_sft is None:
            continue
        jobs.append(Job("fidelity", f"fidelity {p['method']} {p['teacher']}->{p['student']} {p['domain']}",
                        {"teacher": p["teacher"], "student": p["student"], "method": p["method"], "domain": p["domain"],
                         "seed": p["seed"]},
                        {"teacher_eval": teacher_eval, "student_eval": e, "student_sft_eval": student_sft}))
    return jobs


# --------------------------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (key TEXT PRIMARY KEY, kind TEXT, name TEXT, status TEXT, started REAL,
  finished REAL, error TEXT, result TEXT);
CREATE TABLE IF NOT EXISTS rows (job_key TEXT, kind TEXT, domain TEXT, seed INTEGER, row TEXT);
CREATE TABLE IF NOT EXISTS items (job_key TEXT, task TEXT, idx INTEGER, record TEXT);
CREATE INDEX IF NOT EXISTS rows_job ON rows(job_key);
CREATE INDEX IF NOT EXISTS items_job ON items(job_key);
"""


class StudyStore:
    """One SQLite file per study: job states, result rows and per-item records; each job commits atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as c:
            c.executescript(SCHEMA)

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=60)
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def status(self, key: str) -> str | None:
        with self._conn() as c:
            row = c.execute("SELECT status FROM jobs WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def mark(self, job: Job, status: str, error: str | None = None) -> None:
        now = time.time()
        with self._conn() as c:
            c.execute(
                "INSERT INTO jobs(key, kind, name, status, started, finished, error) VALUES(?,?,?,?,?,?,?) "
                "ON CONFLICT(key) DO UPDATE SET status=excluded.status, error=excluded.error, "
                "started=CASE WHEN excluded.status='running' THEN excluded.started ELSE jobs.started END, "
                "finished=excluded.finished",
                (job.key, job.kind, job.name, status, now, None if status == "running" else now, error),
            )

    def complete(self, job: Job, result: dict[str, Any]) -> None:
        """Record a finished job and its rows / items in one transaction."""
        now = time.time()
        with self._conn() as c:
            c.execute("DELETE FROM rows WHERE job_key=?", (job.key,))
            c.execute("DELETE FROM items WHERE job_key=?", (job.key,))
            for kind, rows in result.get("rows", {}).items():
                c.executemany("INSERT INTO rows VALUES(?,?,?,?,?)",
                              [(job.key, kind, job.params.get("domain"), job.params.get("seed"), json.dumps(r))
                               for r in rows])
            c.executemany("INSERT INTO items VALUES(?,?,?,?)",
                          [(job.key, r["task"], r["index"], json.dumps(r)) for r in result.get("items", [])])
            summary = {k: v for k, v in result.items() if k not in ("rows", "items")}
            c.execute(
                "INSERT INTO jobs(key, kind, name, status, started, finished, result) VALUES(?,?,?,?,?,?,?) "
                "ON CONFLICT(key) DO UPDATE SET status='done', finished=excluded.finished, error=NULL, "
                "result=excluded.result",
                (job.key, job.kind, job.name, "done", now, now, json.dumps(summary)),
            )

    def result(self, key: str) -> dict[str, Any]:
        with self._conn() as c:
            row = c.execute("SELECT result FROM jobs WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row and row[0] else {}

    def rows(self, kind: str, keys: list[str] | None = None) -> list[dict[str, Any]]:
        with self._conn() as c:
            found = c.execute("SELECT job_key, domain, seed, row FROM rows WHERE kind=?", (kind,)).fetchall()
        wanted = None if keys is None else set(keys)
        return [{"_job": k, "_domain": d, "_seed": s, **json.loads(r)} for k, d, s, r in found
                if wanted is None or k in wanted]

    def items(self, key: str) -> list[dict[str, Any]]:
        with self._conn() as c:
            found = c.execute("SELECT record FROM items WHERE job_key=? ORDER BY task, idx", (key,)).fetchall()
        return [json.loads(r[0]) for r in found]

    def jobs(self) -> list[dict[str, Any]]:
        with self._conn() as c:
            found = c.execute("SELECT key, kind, name, status, started, finished, error FROM jobs").fetchall()
        cols = ("key", "kind", "name", "status", "started", "finished", "error")
        return [dict(zip(cols, r)) for r in found]


# --------------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class RunSummary:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)
    out_dir: Path = Path(".")


def study_dir(study: Study, out: str | Path | None) -> Path:
    return Path(out) if out is not None else Path("runs") / study.name


def run_study(study: Study, out: str | Path | None = None, progress: bool = True,
              log: Callable[[str], None] = print, redo: Sequence[str] = ()) -> RunSummary:
    """Run every job that is not done yet; a failed job is reported and blocks only its dependents. Jobs of the
    kinds in ``redo`` (and everything downstream of them) are computed again from scratch."""
    from .executors import make_backend, run_jobs

    jobs = expand(study)
    again = jobs_to_redo(jobs, redo)
    root = study_dir(study, out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(study.model_dump_json(indent=1))
    store = StudyStore(root / "study.sqlite")
    for job in again:
        if store.status(job.key) is not None:
            store.mark(job, "pending")
        shutil.rmtree(job_dir(root, job), ignore_errors=True)  # else the job would resume its old outputs
    backend = make_backend(study, root, progress)
    return run_jobs(jobs, store, backend, RunSummary(out_dir=root), log, progress)


def jobs_to_redo(jobs: Sequence[Job], kinds: Sequence[str]) -> list[Job]:
    """The jobs of the given kinds and every job that depends on one of them, in graph order."""
    unknown = sorted(set(kinds) - set(get_args(JobKind)))
    if unknown:
        raise InputError(f"--redo: unknown job kind(s) {unknown}; choose from {list(get_args(JobKind))}")
    chosen: set[str] = set()
    for job in jobs:  # expand() lists a job after everything it depends on
        if job.kind in kinds or any(d.key in chosen for d in job.deps.values()):
            chosen.add(job.key)
    return [j for j in jobs if j.key in chosen]
