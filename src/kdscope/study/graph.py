"""A study expanded into jobs: pretraining (built-in models only) -> SFT (teachers and student baselines) -> teacher
caches -> KD runs (methods x temperatures x ablations x seeds) -> evaluations -> fidelity -> analysis.

Every job is keyed by a hash of everything that determines its output (its settings and the keys of the jobs it
reads), so re-running a study does only what is missing or changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

from ..errors import InputError
from ..labels import student_size
from .spec import METHODS, DomainSpec, ModelEntry, Study

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


def resolved_settings(study: Study, domain: DomainSpec, part: str, **extra: Any) -> dict[str, Any]:
    """TrainSettings overrides of one kind of run (``part``): common < domain < part < ``extra``."""
    lora = study.training.lora.model_dump() if study.training.lora else None
    return {**study.training.common, **domain.training, **getattr(study.training, part), "lora": lora, **extra}


def _sft_job(study: Study, entry: ModelEntry, domain: DomainSpec, seed: int, base: "Job | None", teacher: bool) -> Job:
    part = "teacher_sft" if teacher else "student_sft"
    params = {"model": entry.model, "name": entry.name, "train": domain.train, "seed": seed,
              "settings": resolved_settings(study, domain, part, objective="sft", seed=seed), "device": study.device,
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


def _cache_jobs(study: Study, domain: DomainSpec, seed: int, teacher: ModelEntry, teacher_sft: Job,
                teacher_base: Job | None) -> dict[bool, Job]:
    """With ``training.kd.teacher_topk`` set, one teacher pass per (teacher, domain, seed) - and one more for the
    base-teacher ablation - serves every student, method and temperature (keyed: base_teacher True/False)."""
    kd = resolved_settings(study, domain, "kd")
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


def _kd_job(study: Study, domain: DomainSpec, seed: int, teacher: ModelEntry, student: ModelEntry, kd: dict[str, Any],
            teacher_sft: Job, teacher_base: Job | None, student_base: Job | None, cache: Job | None = None) -> Job:
    method = METHODS[kd["method"]]
    settings = resolved_settings(study, domain, "kd", objective=method["objective"], loss=method["loss"], temperature=kd["temperature"],
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
    # the cache holds the noise-free top-k only: noise runs (N(0, sigma^2) on every logit) use the teacher online
    if cache is not None and method["objective"] != "seqkd" and not kd.get("noise_sigma"):
        deps["cache"] = cache
    return Job("kd", f"{kd['label']} {teacher.name}->{student.name} {domain.name} seed {seed}", params, deps)


def _eval_job(study: Study, domain: DomainSpec, entry: ModelEntry, teacher: str, method: str, trained: Job | None,
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
