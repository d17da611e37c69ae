"""`kdscope run --plan`: the resolved design, job by job, without running anything; the published example's plan is
the design of the study's released tables (issue 12 item 7)."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdscope.cli import app
from kdscope.errors import InputError
from kdscope.study import expand, load_study
from kdscope.study.run import plan

PUBLISHED = Path(__file__).parents[2] / "examples" / "study_published.yaml"
QWEN_TEACHERS_WITH_TEMPERATURES = {"Qwen2.5-3B", "Qwen2.5-7B"}
# The study's 11 pairs: every teacher larger than its student, within a family.
PAIRS = {
    ("Qwen2.5-3B", "Qwen2.5-0.5B"), ("Qwen2.5-3B", "Qwen2.5-1.5B"),
    ("Qwen2.5-7B", "Qwen2.5-0.5B"), ("Qwen2.5-7B", "Qwen2.5-1.5B"), ("Qwen2.5-7B", "Qwen2.5-3B"),
    ("Qwen2.5-14B", "Qwen2.5-0.5B"), ("Qwen2.5-14B", "Qwen2.5-1.5B"), ("Qwen2.5-14B", "Qwen2.5-3B"),
    ("Qwen2.5-14B", "Qwen2.5-7B"),
    ("Llama-3.1-8B", "Llama-3.2-1B"), ("Llama-3.1-8B", "Llama-3.2-3B"),
}


def _published_inputs(root: Path) -> Path:
    """The published example in ``root`` with small stand-ins for the study's data at the paths it names."""
    row = {"instruction": "What is 2 + 2?", "input": "", "output": "2 + 2 = 4. The answer is 4.", "answer": "4"}
    (root / "data" / "dataset").mkdir(parents=True)
    (root / "data" / "hellaswag_validation").mkdir()
    for name in ("math_10k.json", "commonsense_15k.json"):
        (root / "data" / name).write_text(json.dumps([row]))
    return Path(shutil.copy(PUBLISHED, root / "study_published.yaml"))


def _released_design() -> Counter:
    """Per domain: 11 pairs x 3 methods at T=1; SeqKD/RevKD at T=2 and 5 for the 3B/7B-teacher pairs; the
    base-teacher ablation (SeqKD, T=1) for those pairs."""
    runs: Counter = Counter()
    for domain in ("math", "commonsense"):
        for teacher, student in PAIRS:
            for method in ("SeqKD", "RevKD", "GKD"):
                runs[(domain, teacher, student, method, 1.0, "")] += 1
            if teacher in QWEN_TEACHERS_WITH_TEMPERATURES:
                for method in ("SeqKD", "RevKD"):
                    for t in (2.0, 5.0):
                        runs[(domain, teacher, student, method, t, "")] += 1
                runs[(domain, teacher, student, "SeqKD", 1.0, "base_teacher")] += 1
    return runs


def test_published_plan_is_the_released_design(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study_file = _published_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    resolved = plan(load_study(study_file))
    kd = [j for j in resolved["jobs"] if j["kind"] == "kd"]
    got = Counter((j["domain"], j["teacher"], j["student"], j["kd_method"], j["temperature"], j["ablation"]) for j in kd)
    assert got == _released_design()
    assert sum(got.values()) == 2 * 58
    assert resolved["counts"]["kd"] == 116
    # GKD never carries a temperature into its loss; base-teacher runs read no fine-tuned teacher
    assert all(j["settings"]["temperature"] == 1.0 for j in kd if j["kd_method"] == "GKD")
    assert all(j["teacher_signal"]["teacher"].startswith("base") == (j["ablation"] == "base_teacher") for j in kd)
    # one evaluation and one fidelity job per KD student
    evals = [j for j in resolved["jobs"] if j["kind"] == "eval" and j["kd_method"]]
    assert Counter((j["domain"], j["teacher"], j["student"], j["kd_method"], j["temperature"], j["ablation"])
                   for j in evals) == got
    assert resolved["counts"]["fidelity"] == 116


def test_plan_json_from_the_cli_offline_in_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The published example names hub models that are not on this machine: a plan that loaded one would fail."""
    study_file = _published_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    res = CliRunner().invoke(app, ["run", str(study_file), "--plan", "--json"])
    assert res.exit_code == 0, res.output
    assert time.perf_counter() - start < 30
    resolved = json.loads(res.output)
    assert not (tmp_path / "runs").exists()  # nothing ran, no study folder
    job = next(j for j in resolved["jobs"] if j["kind"] == "kd" and j["kd_method"] == "RevKD")
    for key in ("kind", "teacher", "student", "domain", "method", "temperature", "ablation", "seed"):
        assert key in job
    # fully resolved training settings (TrainSettings' own defaults filled in), teacher signal, decoding
    assert {"reduction", "token_mask", "max_new_tokens", "loss", "max_length"} <= set(job["settings"])
    assert job["settings"]["loss"] == "reverse_kl" and job["settings"]["seed"] == 6
    assert set(job["teacher_signal"]) == {"teacher", "source", "noise"}
    ev = next(j for j in resolved["jobs"] if j["kind"] == "eval")
    assert ev["decoding"]["do_sample"] is True and ev["decoding"]["max_new_tokens"] == 256  # the study's decoding
    text = CliRunner().invoke(app, ["run", str(study_file), "--plan"])
    assert text.exit_code == 0 and "jobs per kind:" in text.output and "kd 116" in text.output


def test_plan_from_a_fresh_clone_without_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh clone has none of the study's data: --plan still shows the design, lists the missing inputs (every
    key that names one) and warns once; a run refuses the same study with exit 2 before any job."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(app, ["run", str(PUBLISHED), "--plan", "--json"])
    assert res.exit_code == 0, res.output + res.stderr
    resolved = json.loads(res.stdout)
    assert resolved["counts"]["kd"] == 116
    assert {m["path"] for m in resolved["missing_inputs"]} == {
        "data/math_10k.json", "data/commonsense_15k.json", "data/dataset", "data/hellaswag_validation"}
    assert len(resolved["missing_inputs"]) == 2 + 14  # two training files, fourteen task data paths
    assert "domains.math.train" in {m["where"] for m in resolved["missing_inputs"]}
    warning = res.stderr.strip().splitlines()
    assert len(warning) == 1 and "data/math_10k.json" in warning[0] and "refuses" in warning[0]
    run = CliRunner().invoke(app, ["run", str(PUBLISHED), "--out", str(tmp_path / "out")])
    assert run.exit_code == 2 and "domains.math.train: data/math_10k.json: no such file" in run.output
    assert not (tmp_path / "out").exists()


def test_plan_still_refuses_an_input_that_exists_but_does_not_load(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    study_file = _published_inputs(tmp_path)
    (tmp_path / "data" / "math_10k.json").write_text('[{"instruction": "no output"}]')
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["run", str(study_file), "--plan"])
    assert res.exit_code == 2 and "domains.math.train" in res.output
    assert len(res.output.strip().splitlines()) == 1


def _micro(tmp_path: Path, **changes: object) -> Path:
    spec = {"name": "m", "families": [{"name": "f", "teachers": [{"name": "T-7B", "model": "builtin:tiny-qwen-s"},
                                                                  {"name": "T-3B", "model": "builtin:tiny-qwen-s"}],
                                       "students": [{"name": "S-1B", "model": "builtin:tiny-qwen-xs"}]}],
            "domains": [{"name": "math", "train": "synthetic:math:5", "tasks": [{"task": "toy_add"}]}], **changes}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_per_method_temperatures_and_grids(tmp_path: Path) -> None:
    def runs(**changes: object) -> set[tuple[str, str, float, str]]:
        return {(j.params["teacher_name"], j.params["kd_method"], j.params["temperature"], j.params["ablation"])
                for j in expand(load_study(_micro(tmp_path, **changes))) if j.kind == "kd"}

    # a shorthand list: GKD uses no temperature, so it runs once
    assert runs(methods=["GKD", "RevKD"], temperatures=[1.0, 2.0]) == {
        (t, m, temp, "") for t in ("T-7B", "T-3B") for m, temp in (("GKD", 1.0), ("RevKD", 1.0), ("RevKD", 2.0))}
    # per-method lists
    assert runs(methods=["SeqKD", "GKD"], temperatures={"SeqKD": [2.0, 5.0]}) == {
        (t, m, temp, "") for t in ("T-7B", "T-3B") for m, temp in (("SeqKD", 2.0), ("SeqKD", 5.0), ("GKD", 1.0))}
    # grids restricted to named teachers, ablations restricted to a teacher and a method
    got = runs(kd_runs=[{"methods": ["SeqKD"], "temperatures": [1.0]},
                        {"methods": ["RevKD"], "temperatures": [5.0], "teachers": ["T-3B"]}],
               ablations={"base_teacher": True, "noise_sigmas": [2.0], "method": "RevKD", "teachers": ["T-7B"]})
    assert got == {("T-7B", "SeqKD", 1.0, ""), ("T-3B", "SeqKD", 1.0, ""), ("T-3B", "RevKD", 5.0, ""),
                   ("T-7B", "RevKD", 1.0, "base_teacher"), ("T-7B", "RevKD", 1.0, "noise_sigma=2.0")}


@pytest.mark.parametrize("changes, message", [
    ({"kd_runs": [{"methods": ["GKD"], "temperatures": [2.0]}]}, r"kd_runs.0.temperatures: GKD uses no temperature"),
    ({"temperatures": {"GKD": [1.0, 5.0]}}, r"temperatures.GKD: GKD uses no temperature"),
    ({"kd_runs": [{"methods": ["SeqKD"], "teachers": ["T-70B"]}]}, r"kd_runs.0.teachers: no model named 'T-70B'"),
    ({"ablations": {"base_teacher": True, "teachers": ["Qwen"]}}, r"ablations.teachers: no model named 'Qwen'"),
    ({"kd_runs": [{"methods": ["SeqKD"]}], "temperatures": [1.0]}, r"either kd_runs or methods/temperatures"),
])
def test_design_errors_name_the_key(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_study(_micro(tmp_path, **changes))
    res = CliRunner().invoke(app, ["run", str(tmp_path / "s.yaml"), "--plan"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
