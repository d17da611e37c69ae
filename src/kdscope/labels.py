"""Names of the study's things, in one place: the KD methods, row labels, teacher names and model sizes.

The study (study.md section 1) names a result row by a label that carries method and temperature,
``student_{KD|RevKD|GKD}_temp_{T}``, plus ``student_KD_base_teacher_temp_1.0``, ``SFT`` and ``BaseModel``. A KD
student of a teacher with another tokenizer (kdscope's cross-family runs, issue 16) carries its cross-tokenizer loss
in the label, ``student_{stem}_{xtok_kl|uld}_temp_{T}``, so its rows never mix with a same-family run's.
kdscope keeps that label in the ``Method`` column so exports keep the study's CSV layout, and carries the same
facts as typed columns (``KDMethod``, ``Temperature``, ``Ablation``, ``Seed``). The label parser here exists for
tables that lack those columns, i.e. the study's published CSVs.

This module sits just above ``tasks`` in the layering: it may import ``errors`` only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator

from .errors import InputError

# --------------------------------------------------------------------------------------------------------------
# The KD temperature: one default, one validation
# --------------------------------------------------------------------------------------------------------------

# T when a run names none; also the temperature a method that uses none (the study's GKD) is labelled with
DEFAULT_TEMPERATURE = 1.0


def is_temperature(value: float) -> bool:
    """The one rule for a KD temperature T (logits divided by T, loss times T^2): a finite number > 0."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(t) and t > 0


def check_temperature(value: float) -> float:
    """``value`` as a float, or an `InputError` when it is no temperature."""
    if not is_temperature(value):
        raise InputError(f"temperature must be > 0, got {value}")
    return float(value)


# A temperature field of a settings model (YAML study, training settings): pydantic runs `check_temperature`
Temperature = Annotated[float, AfterValidator(check_temperature)]

# --------------------------------------------------------------------------------------------------------------
# The one table of KD methods
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KDMethodSpec:
    """One distillation method as the study ran it."""

    name: str  # kdscope's and the paper's name: SeqKD, RevKD, GKD
    stem: str  # the stem of the study's row label: student_{stem}_temp_T
    objective: Literal["kd", "gkd"]  # kdscope training objective
    loss: str  # kdscope.losses name
    xtok_loss: str  # its cross-tokenizer counterpart, a kdscope.xtok loss name: the same divergence on aligned spans
    # Whether the study divides logits by T (and scales by T^2). Its released GKD ignores T, yet its tables still
    # label GKD rows ``temp_1.0``.
    uses_temperature: bool


KD_METHOD_TABLE: tuple[KDMethodSpec, ...] = (
    KDMethodSpec("SeqKD", "KD", "kd", "forward_kl", "xtok_kl", True),
    KDMethodSpec("RevKD", "RevKD", "kd", "reverse_kl", "xtok_reverse_kl", True),
    KDMethodSpec("GKD", "GKD", "gkd", "jsd", "xtok_jsd", False),
)
KD_METHODS: tuple[str, ...] = tuple(m.name for m in KD_METHOD_TABLE)
KDMethodName = Literal["SeqKD", "RevKD", "GKD"]
_BY_NAME = {m.name: m for m in KD_METHOD_TABLE}
_BY_STEM = {m.stem: m for m in KD_METHOD_TABLE}

SFT_LABEL = "SFT"
BASE_MODEL_LABEL = "BaseModel"
BASE_TEACHER = "base_teacher"  # the Ablation column's value for a never-fine-tuned teacher
NOISE_PREFIX = "noise_sigma="  # the Ablation column's value for a noisy teacher: noise_sigma=<sigma>
# The label the study's agreement/fidelity tables (EM1*, BLEU*) give their one KD row per pair.
PAIR_TABLE_KD_LABEL = "KD"


# How a study compares a teacher and a student whose tokenizers differ (kdscope.xtok): ``xtok_kl`` the method's own
# divergence on the shared vocabulary of aligned spans, ``uld`` the sorted-probability distance (no direction).
CROSS_TOKENIZER_LOSSES: tuple[str, ...] = ("xtok_kl", "uld")
CrossTokenizerName = Literal["xtok_kl", "uld"]


def cross_tokenizer_loss(method: str, cross_tokenizer: str) -> str:
    """The training loss of ``method`` across tokenizers: its xtok counterpart (SeqKD xtok_kl, RevKD
    xtok_reverse_kl, GKD xtok_jsd) or uld (SeqKD and GKD; RevKD has no uld counterpart)."""
    spec = method_spec(method)
    if cross_tokenizer == "xtok_kl":
        return spec.xtok_loss
    if cross_tokenizer == "uld":
        if spec.name == "RevKD":
            raise InputError("RevKD has no uld counterpart (ULD's sorted-probability distance has no direction); "
                             "use SeqKD or GKD with uld, or RevKD with xtok_kl")
        return "uld"
    raise InputError(f"unknown cross-tokenizer loss {cross_tokenizer!r}; use one of "
                     f"{', '.join(CROSS_TOKENIZER_LOSSES)}")


def method_spec(name: str) -> KDMethodSpec:
    """The method named ``name`` (SeqKD/RevKD/GKD) or its study stem (KD/RevKD/GKD)."""
    spec = _BY_NAME.get(str(name).strip()) or _BY_STEM.get(str(name).strip())
    if spec is None:
        raise InputError(f"unknown KD method {name!r}; use one of {', '.join(KD_METHODS)}")
    return spec


# --------------------------------------------------------------------------------------------------------------
# Row labels
# --------------------------------------------------------------------------------------------------------------


def _number(value: float) -> str:
    """Temperatures and sigmas as the study writes them: always with a decimal point (``2.0``, ``0.5``)."""
    return str(float(value))


def noise_ablation(sigma: float) -> str:
    """The Ablation column's value for teacher noise of scale ``sigma``."""
    return f"{NOISE_PREFIX}{_number(sigma)}"


def row_label(method: str, temperature: float = DEFAULT_TEMPERATURE, ablation: str = "", cross_tokenizer: str = "") -> str:
    """The study's row label of a KD student: ``student_KD_temp_2.0``, ``student_KD_base_teacher_temp_1.0``,
    ``student_KD_noise_2.0_temp_1.0`` (noise rows are kdscope's; the study released none); across tokenizers
    ``student_RevKD_xtok_kl_temp_2.0`` (no ablation)."""
    stem = method_spec(method).stem
    if cross_tokenizer:
        cross_tokenizer_loss(method, cross_tokenizer)  # a known loss that this method has
        if ablation:
            raise InputError(f"ablation {ablation!r}: the teacher-signal ablations run for same-family pairs only")
        return f"student_{stem}_{cross_tokenizer}_temp_{_number(temperature)}"
    if not ablation:
        return f"student_{stem}_temp_{_number(temperature)}"
    if ablation == BASE_TEACHER:
        return f"student_{stem}_base_teacher_temp_{_number(temperature)}"
    if ablation.startswith(NOISE_PREFIX):
        return f"student_{stem}_noise_{_number(float(ablation[len(NOISE_PREFIX):]))}_temp_{_number(temperature)}"
    raise InputError(f"unknown ablation {ablation!r}; use '', {BASE_TEACHER!r} or '{NOISE_PREFIX}<sigma>'")


@dataclass(frozen=True)
class RowLabel:
    """What a row label says. ``kd_method`` is empty and ``temperature`` NaN for SFT, BaseModel and unknown rows."""

    kind: Literal["kd", "sft", "base_model", "unknown"]
    kd_method: str = ""
    temperature: float = math.nan
    ablation: str = ""
    cross_tokenizer: str = ""  # "" (one tokenizer) | xtok_kl | uld

    @property
    def is_plain_kd(self) -> bool:
        """A KD student without teacher ablation: the rows the study's hypothesis tests use."""
        return self.kind == "kd" and not self.ablation


_NUM = r"(\d+(?:\.\d+)?)"
_STEMS = "|".join(re.escape(m.stem) for m in KD_METHOD_TABLE)
_KD_ROW = re.compile(rf"^student_({_STEMS})_temp_{_NUM}$")
_BASE_TEACHER_ROW = re.compile(rf"^student_({_STEMS})_base_teacher_temp_{_NUM}$")
_NOISE_ROW = re.compile(rf"^student_({_STEMS})_noise_{_NUM}_temp_{_NUM}$")
_CROSS_ROW = re.compile(rf"^student_({_STEMS})_({'|'.join(CROSS_TOKENIZER_LOSSES)})_temp_{_NUM}$")


def parse_row_label(label: object) -> RowLabel:
    """``student_RevKD_temp_2.0`` -> RowLabel("kd", "RevKD", 2.0); ``KD`` stems read as SeqKD."""
    text = str(label).strip()
    if text == SFT_LABEL:
        return RowLabel("sft")
    if text == BASE_MODEL_LABEL:
        return RowLabel("base_model")
    if match := _KD_ROW.match(text):
        return RowLabel("kd", _BY_STEM[match.group(1)].name, float(match.group(2)))
    if match := _BASE_TEACHER_ROW.match(text):
        return RowLabel("kd", _BY_STEM[match.group(1)].name, float(match.group(2)), BASE_TEACHER)
    if match := _CROSS_ROW.match(text):
        return RowLabel("kd", _BY_STEM[match.group(1)].name, float(match.group(3)), cross_tokenizer=match.group(2))
    if match := _NOISE_ROW.match(text):
        return RowLabel("kd", _BY_STEM[match.group(1)].name, float(match.group(3)),
                        noise_ablation(float(match.group(2))))
    return RowLabel("unknown")


def kd_method(label: object) -> tuple[str, float] | None:
    """``student_RevKD_temp_2.0`` -> ("RevKD", 2.0); None for any other row (SFT, BaseModel, ablations, unknown
    labels), which the hypothesis tests leave out."""
    parsed = parse_row_label(label)
    return (parsed.kd_method, parsed.temperature) if parsed.is_plain_kd else None


def is_base_teacher(label: object) -> bool:
    return parse_row_label(label).ablation == BASE_TEACHER


# --------------------------------------------------------------------------------------------------------------
# Teachers and sizes
# --------------------------------------------------------------------------------------------------------------


def teacher_name(raw: object) -> str:
    """Drop checkpoint suffixes the study left in teacher names (``Qwen2.5-3B_ckpt2400``), as its notebooks do."""
    return str(raw).split("_")[0]


_SIZE = re.compile(r"(\d+(?:\.\d+)?)([kKmMbB])$")
_SIZE_UNIT = {"k": 1e-6, "m": 1e-3, "b": 1.0}  # suffix -> billions


def student_size(name: str) -> float:
    """Parameter count in billions from a model name: ``Qwen2.5-0.5B`` -> 0.5, ``Llama-3.2-1B`` -> 1.0,
    ``TinyQwen-35K`` -> 3.5e-5 (K and M suffixes name the built-in tiny models)."""
    match = _SIZE.search(str(name).split("/")[-1].split("-")[-1].strip())
    if match is None:
        raise InputError(f"cannot read a model size from student name {name!r}; name students like 'Qwen2.5-0.5B'")
    return float(match.group(1)) * _SIZE_UNIT[match.group(2).lower()]


def size_or_nan(name: str) -> float:
    """Student size, NaN when the name carries none (e.g. a demo model): size tests then skip that row."""
    try:
        return student_size(name)
    except InputError:
        return math.nan


def format_size(billions: float) -> str:
    """A size in billions in human units, as model names write it: 3.5e-05 -> ``35K``, 1.5 -> ``1.5B``,
    0.5 -> ``0.5B`` (as in Qwen2.5-0.5B), 0.0015 -> ``1.5M``."""
    if math.isnan(billions):
        return "?"
    for scale, unit in ((0.1, "B"), (1e-3, "M"), (1e-6, "K")):
        if abs(billions) >= scale:
            return f"{round(billions / (1.0 if unit == 'B' else scale), 3):g}{unit}"
    return f"{round(billions * 1e9):g}"
