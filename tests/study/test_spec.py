"""A study is checked when it loads (also under --plan), before any job runs: training settings against
TrainSettings, settings the design decides, and every input it names (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdscope.cli import app
from kdscope.errors import InputError
from kdscope.study import Study, load_study, run_study

BASE = {
    "name": "checks", "device": "cpu",
    "families": [{"name": "f", "teachers": [{"name": "T-66K", "model": "builtin:tiny-qwen-s"}],
                  "students": [{"name": "S-35K", "model": "builtin:tiny-qwen-xs"}]}],
    "domains": [{"name": "math", "train": "synthetic:math:5", "tasks": [{"task": "toy_add"}]}],
    "methods": ["SeqKD"], "temperatures": [1.0],
}


def _with(tmp_path: Path, **changes: object) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**BASE, **changes}))
    return path


def _domain(train: str) -> list[dict]:
    return [{"name": "math", "train": train, "tasks": [{"task": "toy_add"}]}]


def _one_line_exit_2(path: Path, *needles: str, missing: str = "") -> None:
    """Refused on one line with exit 2 by a run, before any job; by --plan too, unless the input is only ``missing``
    (a plan of a study whose data lives elsewhere shows the design and warns on one line naming that path)."""
    for args in (["run", str(path), "--plan"], ["run", str(path), "--out", str(path.parent / "out")]):
        res = CliRunner().invoke(app, args)
        if missing and "--plan" in args:
            assert res.exit_code == 0, res.output
            warning = res.stderr.strip().splitlines()
            assert len(warning) == 1 and warning[0].startswith("warning:") and "refuses" in warning[0]
            assert missing in warning[0], warning
            continue
        assert res.exit_code == 2, res.output
        assert len(res.output.strip().splitlines()) == 1
        for needle in needles:
            assert needle in res.output
    assert not (path.parent / "out").exists()  # refused before any job, no study folder


@pytest.mark.parametrize("training, needles", [
    ({"kd": {"max_stpes": 3}}, ("training.kd.max_stpes", "remove it or check the spelling")),
    ({"kd": {"loss": "nosuchloss"}}, ("training.kd.loss", "methods")),
    ({"common": {"temperature": 2.0}}, ("training.common.temperature", "temperatures")),
    ({"student_sft": {"micro_batch_size": 0}}, ("training.student_sft.micro_batch_size",)),
])
def test_training_settings_are_checked_at_load(tmp_path: Path, training: dict, needles: tuple[str, ...]) -> None:
    path = _with(tmp_path, training=training)
    with pytest.raises(InputError, match=needles[0]):
        load_study(path)
    _one_line_exit_2(path, *needles)


def test_domain_training_settings_name_the_domain(tmp_path: Path) -> None:
    domains = [{**_domain("synthetic:math:5")[0], "training": {"epochz": 4}}]
    with pytest.raises(InputError, match=r"domains.0.training.epochz"):
        load_study(_with(tmp_path, domains=domains))


def test_every_input_is_checked_before_any_job(tmp_path: Path) -> None:
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "no_answer.json").write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    cases = {
        str(tmp_path / "missing.json"): "no such file",
        str(tmp_path / "empty.json"): "empty.json",
        str(tmp_path / "no_answer.json"): "answer",
        "synthetic:physics:5": "physics",
    }
    for train, needle in cases.items():
        path = _with(tmp_path, domains=_domain(train))
        with pytest.raises(InputError, match="domains.math.train"):
            load_study(path)
        _one_line_exit_2(path, "domains.math.train", needle, missing=train if needle == "no such file" else "")
        # a study built in code is checked when it runs, before its first job
        with pytest.raises(InputError, match=needle):
            run_study(Study(**{**BASE, "domains": _domain(train)}), tmp_path / "code", progress=False)
        assert not (tmp_path / "code" / "study.sqlite").exists()
    families = [{"name": "f", "teachers": [{"name": "T-66K", "model": "builtin:tiny-qwen-xxl"}],
                 "students": BASE["families"][0]["students"]}]
    _one_line_exit_2(_with(tmp_path, families=families), "builtin:tiny-qwen-xxl", "choose from")
    tasks = [{"name": "math", "train": "synthetic:math:5", "tasks": [{"task": "gsm8k"}]}]
    _one_line_exit_2(_with(tmp_path, domains=tasks), "domains.math.tasks.gsm8k", "data")
    tasks = [{"name": "math", "train": "synthetic:math:5", "tasks": [{"task": "gsm8k", "data": "nowhere/"}]}]
    _one_line_exit_2(_with(tmp_path, domains=tasks), "nowhere/", "no such file or folder", missing="nowhere/")
