"""A study expanded into jobs: pretraining (built-in models only) -> SFT (teachers and student baselines) -> teacher
caches -> KD runs (methods x temperatures x ablations x seeds) -> evaluations -> fidelity -> analysis. The KD runs
of cross-family pairs (grids with ``cross_tokenizer``) come after every family's jobs, so a study without them
expands exactly as before.

Every job is keyed by a hash of everything that determines its output (its settings and the keys of the jobs it
reads), so re-running a study does only what is missing or changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Sequence, get_args

from ..errors import InputError
from ..labels import (BASE_MODEL_LABEL, BASE_TEACHER, DEFAULT_TEMPERATURE, NOISE_PREFIX, SFT_LABEL,
                      cross_tokenizer_loss, method_spec, noise_ablation, row_label, student_size)
from ..train import TrainSettings
from .spec import DomainSpec, KDRuns, ModelEntry, Study

JobKind = Literal["pretrain", "sft", "cache", "kd", "eval", "fidelity", "analysis"]


@dataclass
class Job:
    kind: JobKind
    name: str
    params: dict[str, Any]
    deps: dict[str, "Job"] = field(default_factory=dict)

    @cached_property  # a job's params and deps are fixed once expand() made it; the key is asked for often
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
    params = {"model": entry.model, "name": entry.name, "domain": domain.name, "train": domain.train, "seed": seed,
              "settings": resolved_settings(study, domain, part, objective="sft", seed=seed), "device": study.device,
              "trust_remote_code": entry.trust_remote_code}
    return Job("sft", f"SFT {entry.name} {domain.name} seed {seed}", params, {"base": base} if base else {})


def expand(study: Study) -> list[Job]:
    """All jobs of a study in dependency order."""
    jobs: dict[str, Job] = {}

    def add(job: Job) -> Job:
        return jobs.setdefault(job.key, job)

    evals: list[Job] = []
    all_bases: dict[str, Job | None] = {}
    all_sft: dict[tuple[str, str, int], Job] = {}  # (teacher, domain, seed) -> its SFT job, for cross-family pairs
    for family in study.families:
        bases: dict[str, Job | None] = {}
        for entry in (*family.teachers, *family.students):
            steps = study.pretrain.steps.get(entry.name, 0)
            bases[entry.name] = add(Job("pretrain", f"pretrain {entry.name}", {
                "model": entry.model, "name": entry.name, "steps": steps, "data": study.pretrain.data,
                "extra_data": study.pretrain.extra_data, "lr": study.pretrain.lr,
                "micro_batch_size": study.pretrain.micro_batch_size, "seed": study.seeds[0],
                "prompt_style": TrainSettings(**study.training.common).prompt_style,
                "token_mask": study.pretrain.token_mask})) if steps else None
        all_bases.update(bases)
        for domain in study.domains:
            for entry in (*family.teachers, *family.students):
                evals.append(add(_eval_job(study, domain, entry, "-", BASE_MODEL_LABEL, None, bases[entry.name],
                                           None)))
            for seed in study.seeds:
                teacher_sft = {}
                for entry in family.teachers:
                    teacher_sft[entry.name] = sft = add(_sft_job(study, entry, domain, seed, bases[entry.name], True))
                    all_sft[(entry.name, domain.name, seed)] = sft
                    evals.append(add(_eval_job(study, domain, entry, "-", SFT_LABEL, sft, bases[entry.name], seed)))
                for student in family.students:
                    if student.name in teacher_sft:  # a model that is also a teacher has one SFT row: the teacher's
                        continue
                    sft = add(_sft_job(study, student, domain, seed, bases[student.name], False))
                    evals.append(add(_eval_job(study, domain, student, "-", SFT_LABEL, sft, bases[student.name],
                                               seed)))
                for teacher in family.teachers:
                    students = [s for s in family.students if teacher_larger(teacher, s)]
                    caches = {variant: add(job) for variant, job in _cache_jobs(
                        study, domain, seed, teacher, students, teacher_sft[teacher.name],
                        bases[teacher.name]).items()}
                    for student in students:
                        for run in kd_runs(study, teacher.name, student.name):
                            job = add(_kd_job(study, domain, seed, teacher, student, run, teacher_sft[teacher.name],
                                              bases[teacher.name], bases[student.name], caches.get(run.base_teacher)))
                            evals.append(add(_eval_job(study, domain, student, teacher.name, run.label, job,
                                                       bases[student.name], seed, run)))
    for domain in study.domains:
        for seed in study.seeds:
            for teacher, student in cross_family_pairs(study):
                for run in kd_runs(study, teacher.name, student.name, cross=True):
                    job = add(_kd_job(study, domain, seed, teacher, student, run,
                                      all_sft[(teacher.name, domain.name, seed)], all_bases[teacher.name],
                                      all_bases[student.name]))
                    evals.append(add(_eval_job(study, domain, student, teacher.name, run.label, job,
                                               all_bases[student.name], seed, run)))
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


def cross_family_pairs(study: Study) -> list[tuple[ModelEntry, ModelEntry]]:
    """Every (teacher, student) of different families, in the study's order (a cross-family grid picks its own)."""
    return [(teacher, student) for t_family in study.families for teacher in t_family.teachers
            for s_family in study.families if s_family.name != t_family.name for student in s_family.students
            if student.name != teacher.name]


@dataclass(frozen=True)
class KDRun:
    """One KD student of a (teacher, student) pair: method, temperature and teacher-signal ablation."""

    method: str  # SeqKD / RevKD / GKD
    temperature: float
    ablation: str = ""  # "" | "base_teacher" | "noise_sigma=<s>" (the result rows' Ablation column)
    cross_tokenizer: str = ""  # "" (same family) | xtok_kl | uld (kdscope.labels.cross_tokenizer_loss)

    @property
    def base_teacher(self) -> bool:
        return self.ablation == BASE_TEACHER

    @property
    def noise_sigma(self) -> float:
        return float(self.ablation.removeprefix(NOISE_PREFIX)) if self.ablation.startswith(NOISE_PREFIX) else 0.0

    @property
    def label(self) -> str:
        return row_label(self.method, self.temperature, self.ablation, self.cross_tokenizer)

    @property
    def loss(self) -> str:
        """The TrainSettings loss: the method's own, or its cross-tokenizer counterpart."""
        spec = method_spec(self.method)
        return cross_tokenizer_loss(self.method, self.cross_tokenizer) if self.cross_tokenizer else spec.loss


def kd_grids(study: Study) -> list[KDRuns]:
    """The study's KD grids: ``kd_runs`` as written, or ``methods`` x ``temperatures`` (a list for every method, or
    one per method, 1.0 where a method has none) for every pair."""
    if study.kd_runs is not None:
        return study.kd_runs
    if isinstance(study.temperatures, dict):
        return [KDRuns(methods=[m], temperatures=study.temperatures.get(m, [DEFAULT_TEMPERATURE]))
                for m in study.methods]
    return [KDRuns(methods=study.methods, temperatures=study.temperatures)]


def kd_runs(study: Study, teacher: str, student: str, cross: bool = False) -> list[KDRun]:
    """Every KD student of one pair, in the study's order. A method whose study loss uses no temperature (GKD) runs
    once, at 1.0, as the study's tables label it. ``cross``: a pair from different families, which only the grids
    with a ``cross_tokenizer`` loss cover (and no ablation); a same-family pair ignores those grids."""
    runs: dict[KDRun, None] = {}
    for grid in kd_grids(study):
        if (grid.cross_tokenizer is not None) != cross:
            continue
        if grid.teachers is not None and teacher not in grid.teachers:
            continue
        if grid.students is not None and student not in grid.students:
            continue
        for method in grid.methods:
            temperatures = grid.temperatures if method_spec(method).uses_temperature else [DEFAULT_TEMPERATURE]
            runs.update((KDRun(method, float(t), cross_tokenizer=grid.cross_tokenizer or ""), None)
                        for t in temperatures)
    if cross:
        return list(runs)
    ab = study.ablations
    if ab.teachers is None or teacher in ab.teachers:
        temperature = ab.temperature if method_spec(ab.method).uses_temperature else DEFAULT_TEMPERATURE
        if ab.base_teacher:
            runs[KDRun(ab.method, temperature, BASE_TEACHER)] = None
        runs.update((KDRun(ab.method, temperature, noise_ablation(sigma)), None) for sigma in ab.noise_sigmas)
    return list(runs)


def _uses_cache(run: KDRun) -> bool:
    """The cache holds the noise-free top-k only: noise runs (N(0, sigma^2) on every logit) use the teacher online."""
    return not run.noise_sigma


def _cache_jobs(study: Study, domain: DomainSpec, seed: int, teacher: ModelEntry, students: list[ModelEntry],
                teacher_sft: Job, teacher_base: Job | None) -> dict[bool, Job]:
    """With ``training.kd.teacher_topk`` set, one teacher pass per (teacher, domain, seed) - and one more for the
    base-teacher ablation - serves every student, method and temperature (keyed: base_teacher True/False). The job
    names its students: it stores one cache per common vocabulary width among them (Qwen2.5-14B's 152,064 logits
    are cut to 151,936 for the 0.5B-3B students, kept whole for the 7B)."""
    kd = TrainSettings(**resolved_settings(study, domain, "kd", objective="kd"))  # its defaults, none restated here
    if not kd.teacher_topk:
        return {}
    runs = [r for s in students for r in kd_runs(study, teacher.name, s.name) if _uses_cache(r)]
    temperatures = sorted({1.0, *(r.temperature for r in runs)})
    variants = sorted({r.base_teacher for r in runs})
    jobs = {}
    for base in variants:
        params = {"teacher": teacher.model, "teacher_name": teacher.name, "domain": domain.name, "train": domain.train,
                  "seed": seed, "k": kd.teacher_topk, "temperatures": temperatures, "prompt_style": kd.prompt_style,
                  "max_length": kd.max_length, "base_teacher": base, "device": study.device,
                  "trust_remote_code": teacher.trust_remote_code,
                  "students": sorted({(s.model, s.trust_remote_code) for s in students
                                      if any(_uses_cache(r) and r.base_teacher == base
                                             for r in kd_runs(study, teacher.name, s.name))})}
        deps = {} if base else {"teacher": teacher_sft}
        if teacher_base:
            deps["teacher_base"] = teacher_base
        label = "base teacher" if base else "teacher"
        jobs[base] = Job("cache", f"cache {label} {teacher.name} {domain.name} seed {seed}", params, deps)
    return jobs


def _kd_job(study: Study, domain: DomainSpec, seed: int, teacher: ModelEntry, student: ModelEntry, run: KDRun,
            teacher_sft: Job, teacher_base: Job | None, student_base: Job | None, cache: Job | None = None) -> Job:
    method = method_spec(run.method)
    settings = resolved_settings(study, domain, "kd", objective=method.objective, loss=run.loss,
                                 temperature=run.temperature, noise_sigma=run.noise_sigma, seed=seed)
    if run.cross_tokenizer:  # the teacher's whole distribution on its own tokens, online: no top-k, no cache
        settings["teacher_topk"] = None
    params = {"student": student.model, "teacher": teacher.model, "train": domain.train, "seed": seed,
              "student_name": student.name, "teacher_name": teacher.name, "domain": domain.name,
              "settings": settings, "base_teacher": run.base_teacher, "device": study.device, "label": run.label,
              "kd_method": run.method, "temperature": run.temperature, "ablation": run.ablation,
              "trust_remote_code": student.trust_remote_code or teacher.trust_remote_code}
    if run.cross_tokenizer:
        params["cross_tokenizer"] = run.cross_tokenizer
    deps: dict[str, Job] = {} if run.base_teacher else {"teacher": teacher_sft}
    if teacher_base:
        deps["teacher_base"] = teacher_base
    if student_base:
        deps["base"] = student_base
    if cache is not None and _uses_cache(run):
        deps["cache"] = cache
    return Job("kd", f"{run.label} {teacher.name}->{student.name} {domain.name} seed {seed}", params, deps)


def _eval_job(study: Study, domain: DomainSpec, entry: ModelEntry, teacher: str, method: str, trained: Job | None,
              base: Job | None, seed: int | None, run: KDRun | None = None) -> Job:
    """An evaluation; its params say what the row is (``method`` the study's row label, ``kd_method``,
    ``temperature``, ``ablation`` the typed columns)."""
    params = {"model": entry.model, "student": entry.name, "teacher": teacher, "method": method, "domain": domain.name,
              "seed": seed, "tasks": [t.model_dump() for t in domain.tasks], "evaluation": study.evaluation.model_dump(),
              "device": study.device, "trust_remote_code": entry.trust_remote_code,
              "kd_method": run.method if run else "", "temperature": run.temperature if run else None,
              "ablation": run.ablation if run else ""}
    deps = {k: v for k, v in (("trained", trained), ("base", base)) if v is not None}
    return Job("eval", f"eval {method} {teacher}->{entry.name} {domain.name} seed {seed}", params, deps)


def _fidelity_jobs(study: Study, evals: list[Job]) -> list[Job]:
    """Agreement and rationale fidelity of every student row against its teacher's SFT evaluation."""
    teacher_evals = {(e.params["student"], e.params["domain"], e.params["seed"]): e
                     for e in evals if e.params["method"] == SFT_LABEL}
    jobs = []
    for e in evals:
        p = e.params
        if not p["kd_method"]:
            continue
        teacher_eval = teacher_evals.get((p["teacher"], p["domain"], p["seed"]))
        student_sft = teacher_evals.get((p["student"], p["domain"], p["seed"]))
        if teacher_eval is None or student_sft is None:
            continue
        jobs.append(Job("fidelity", f"fidelity {p['method']} {p['teacher']}->{p['student']} {p['domain']}",
                        {"teacher": p["teacher"], "student": p["student"], "method": p["method"], "domain": p["domain"],
                         "seed": p["seed"], "kd_method": p["kd_method"], "temperature": p["temperature"],
                         "ablation": p["ablation"]},
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
