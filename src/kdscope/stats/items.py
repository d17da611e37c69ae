"""Paired per-item tests of a KD student against the same student's SFT model: McNemar and a paired bootstrap."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from ..labels import SFT_LABEL, teacher_name
from .hypotheses import N_BOOT
from .seeds import CONFIDENCE
from .tables import analysis_method, describe_rows, task_domain


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool], exact: bool | None = None) -> dict[str, float]:
    """McNemar's test on paired per-item correctness (statsmodels). ``exact`` defaults to the binomial test when
    there are fewer than 25 discordant items, the chi-square with continuity correction otherwise."""
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar  # slow to import; here only when used

    a, b = _paired_bools(a_correct, b_correct)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    table = [[int(np.sum(a & b)), only_a], [only_b, int(np.sum(~a & ~b))]]
    use_exact = (only_a + only_b) < 25 if exact is None else exact
    result = sm_mcnemar(table, exact=use_exact, correction=True)
    return {"statistic": float(result.statistic), "p_value": float(result.pvalue), "only_a": only_a,
            "only_b": only_b, "exact": bool(use_exact), "n": len(a)}


def paired_bootstrap(a_correct: Sequence[bool], b_correct: Sequence[bool], n_boot: int = N_BOOT, seed: int = 0,
                     confidence: float = CONFIDENCE) -> dict[str, float]:
    """Accuracy difference b - a (in points of 100) with a paired percentile bootstrap CI over items, seeded."""
    a, b = _paired_bools(a_correct, b_correct)
    diff = b.astype(float) - a.astype(float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
    boots = diff[idx].mean(axis=1) * 100
    alpha = 1 - confidence
    return {"difference": float(diff.mean() * 100), "ci_low": float(np.quantile(boots, alpha / 2)),
            "ci_high": float(np.quantile(boots, 1 - alpha / 2)), "n": len(diff)}


def _paired_bools(a: Sequence[bool], b: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    a_arr, b_arr = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1 or len(a_arr) == 0:
        raise InputError(f"paired per-item tests need two equally long, non-empty lists of correctness flags "
                         f"(got {a_arr.shape} and {b_arr.shape}); score both models on the same items")
    return a_arr, b_arr


def item_records(items: pd.DataFrame, seed: int) -> list[dict[str, object]]:
    """Paired SFT vs KD tests from per-item records (columns Teacher, Student, Method, task, item, correct): for
    every plain KD student row, McNemar and a paired bootstrap against the same student's SFT row on the shared
    items."""
    records = []
    sft = items[items["Method"] == SFT_LABEL]
    described = describe_rows(items)
    kd_items = items.assign(_method=analysis_method(described), _plain=described["ablation"] == "")
    for (teacher, student, label, task), kd in kd_items[kd_items["Method"] != SFT_LABEL].groupby(
            ["Teacher", "Student", "Method", "task"], sort=False):
        method = str(kd["_method"].iloc[0])
        base = sft[(sft["Student"] == student) & (sft["task"] == task)]
        paired = kd.merge(base[["item", "correct"]], on="item", suffixes=("_kd", "_sft"))
        if not method or not bool(kd["_plain"].iloc[0]) or paired.empty:
            continue
        test = mcnemar(paired["correct_sft"], paired["correct_kd"])
        boot = paired_bootstrap(paired["correct_sft"], paired["correct_kd"], seed=seed)
        records.append({"domain": task_domain(str(task)), "hypothesis": "kd_vs_sft_items", "method": method,
                        "task": task, "teacher": teacher_name(teacher), "student": student, "row": label,
                        "n": test["n"], "test": "McNemar", "statistic": test["statistic"],
                        "p_value": test["p_value"], "kd_only_correct": test["only_b"],
                        "sft_only_correct": test["only_a"], "accuracy_difference": boot["difference"],
                        "boot_ci_low": boot["ci_low"], "boot_ci_high": boot["ci_high"]})
    return records
