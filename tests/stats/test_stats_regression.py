"""Regression of the improvement (issue 13): a term the design cannot identify is reported as such, naming the
terms it is collinear with, never with a coefficient; no library warning reaches the console."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from kdscope.stats import collinear_terms, regression_records, regression_table

TASKS = ("gsm8k", "SVAMP", "AddSub")


def _one_teacher_design(seed: int = 0) -> pd.DataFrame:
    """One teacher: its score differs per task but not within one, so it is collinear with the task effects."""
    rng = np.random.default_rng(seed)
    rows = []
    for t, task in enumerate(TASKS):
        for size in (0.5, 1.5, 3.0):
            for method in ("SeqKD", "RevKD", "GKD"):
                rows.append({"domain": "math", "task": task, "method": method, "student_size": size,
                             "teacher_score": 60.0 + 7 * t, "Teacher": "T-7B",
                             "improvement": 3 - np.log(size) + rng.normal()})
    return pd.DataFrame(rows)


def test_collinear_term_is_named_not_estimated() -> None:
    data = _one_teacher_design()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = regression_records(data)
    assert caught == [], [str(w.message) for w in caught]
    ols = {r["term"]: r for r in records if r["hypothesis"] == "regression_ols"}
    teacher = ols["teacher_score"]
    assert teacher["identifiable"] is False and math.isnan(teacher["estimate"]) and math.isnan(teacher["p_value"])
    assert "task (fixed effect)" in teacher["collinear_with"] and "Intercept" in teacher["collinear_with"]
    # what the design does identify is estimated as by least squares on a full-rank design without teacher_score
    design = np.column_stack([np.ones(len(data)), np.log(data.student_size), data.method == "GKD",
                              data.method == "RevKD", *[data.task == t for t in sorted(TASKS)[1:]]]).astype(float)
    beta = np.linalg.lstsq(design, data.improvement.to_numpy(), rcond=None)[0]
    assert ols["log_size"]["estimate"] == pytest.approx(beta[1], rel=1e-9)
    assert ols["method=GKD"]["estimate"] == pytest.approx(beta[2], rel=1e-9)
    assert ols["method=RevKD"]["estimate"] == pytest.approx(beta[3], rel=1e-9)
    # the intercept shares the dependency (intercept + task effects span the teacher's scores), so it is not either
    assert {term for term, r in ols.items() if r.get("identifiable", True) is False} == {"Intercept", "teacher_score"}
    table = regression_table(records, "math")
    row = table[(table["term"] == "teacher_score") & (table["model"].str.startswith("OLS"))].iloc[0]
    assert row["estimate"].startswith("not identifiable (collinear with") and row["p"] == "-"


def test_full_rank_design_reports_every_term() -> None:
    data = _one_teacher_design()
    data["teacher_score"] += np.random.default_rng(3).normal(size=len(data))  # now it varies within a task
    records = regression_records(data)
    ols = {r["term"]: r for r in records if r["hypothesis"] == "regression_ols"}
    assert set(ols) == {"Intercept", "log_size", "teacher_score", "method=GKD", "method=RevKD"}
    assert all("identifiable" not in r and not math.isnan(r["estimate"]) for r in ols.values())


def test_collinear_terms_against_numpy_rank() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20), rng.normal(size=20)
    design = np.column_stack([np.ones(20), a, b, a + 2 * b, np.zeros(20)])
    names = ["one", "a", "b", "a2b", "zero"]
    assert np.linalg.matrix_rank(design) == 3
    found = collinear_terms(design, names)
    assert set(found) == {"a", "b", "a2b", "zero"}
    assert set(found["a2b"]) == {"a", "b"} and found["zero"] == []
    assert collinear_terms(design[:, :3], names[:3]) == {}
