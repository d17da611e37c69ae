"""The study file: a YAML schema (pydantic) that says which models, domains, methods, temperatures, ablations and
settings a study runs. Loading validates everything a study names before any job runs; errors name the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ..data import SYNTHETIC_PREFIX, load_training_data, read_text_file
from ..errors import InputError, describe, dotted, one_line
from ..labels import (DEFAULT_TEMPERATURE, KD_METHODS, CrossTokenizerName, KDMethodName, cross_tokenizer_loss,
                      is_temperature, method_spec)
from ..models import BUILTIN_MODELS, BUILTIN_PREFIX, LoraSettings
from ..synthetic import GENERATORS
from ..tasks import get_task
from ..train import TrainSettings

class _Strict(BaseModel):
    model_config = {"extra": "forbid"}


class ModelEntry(_Strict):
    name: str = Field(description="display name in result tables; end it with the size, e.g. Qwen2.5-0.5B")
    model: str = Field(description="hub id, local folder, .gguf file or builtin:<name>")
    trust_remote_code: bool = False


class Family(_Strict):
    """Models that share one tokenizer. Distillation happens within a family, and across families only in the KD
    grids that name a cross-tokenizer loss (``kd_runs[].cross_tokenizer``)."""

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


class DomainSpec(_Strict):
    """One domain of the study: its training set, test tasks and training overrides."""

    name: Literal["math", "commonsense"]
    train: str = Field(description="training data: study JSON/JSONL file or synthetic:<domain>[:n]")
    tasks: list[TaskEntry]
    training: dict[str, Any] = Field(default_factory=dict, description="TrainSettings overrides for this domain, "
                                     "e.g. {epochs: 4} for math as in the study")


class KDRuns(_Strict):
    """One grid of KD runs: every listed method at every listed temperature, for the named teachers and students
    (default: every pair). A study's KD runs are the union of its grids.

    ``cross_tokenizer`` makes it a cross-family grid: its pairs are a teacher and a student from different families
    (any sizes, both directions if both are named), distilled on aligned spans (kdscope.xtok) with the methods'
    cross-tokenizer counterparts: ``xtok_kl`` gives SeqKD forward, RevKD reverse KL and GKD the JSD on the shared
    vocabulary (xtok_kl, xtok_reverse_kl, xtok_jsd; GKD's samples re-tokenised for the teacher); ``uld`` gives SeqKD
    and GKD the ULD distance. Such runs read the teacher online (a teacher cache or top-k holds the student's
    vocabulary only) and get no teacher-signal ablations. Without it a grid covers same-family pairs only."""

    methods: list[KDMethodName] = Field(min_length=1)
    temperatures: list[float] = Field(default_factory=lambda: [DEFAULT_TEMPERATURE])
    teachers: list[str] | None = Field(None, description="teacher names these runs are for (default: all)")
    students: list[str] | None = Field(None, description="student names these runs are for (default: all)")
    cross_tokenizer: CrossTokenizerName | None = Field(
        None, description="xtok_kl | uld: pairs from different families, with this cross-tokenizer loss")


class Ablations(_Strict):
    """Teacher-signal ablations, each one KD run per (teacher, student) with ``method`` at ``temperature``."""

    base_teacher: bool = Field(False, description="KD from the teacher before task fine-tuning")
    noise_sigmas: list[float] = Field(default_factory=list, description="Gaussian noise on every teacher logit")
    method: KDMethodName = "SeqKD"
    temperature: float = DEFAULT_TEMPERATURE  # checked with every temperature of the study in Study's validator
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
    seeds: list[int] = Field(default_factory=lambda: [6], min_length=1)
    device: str = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (1 is fastest for tiny models on a busy CPU)")
    families: list[Family]
    domains: list[DomainSpec]
    methods: list[KDMethodName] = Field(default_factory=lambda: list(KD_METHODS))
    temperatures: list[float] | dict[KDMethodName, list[float]] = Field(
        default_factory=lambda: [1.0, 2.0, 5.0],
        description="for every method, or per method ({SeqKD: [1, 2, 5], GKD: [1]}); a method whose study loss "
                    "uses no temperature (GKD) runs once, at 1.0")
    kd_runs: list[KDRuns] | None = Field(None, description="KD runs as grids, instead of methods x temperatures")
    ablations: Ablations = Field(default_factory=Ablations)
    training: Training = Field(default_factory=Training)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    pretrain: Pretrain = Field(default_factory=Pretrain)
    executor: Executor = Field(default_factory=Executor)

    @model_validator(mode="after")
    def _check(self) -> "Study":
        if self.kd_runs is not None and {"methods", "temperatures"} & self.model_fields_set:
            raise ValueError("kd_runs: give either kd_runs or methods/temperatures, not both")
        teachers = {t.name for f in self.families for t in f.teachers}
        students = {s.name for f in self.families for s in f.students}
        for where, named, known in self._named_models(teachers, students):
            unknown = sorted(set(named) - known)
            if unknown:
                raise ValueError(f"{where}: no model named {unknown[0]!r}; the study's names are "
                                 f"{', '.join(sorted(known))}")
        self._check_cross_grids()
        for where, method, temperatures in self._method_temperatures():
            if not all(map(is_temperature, temperatures)):
                raise ValueError(f"{where}: temperatures must all be > 0 (got {temperatures})")
            if not method_spec(method).uses_temperature and any(t != DEFAULT_TEMPERATURE for t in temperatures) \
                    and where != "temperatures":
                raise ValueError(f"{where}: {method} uses no temperature (the study's GKD ignores T); "
                                 "list it at 1.0 only")
        for where, values in self._training_parts():
            design = sorted(set(values) & set(DESIGN_KEYS))
            if design:
                raise ValueError(f"{where}.{design[0]}: set by the study's design ({DESIGN_KEYS[design[0]]}), "
                                 "not by training settings - remove it")
        return self

    def _check_cross_grids(self) -> None:
        family_of = {e.name: f.name for f in self.families for e in (*f.teachers, *f.students)}
        seen: dict[tuple[str, str, str], tuple[str, int]] = {}
        for i, grid in enumerate(self.kd_runs or []):
            if grid.cross_tokenizer is None:
                continue
            for method in grid.methods:
                try:
                    cross_tokenizer_loss(method, grid.cross_tokenizer)
                except InputError as e:
                    raise ValueError(f"kd_runs.{i}.methods: {e}") from None
            teachers = grid.teachers or [t.name for f in self.families for t in f.teachers]
            students = grid.students or [s.name for f in self.families for s in f.students]
            pairs = [(t, s) for t in teachers for s in students if family_of[t] != family_of[s]]
            if not pairs:
                raise ValueError(f"kd_runs.{i}.cross_tokenizer: no teacher and student of different families in this "
                                 "grid; a cross-tokenizer grid pairs models of different families")
            # the report takes a pair's best KD row per method (over temperatures): one cross-tokenizer loss each
            for method in grid.methods:
                for pair in pairs:
                    other = seen.setdefault((*pair, method), (grid.cross_tokenizer, i))
                    if other[0] != grid.cross_tokenizer:
                        raise ValueError(
                            f"kd_runs.{i}.cross_tokenizer: {pair[0]} -> {pair[1]} {method} already runs with "
                            f"{other[0]} (kd_runs.{other[1]}); the report takes a pair's best KD row per method, so "
                            "give each method one cross-tokenizer loss per pair (run the other in a second study)")

    def _named_models(self, teachers: set[str], students: set[str]) -> list[tuple[str, list[str], set[str]]]:
        named = [("ablations.teachers", self.ablations.teachers or [], teachers)]
        for i, grid in enumerate(self.kd_runs or []):
            named += [(f"kd_runs.{i}.teachers", grid.teachers or [], teachers),
                      (f"kd_runs.{i}.students", grid.students or [], students)]
        return named

    def _method_temperatures(self) -> list[tuple[str, str, list[float]]]:
        found = []
        if isinstance(self.temperatures, dict):
            found += [(f"temperatures.{m}", m, ts) for m, ts in self.temperatures.items()]
        else:
            found += [("temperatures", m, self.temperatures) for m in self.methods]
        for i, grid in enumerate(self.kd_runs or []):
            found += [(f"kd_runs.{i}.temperatures", m, grid.temperatures) for m in grid.methods]
        found.append(("ablations.temperature", self.ablations.method, [self.ablations.temperature]))
        return found

    def _training_parts(self) -> list[tuple[str, dict[str, Any]]]:
        parts = [(f"training.{p}", getattr(self.training, p)) for p in TRAINING_PARTS]
        return parts + [(f"domains.{i}.training", d.training) for i, d in enumerate(self.domains)]


# Settings the study's design decides per run; a value under training.* would be ignored, so it is refused.
DESIGN_KEYS = {"objective": "methods", "loss": "methods (SeqKD forward_kl, RevKD reverse_kl, GKD jsd) and "
                                               "kd_runs[].cross_tokenizer (xtok_kl, uld)",
               "temperature": "temperatures / kd_runs", "noise_sigma": "ablations.noise_sigmas",
               "base_teacher": "ablations.base_teacher", "seed": "seeds", "lora": "training.lora"}
TRAINING_PARTS = ("common", "teacher_sft", "student_sft", "kd")
# The objective each part trains with, so its settings are checked as that run will see them.
PART_OBJECTIVES = {"common": "sft", "teacher_sft": "sft", "student_sft": "sft", "kd": "kd"}


def check_training_settings(study: Study) -> None:
    """Every ``training.*`` and ``domains.N.training`` mapping is valid TrainSettings, on its own (so an error names
    the key where it is written) and as each kind of run combines them."""
    for where, values in study._training_parts():
        try:
            TrainSettings(**values)
        except ValidationError as e:
            raise one_line(e, name=lambda loc, where=where: dotted((where, *loc))) from None
    for i, domain in enumerate(study.domains):
        for part in TRAINING_PARTS[1:]:
            merged = {**study.training.common, **domain.training, **getattr(study.training, part)}
            methods = [method_spec(m) for m in KD_METHODS] if part == "kd" else []
            runs = [{"objective": m.objective, "loss": m.loss} for m in methods] or [{"objective": "sft"}]
            if part == "kd":  # the cross-family runs (kdscope.study.graph: their teacher is read online, dense)
                runs += [{"objective": method_spec(m).objective, "loss": cross_tokenizer_loss(m, grid.cross_tokenizer),
                          "teacher_topk": None} for grid in study.kd_runs or [] if grid.cross_tokenizer
                         for m in grid.methods]
            for run in runs:
                try:
                    TrainSettings(**{**merged, **run})
                except ValidationError as e:
                    raise one_line(e, name=lambda loc, part=part, i=i: dotted(
                        (f"training.{part} (with domains.{i}.training)", *loc))) from None


def check_inputs(study: Study, *, allow_missing: bool = False) -> list[dict[str, str]]:
    """Every input the study names exists and loads: training files (and synthetic: sources), test data folders and
    built-in model names. Runs before any job, so a bad input costs seconds, not a pretraining run.

    With ``allow_missing`` (``--plan``: the design of a study whose data is elsewhere, e.g. the published example in a
    fresh clone) a file or folder that does not exist is returned ({where, path, error}) instead of raised; one that
    exists but does not load is still an error."""
    missing: list[dict[str, str]] = []

    def absent(where: str, path: str, message: str) -> None:
        if not allow_missing:
            raise InputError(f"{where}: {path}: {message}")
        missing.append({"where": where, "path": path, "error": message})

    for family in study.families:
        for entry in (*family.teachers, *family.students):
            name = entry.model.removeprefix(BUILTIN_PREFIX)
            if entry.model.startswith(BUILTIN_PREFIX) and name not in BUILTIN_MODELS:
                raise InputError(f"families.{family.name}: model {entry.model!r} is not a built-in model; choose "
                                 f"from {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}")
    sources = [(f"domains.{d.name}.train", d.train) for d in study.domains]
    if any(study.pretrain.steps.values()):
        sources += [("pretrain.data", study.pretrain.data)]
        sources += [(f"pretrain.extra_data.{i}", src) for i, src in enumerate(study.pretrain.extra_data)]
    for where, source in sources:
        if not source.startswith(SYNTHETIC_PREFIX) and not Path(source).is_file():
            absent(where, source, f"no such file; give a study JSON/JSONL file or {SYNTHETIC_PREFIX}<math|commonsense>[:n]")
            continue
        try:
            examples = load_training_data(source, seed=study.seeds[0])
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        if not examples:
            raise InputError(f"{where}: {source} holds no examples; training needs at least one row")
    for domain in study.domains:
        for task in domain.tasks:
            where = f"domains.{domain.name}.tasks.{task.task}"
            if task.data is None:
                if get_task(task.task).name not in GENERATORS:
                    raise InputError(f"{where}: needs a data: path (only built-in generated tasks can omit it)")
            elif not task.data.startswith("hf:") and not Path(task.data).exists():
                absent(f"{where}.data", task.data, "no such file or folder; give the study's dataset folder "
                       "(<task>/test.json), a JSON/JSONL file or a save_to_disk folder")
    return missing


# libyaml's safe loader when PyYAML was built with it: the same documents and error marks, ten times faster
SAFE_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml_position(error: yaml.YAMLError, text: str) -> str:
    """`` at line L, column C`` (1-based) of a YAML error: a syntax error has a mark, a bad character a position."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f" at line {mark.line + 1}, column {mark.column + 1}"
    character = getattr(error, "character", None)  # a character YAML refuses (libyaml counts bytes, not characters)
    position = text.find(chr(character) if isinstance(character, int) else str(character)) if character else -1
    if position >= 0:
        line_start = text.rfind("\n", 0, position) + 1
        return f" at line {text.count(chr(10), 0, position) + 1}, column {position - line_start + 1}"
    return ""


def load_study(path: str | Path, *, allow_missing_inputs: bool = False) -> Study:
    """Parse and validate a study YAML and everything it names (training settings, data, built-in models); errors
    name the key, the bad value and the fix. ``allow_missing_inputs``: see ``check_inputs`` (for ``--plan``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such study file")
    text = read_text_file(path)
    try:
        raw = yaml.load(text, Loader=SAFE_YAML_LOADER)
    except yaml.YAMLError as e:
        raise InputError(f"{path}: invalid YAML{_yaml_position(e, text)}: "
                         f"{getattr(e, 'problem', None) or getattr(e, 'reason', None) or e}") from None
    except (ValueError, RecursionError) as e:  # a value YAML cannot build (a date 2020-13-45), nesting too deep
        raise InputError(f"{path}: invalid YAML value ({e}); quote it to keep it as text") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a study file is a mapping with keys name, families, domains, ...")
    try:
        study = Study.model_validate(raw)
    except ValidationError as e:
        raise one_line(e, str(path)) from None
    try:
        check_training_settings(study)
        check_inputs(study, allow_missing=allow_missing_inputs)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    return study


def builtin_study(name: str = "demo") -> Path:
    """Path of a study YAML shipped in the package (``demo``)."""
    path = Path(__file__).parent.parent / "studies" / f"{name}.yaml"
    if not path.is_file():
        raise InputError(f"no built-in study {name!r}")
    return path
