"""kdscope.labels: the one table of KD methods, row labels both ways, teacher names and model sizes."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import BaseModel, ValidationError

from kdscope.errors import InputError
from kdscope.labels import (BASE_TEACHER, DEFAULT_TEMPERATURE, KD_METHOD_TABLE, KD_METHODS, Temperature,
                            check_temperature, format_size, is_temperature, kd_method, method_spec, noise_ablation,
                            parse_row_label, row_label, student_size, teacher_name)
from kdscope.losses import LOSS_NAMES, distill_loss
from kdscope.teacher import OnlineTeacher


def test_method_table_matches_the_study() -> None:
    assert KD_METHODS == ("SeqKD", "RevKD", "GKD")
    assert {m.name: m.stem for m in KD_METHOD_TABLE} == {"SeqKD": "KD", "RevKD": "RevKD", "GKD": "GKD"}
    assert {m.name: m.loss for m in KD_METHOD_TABLE} == {"SeqKD": "forward_kl", "RevKD": "reverse_kl", "GKD": "jsd"}
    assert [m.name for m in KD_METHOD_TABLE if not m.uses_temperature] == ["GKD"]
    assert all(m.loss in LOSS_NAMES for m in KD_METHOD_TABLE)
    assert method_spec("KD").name == "SeqKD"
    with pytest.raises(InputError, match="unknown KD method"):
        method_spec("DistilKD")


@pytest.mark.parametrize("method,temperature,ablation,label", [
    ("SeqKD", 2, "", "student_KD_temp_2.0"),
    ("RevKD", 5.0, "", "student_RevKD_temp_5.0"),
    ("GKD", 1.0, "", "student_GKD_temp_1.0"),
    ("SeqKD", 1.0, BASE_TEACHER, "student_KD_base_teacher_temp_1.0"),
    ("RevKD", 1.0, noise_ablation(2), "student_RevKD_noise_2.0_temp_1.0"),
])
def test_row_labels_round_trip(method: str, temperature: float, ablation: str, label: str) -> None:
    assert row_label(method, temperature, ablation) == label
    parsed = parse_row_label(label)
    assert (parsed.kind, parsed.kd_method, parsed.temperature, parsed.ablation) == \
        ("kd", method, float(temperature), ablation)
    assert kd_method(label) == ((method, float(temperature)) if not ablation else None)


def test_non_kd_rows() -> None:
    assert parse_row_label("SFT").kind == "sft"
    assert parse_row_label(" BaseModel ").kind == "base_model"
    unknown = parse_row_label("student_XKD_temp_1.0")
    assert unknown.kind == "unknown" and math.isnan(unknown.temperature) and kd_method("SFT") is None


def test_teacher_and_sizes() -> None:
    assert teacher_name("Qwen2.5-3B_ckpt2400") == "Qwen2.5-3B"
    assert student_size("Qwen2.5-0.5B") == 0.5 and student_size("Llama-3.2-1B") == 1.0
    assert student_size("TinyQwen-35K") == pytest.approx(3.5e-5)
    with pytest.raises(InputError, match="cannot read a model size"):
        student_size("demo")


@pytest.mark.parametrize("name", ["TinyQwen-35K", "Qwen2.5-0.5B", "Qwen2.5-1.5B", "Llama-3.2-1B", "Qwen2.5-14B",
                                  "Tiny-1.5M", "Tiny-120K"])
def test_format_size_writes_sizes_as_model_names_do(name: str) -> None:
    """Issue 13: the size axis read 3.5e-05B; a formatted size must read back to the same size."""
    text = format_size(student_size(name))
    assert "e" not in text
    assert text == name.split("-")[-1]
    assert student_size(f"x-{text}") == pytest.approx(student_size(name))


def test_name_parsing() -> None:
    assert kd_method("student_KD_temp_2.0") == ("SeqKD", 2.0)
    assert kd_method("student_RevKD_temp_1.0") == ("RevKD", 1.0)
    assert kd_method("student_GKD_temp_1.0") == ("GKD", 1.0)
    for other in ("SFT", "BaseModel", "student_KD_base_teacher_temp_1.0", "student_KD_noise_2.0_temp_1.0", "x"):
        assert kd_method(other) is None
    assert student_size("Qwen2.5-0.5B") == 0.5 and student_size("Llama-3.2-1B") == 1.0
    assert teacher_name("Qwen2.5-3B_ckpt2400") == "Qwen2.5-3B"
    with pytest.raises(InputError):
        student_size("gpt2")


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, "hot", None])
def test_one_temperature_rule_refuses_the_same_values_everywhere(value: object) -> None:
    """The temperature has one validation (kdscope.labels.check_temperature): the loss, the online teacher and the
    pydantic type all refuse exactly what it refuses, with its message."""

    class Settings(BaseModel):
        temperature: Temperature

    assert not is_temperature(value)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="temperature must be > 0"):
        check_temperature(value)  # type: ignore[arg-type]
    if isinstance(value, (int, float)):  # pydantic refuses a non-number before the rule runs
        with pytest.raises(ValidationError, match="temperature must be > 0"):
            Settings(temperature=value)
        logits = torch.zeros(1, 2, 3)
        with pytest.raises(InputError, match="temperature must be > 0"):
            distill_loss(logits, logits, torch.ones(1, 2), temperature=value)
        with pytest.raises(InputError, match="temperature must be > 0"):
            OnlineTeacher(torch.nn.Linear(1, 1), temperature=value)


def test_temperature_accepts_any_positive_finite_number() -> None:
    assert DEFAULT_TEMPERATURE == 1.0 and row_label("SeqKD") == "student_KD_temp_1.0"
    assert check_temperature(2) == 2.0 and isinstance(check_temperature(2), float)
    assert check_temperature(1e-3) == 1e-3
