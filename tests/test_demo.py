"""`kdscope demo`: the built-in study runs offline on CPU through the same code path as any study."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from kdscope.cli import app

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_design_and_reruns_instantly(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    runner = CliRunner()
    res = runner.invoke(app, ["demo", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "0 failed" in res.output and str(out / "report.html") in res.output
    math = pd.read_csv(out / "math_results.csv")
    cs = pd.read_csv(out / "cs_results.csv")
    for table in (math, cs):
        methods = set(table["Method"])
        assert {"BaseModel", "SFT", "student_KD_base_teacher_temp_1.0", "student_KD_noise_1.0_temp_1.0",
                "student_KD_noise_5.0_temp_1.0"} <= methods
        for kd in ("KD", "RevKD"):
            for t in ("1.0", "2.0", "5.0"):
                assert f"student_{kd}_temp_{t}" in methods
        # GKD uses no temperature (as in the study): one run, labelled temp_1.0
        assert "student_GKD_temp_1.0" in methods and "student_GKD_temp_2.0" not in methods
        assert table["Average"].between(0, 100).all()
    teacher_sft = math[(math["Student"] == "TinyQwen-657K") & (math["Method"] == "SFT")]["Average"].item()
    assert teacher_sft > math[(math["Method"] == "SFT") & (math["Student"] != "TinyQwen-657K")]["Average"].max()
    records = json.loads((out / "stats.json").read_text())
    hypotheses = {r["hypothesis"] for r in records}
    assert {"kd_beats_sft", "methods_differ", "student_size", "teacher_score"} <= hypotheses
    html = (out / "report.html").read_text()
    assert len(re.findall(r"<img[^>]+src=[\"']data:image/png;base64,", html)) >= 5
    for csv in ("agreement.csv", "fidelity.csv", "joint.csv"):
        assert len(pd.read_csv(out / csv)) > 0
    start = time.perf_counter()
    again = runner.invoke(app, ["demo", "--out", str(out), "--quiet"])
    assert again.exit_code == 0 and "0 jobs run" in again.output
    assert time.perf_counter() - start < 120
