"""Studies as code: validation, job graph, re-running only what changed, SIGKILL resume, failures, Ray."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from kdscope.cli import app
from kdscope.errors import InputError
from kdscope.study import Study, StudyStore, builtin_study, expand, job_dir, load_study, run_study

MICRO = {
    "name": "micro",
    "seeds": [3],
    "device": "cpu",
    "threads": 1,
    "families": [{"name": "tiny", "teachers": [{"name": "T-66K", "model": "builtin:tiny-qwen-s"}],
                  "students": [{"name": "S-35K", "model": "builtin:tiny-qwen-xs"}]}],
    "domains": [{"name": "commonsense", "train": "synthetic:commonsense:30", "tasks": [{"task": "toy_truefalse"}]}],
    "methods": ["SeqKD"],
    "temperatures": [1.0, 2.0],
    "pretrain": {"steps": {"T-66K": 4, "S-35K": 2}, "data": "synthetic:commonsense:20", "extra_data": []},
    "training": {"lora": None, "common": {"prompt_style": "alpaca", "val_size": 8, "max_length": 96,
                                          "micro_batch_size": 4, "grad_accum": 1, "warmup_steps": 1,
                                          "eval_every": 2, "save_every": 1, "max_steps": 3}},
    "evaluation": {"synthetic_items": 8, "max_new_tokens": 8, "batch_size": 8, "prompt_style": "alpaca"},
}


def _write(tmp_path: Path, spec: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _results(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "cs_results.csv").sort_values(["Teacher", "Student", "Method"]).reset_index(drop=True)


def test_demo_study_expands_to_the_full_design() -> None:
    study = load_study(builtin_study("demo"))
    kinds: dict[str, int] = {}
    for job in expand(study):
        kinds[job.kind] = kinds.get(job.kind, 0) + 1
    domains = 2
    # largest teacher -> 3 students with SeqKD/RevKD x 3 temperatures + GKD (no temperature: once) + base teacher
    # + two noise levels; the mid-size model (also a student) -> the 2 smaller students, without the ablations
    kd = (3 * (7 + 3) + 2 * 7) * domains
    models = 4  # one SFT and one BaseModel row each, even for the model that is teacher and student
    assert kinds == {"pretrain": 4, "sft": models * domains, "cache": (2 + 1) * domains, "kd": kd,
                     "eval": 2 * models * domains + kd, "fidelity": kd, "analysis": 1}


def test_study_errors_name_key_value_and_fix(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"temperatures.*greater than 0|temperatures must all be > 0"):
        load_study(_write(tmp_path, {**MICRO, "temperatures": [1.0, -2.0]}))
    with pytest.raises(InputError, match=r"evaluation.mode.*'sample'"):
        load_study(_write(tmp_path, {**MICRO, "evaluation": {"mode": "sample"}}))
    with pytest.raises(InputError, match=r"temprature.*remove it or check the spelling"):
        load_study(_write(tmp_path, {**MICRO, "temprature": [1.0]}))
    with pytest.raises(InputError, match=r"training.kd.lr"):
        load_study(_write(tmp_path, {**MICRO, "training": {"kd": {"lr": -1}}}))
    with pytest.raises(InputError, match=r"tasks.0.task.*unknown task 'mmlu'"):
        load_study(_write(tmp_path, {**MICRO, "domains": [{"name": "math", "train": "x", "tasks": [{"task": "mmlu"}]}]}))
    res = CliRunner().invoke(app, ["run", str(_write(tmp_path, {**MICRO, "seeds": "six"}))])
    assert res.exit_code == 2 and "seeds" in res.output and len(res.output.strip().splitlines()) == 1


def test_changing_one_temperature_reruns_only_affected_jobs(tmp_path: Path) -> None:
    first = run_study(Study(**MICRO), tmp_path / "s", progress=False, log=lambda m: None)
    assert not first.failed and len(first.ran) == 15
    changed = Study(**{**MICRO, "temperatures": [1.0, 5.0]})
    second = run_study(changed, tmp_path / "s", progress=False, log=lambda m: None)
    # the T=5 KD run, its evaluation, its fidelity job, and the analysis; nothing else
    assert len(second.ran) == 4 and len(second.skipped) == 11
    kinds = sorted(j.kind for j in expand(changed) if j.key in second.ran)
    assert kinds == ["analysis", "eval", "fidelity", "kd"]
    table = _results(tmp_path / "s")
    assert set(table["Method"]) == {"BaseModel", "SFT", "student_KD_temp_1.0", "student_KD_temp_5.0"}
    assert (tmp_path / "s" / "report.html").is_file() and (tmp_path / "s" / "stats.json").is_file()

    # --redo: the fidelity jobs and what depends on them are computed again, from scratch, to the same tables
    before = {name: (tmp_path / "s" / name).read_text() for name in ("cs_results.csv", "agreement.csv", "joint.csv")}
    (tmp_path / "s" / "agreement.csv").unlink()
    fidelity_jobs = [j for j in expand(changed) if j.kind == "fidelity"]
    stale = job_dir(tmp_path / "s", fidelity_jobs[0]) / "stale.txt"
    stale.write_text("an output of the old run")
    redone = run_study(changed, tmp_path / "s", progress=False, log=lambda m: None, redo=["fidelity"])
    assert sorted(j.kind for j in expand(changed) if j.key in redone.ran) == ["analysis", "fidelity", "fidelity"]
    assert not stale.exists()  # from scratch: the job's folder was cleared, not resumed
    assert {name: (tmp_path / "s" / name).read_text() for name in before} == before
    agreement = pd.read_csv(tmp_path / "s" / "agreement.csv")
    assert not agreement.duplicated().any() and (agreement["Method"] == "SFT").sum() == 1
    with pytest.raises(InputError, match=r"--redo.*'train'.*choose from"):
        run_study(changed, tmp_path / "s", progress=False, log=lambda m: None, redo=["train"])


def test_pooled_joint_sums_seeds() -> None:
    from kdscope.study.tables import pooled_joint

    joint = pd.DataFrame([{"Domain": "math", "Seed": seed, "Teacher": "T", "Student": "S", "Method": m, "task": "gsm8k",
                           "both": 1, "teacher_only": 2, "student_only": 3, "neither": 4}
                          for seed in (1, 2) for m in ("SFT", "student_KD_temp_1.0")])
    pooled = pooled_joint(joint)
    assert pooled[["Method", "both", "neither"]].values.tolist() == [["SFT", 2, 8], ["student_KD_temp_1.0", 2, 8]]


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_study_resumes_to_identical_results(tmp_path: Path, workers: int) -> None:
    """SIGKILL at random points (seeded), resume until done; the exported files are byte-identical to an
    uninterrupted run's, with one worker and with two (which finish jobs in a different order)."""
    spec = _write(tmp_path, {**MICRO, "executor": {"workers": workers}})
    cmd = [sys.executable, "-m", "kdscope.cli", "run", str(spec), "--quiet"]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    start = time.perf_counter()
    subprocess.run([*cmd, "--out", str(tmp_path / "clean")], check=True, env=env, capture_output=True)
    clean_seconds = time.perf_counter() - start
    rng = random.Random(0)
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:  # kill somewhere inside the run: start-up takes a few seconds, the whole run clean_seconds
            proc.wait(timeout=rng.uniform(0.3, 0.8) * clean_seconds)
            break
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    else:
        subprocess.run([*cmd, "--out", str(tmp_path / "killed")], check=True, env=env, capture_output=True)
    assert kills >= 1
    pd.testing.assert_frame_equal(_results(tmp_path / "clean"), _results(tmp_path / "killed"))
    clean, killed = StudyStore(tmp_path / "clean" / "study.sqlite"), StudyStore(tmp_path / "killed" / "study.sqlite")
    assert {j["key"] for j in clean.jobs()} == {j["key"] for j in killed.jobs() if j["status"] == "done"}
    for name in ("cs_results.csv", "agreement.csv", "fidelity.csv", "joint.csv", "stats.json", "report.md"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


def test_failed_job_does_not_stop_independent_jobs(tmp_path: Path) -> None:
    broken = {**MICRO, "domains": [
        MICRO["domains"][0],
        {"name": "math", "train": "synthetic:math:30", "tasks": [{"task": "gsm8k", "data": str(tmp_path / "bad.json")}]},
    ]}
    (tmp_path / "bad.json").write_text("[{\"instruction\": \"q\"}]")  # exists (checked at load), fails to load
    summary = run_study(Study(**broken), tmp_path / "s", progress=False, log=lambda m: None)
    store = StudyStore(tmp_path / "s" / "study.sqlite")
    status = {j["name"]: (j["status"], j["error"]) for j in store.jobs()}
    failed = [n for n, (s, _) in status.items() if s == "failed"]
    assert failed and all("math" in n and n.startswith("eval") for n in failed)
    assert all("bad.json" in status[n][1] for n in failed)
    assert any(s == "done" and "commonsense" in n and n.startswith("eval") for n, (s, _) in status.items())
    assert summary.blocked  # fidelity and analysis downstream of the failed evaluations
    res = CliRunner().invoke(app, ["status", str(tmp_path / "s")])
    assert res.exit_code == 0 and "failed" in res.output


def test_ray_executor_matches_local(tmp_path: Path) -> None:
    import ray
    run_study(Study(**MICRO), tmp_path / "local", progress=False, log=lambda m: None)
    try:
        summary = run_study(Study(**{**MICRO, "executor": {"kind": "ray"}}), tmp_path / "ray", progress=False,
                            log=lambda m: None)
    finally:
        ray.shutdown()
    assert not summary.failed and len(summary.ran) == 15
    pd.testing.assert_frame_equal(_results(tmp_path / "local"), _results(tmp_path / "ray"))


def test_teacher_cache_gives_one_teacher_pass_per_teacher_and_domain(tmp_path: Path) -> None:
    spec = {**MICRO, "methods": ["SeqKD", "RevKD", "GKD"],
            "training": {**MICRO["training"], "kd": {"teacher_topk": 16}}}
    study = Study(**spec)
    jobs = expand(study)
    caches = [j for j in jobs if j.kind == "cache"]
    kd_jobs = [j for j in jobs if j.kind == "kd"]
    # SeqKD and RevKD x 2 temperatures, GKD once (no temperature); one teacher pass for all
    assert len(caches) == 1 and len(kd_jobs) == 5
    assert all(j.deps["cache"] is caches[0] for j in kd_jobs)
    summary = run_study(study, tmp_path / "s", progress=False, log=lambda m: None)
    assert not summary.failed
    store = StudyStore(tmp_path / "s" / "study.sqlite")
    for job in kd_jobs:
        result = store.result(job.key)
        on_policy = job.params["settings"]["objective"] == "gkd"
        # off-policy KD never loads the teacher; GKD needs it for its on-policy batches only
        assert result["teacher_loaded"] is on_policy
        if not on_policy:
            assert result["online_teacher_passes"] == 0
    assert store.result(caches[0].key)["sequences"] == 60
