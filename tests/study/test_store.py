"""The study store and the exports: typed result columns, graph-ordered tables, `status` states, and exports that
always show the design just run (issues 13 and 14)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from kdscope.cli import app
from kdscope.study import Study, StudyStore, expand, run_study
from kdscope.study.tables import export_tables, report_from_store, study_tables

TWO_METHODS = {
    "name": "rows", "device": "cpu",
    "families": [{"name": "f", "teachers": [{"name": "T-66K", "model": "builtin:tiny-qwen-s"}],
                  "students": [{"name": "S-35K", "model": "builtin:tiny-qwen-xs"}]}],
    "domains": [{"name": "commonsense", "train": "synthetic:commonsense:5", "tasks": [{"task": "toy_truefalse"}]}],
    "methods": ["SeqKD", "GKD"], "temperatures": [1.0, 2.0],
    "ablations": {"base_teacher": True},
}


def _fill_store(store: StudyStore, jobs: list, order: list) -> None:
    """Complete the evaluation and fidelity jobs in ``order`` with rows of the shape the jobs write."""
    for job in order:
        p = job.params
        if job.kind == "eval":
            store.complete(job, {"rows": {"result": [{"Teacher": p["teacher"], "Student": p["student"],
                                                      "Method": p["method"], "toy_truefalse": 50.0, "Average": 50.0,
                                                      **({"Seed": p["seed"]} if p["seed"] is not None else {})}]}})
        elif job.kind == "fidelity":
            rows = [{"Teacher": p["teacher"], "Student": p["student"], "Pair": "x", "Method": m, "toy_truefalse": v}
                    for m, v in (("SFT", 40.0), (p["method"], 60.0))]
            store.complete(job, {"rows": {"agreement": rows, "fidelity": rows}})


def test_exports_are_in_graph_order_with_typed_columns(tmp_path: Path) -> None:
    """Whatever order jobs finish in (workers, executors), the tables are byte-identical; every row says what it is
    in real columns, read from the job that made it (not parsed from the label)."""
    jobs = expand(Study(**TWO_METHODS))
    analysis = next(j for j in jobs if j.kind == "analysis")
    measured = [j for j in jobs if j.kind in ("eval", "fidelity")]
    texts = []
    for name, order in (("forward", measured), ("reversed", measured[::-1])):
        root = tmp_path / name
        root.mkdir()
        store = StudyStore(root / "study.sqlite")
        _fill_store(store, jobs, order)
        written = export_tables(store, analysis, root)
        texts.append({p.name: p.read_text() for p in written})
    assert texts[0] == texts[1] and set(texts[0]) == {"cs_results.csv", "agreement.csv", "fidelity.csv"}
    results = pd.read_csv(tmp_path / "forward" / "cs_results.csv", keep_default_na=False, na_values=[""])
    assert list(results.columns[:3]) == ["Teacher", "Student", "Method"]
    kd = results[results["KDMethod"].fillna("") != ""]
    assert set(zip(kd["Method"], kd["KDMethod"], kd["Temperature"], kd["Ablation"].fillna(""))) == {
        ("student_KD_temp_1.0", "SeqKD", 1.0, ""), ("student_KD_temp_2.0", "SeqKD", 2.0, ""),
        ("student_GKD_temp_1.0", "GKD", 1.0, ""), ("student_KD_base_teacher_temp_1.0", "SeqKD", 1.0, "base_teacher")}
    plain = results[results["Method"].isin(["SFT", "BaseModel"])]
    assert plain["Temperature"].isna().all() and (plain["KDMethod"].fillna("") == "").all()
    # agreement/fidelity: one row per student (each KD student and the SFT row), never one pick per pair
    agreement = study_tables(analysis, StudyStore(tmp_path / "forward" / "study.sqlite"))["agreement"]
    assert sorted(agreement["Method"]) == sorted(["SFT", *kd["Method"]])
    assert math.isnan(agreement.loc[agreement["Method"] == "SFT", "Temperature"].item())


def test_status_of_a_folder_that_is_not_a_study(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["status", str(tmp_path)])
    assert res.exit_code == 2 and "not a study folder" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "study.sqlite").exists()


def test_a_killed_owner_shows_as_interrupted(tmp_path: Path) -> None:
    """A job marked running by a process that was killed -9 is `interrupted`; one whose owner lives is `running`."""
    jobs = expand(Study(**TWO_METHODS))
    store = StudyStore(tmp_path / "study.sqlite")
    store.mark(jobs[1], "running")  # owned by this (living) process
    code = ("import pickle, os, signal, sys; from pathlib import Path; from kdscope.study import StudyStore; "
            "job = pickle.loads(sys.stdin.buffer.read()); StudyStore(Path(sys.argv[1])).mark(job, 'running'); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    import pickle

    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "study.sqlite")], input=pickle.dumps(jobs[0]),
                          capture_output=True)
    assert proc.returncode == -9
    states = {j["key"]: j["status"] for j in store.jobs()}
    assert states == {jobs[0].key: "interrupted", jobs[1].key: "running"}
    res = CliRunner().invoke(app, ["status", str(tmp_path), "--json"])
    assert res.exit_code == 0 and '"interrupted"' in res.output


def test_exports_follow_the_design_just_run(tmp_path: Path) -> None:
    """Run a study, then another design into the same folder, then the first again: the folder shows the first
    design's tables (rebuilt, though every job is done), and the other domain's table is gone."""
    micro = {
        "name": "micro", "seeds": [3], "device": "cpu", "threads": 1,
        "families": TWO_METHODS["families"],
        "domains": [{"name": "commonsense", "train": "synthetic:commonsense:30", "tasks": [{"task": "toy_truefalse"}]}],
        "kd_runs": [{"methods": ["SeqKD"], "temperatures": [1.0]}],
        "pretrain": {"steps": {}},
        "training": {"lora": None, "common": {"prompt_style": "alpaca", "val_size": 8, "max_length": 96,
                                              "micro_batch_size": 4, "grad_accum": 1, "warmup_steps": 1,
                                              "eval_every": 2, "save_every": 1, "max_steps": 2}},
        "evaluation": {"synthetic_items": 8, "max_new_tokens": 8, "batch_size": 8, "prompt_style": "alpaca"},
    }
    other = {**micro, "domains": [{"name": "math", "train": "synthetic:math:10", "tasks": [{"task": "toy_add"}]}]}
    root = tmp_path / "s"
    quiet = {"progress": False, "log": lambda m: None}
    run_study(Study(**micro), root, **quiet)
    first = {name: (root / name).read_bytes() for name in ("cs_results.csv", "agreement.csv", "stats.json")}
    run_study(Study(**other), root, **quiet)
    assert (root / "math_results.csv").is_file() and not (root / "cs_results.csv").exists()
    again = run_study(Study(**micro), root, **quiet)
    assert [j.kind for j in expand(Study(**micro)) if j.key in again.ran] == ["analysis"]
    assert not (root / "math_results.csv").exists()
    assert {name: (root / name).read_bytes() for name in first} == first
    # the folder's study.json reads back as the study that ran (kd_runs and all): the report renders from it
    assert report_from_store(root, tmp_path / "again.html").is_file()
