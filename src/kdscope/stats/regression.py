"""Regression of the improvement on log(student size), teacher score and method: OLS with task as a fixed effect,
and a linear mixed model with task as a random intercept.

Small designs are often rank-deficient (e.g. one teacher per task, so teacher score is a function of the task). A
coefficient is identifiable only when its unit vector is orthogonal to the design's null space; every other term
is reported as not identifiable, naming the terms it is collinear with, and never with a number. The identifiable
coefficients are fitted on a basis of the design's columns, which gives the same estimates as any generalised
inverse. Library warnings never reach the console: a mixed model that warns (singular covariance, no convergence)
is left out.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Callable

import numpy as np
import pandas as pd

from ..labels import KD_METHODS
from .tables import AVERAGE

OLS_TEST = "OLS, task fixed effect"
MIXED_TEST = "linear mixed model, task random intercept"
TASK_EFFECT = "task (fixed effect)"
# Tolerance on the components of unit null-space vectors of the column-normalised design.
NULL_TOLERANCE = 1e-6


def regression_records(configs: pd.DataFrame) -> list[dict[str, object]]:
    """Improvement ~ log(student size) + teacher score + method, task as fixed effect (OLS), and the same with task
    as a random intercept (mixed model) when it fits cleanly. Uses the task columns, not Average."""
    import statsmodels.api as sm  # slow to import; here only when used
    import statsmodels.formula.api as smf

    # the study's model of same-family distillation: cross-family units (method "SeqKD/xtok_kl") stay out
    same_family = configs[configs["method"].isin(KD_METHODS) & (configs["task"] != AVERAGE)]
    data = same_family.dropna(subset=["improvement", "teacher_score", "student_size"]).copy()
    if len(data) < 10 or data["task"].nunique() < 2 or data["method"].nunique() < 2:
        return []
    data["log_size"] = np.log(data["student_size"])
    domain = str(data["domain"].iloc[0])
    reference = KD_METHODS[0]  # SeqKD: the other methods' coefficients are differences from it
    method_term = f"C(method, Treatment('{reference}'))" if reference in set(data["method"]) else "C(method)"
    fixed = f"improvement ~ log_size + teacher_score + {method_term}"
    base = {"domain": domain, "method": "all", "task": "all tasks", "n": len(data)}

    ols = smf.ols(f"{fixed} + C(task)", data)
    names = list(ols.exog_names)
    collinear = collinear_terms(ols.exog, names)
    basis = column_basis(ols.exog)
    if len(data) <= len(basis):  # no residual degrees of freedom: nothing can be tested
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ols.fit() if not collinear else sm.OLS(ols.endog, _frame(ols.exog, names, basis)).fit()
    keep = lambda term: not term.startswith("C(task)")  # noqa: E731
    records = _coefficients(fit, {**base, "hypothesis": "regression_ols", "test": OLS_TEST}, keep)
    records += _unidentified(collinear, {**base, "hypothesis": "regression_ols", "test": OLS_TEST}, keep)

    mixed_model = smf.mixedlm(fixed, data, groups=data["task"])
    mixed_names = list(mixed_model.exog_names)
    mixed_collinear = collinear_terms(mixed_model.exog, mixed_names)
    if mixed_collinear:
        mixed_model = sm.MixedLM(mixed_model.endog, _frame(mixed_model.exog, mixed_names,
                                                           column_basis(mixed_model.exog)), groups=data["task"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mixed = mixed_model.fit(reml=True)
        except (np.linalg.LinAlgError, ValueError):
            mixed = None
    if mixed is not None and mixed.converged and not caught:
        meta = {**base, "hypothesis": "regression_mixed", "test": MIXED_TEST}
        records += _coefficients(mixed, meta, lambda term: term != "Group Var")
        records += _unidentified(mixed_collinear, meta, lambda term: True)
    return records


def column_basis(design: np.ndarray) -> list[int]:
    """Indices of columns, in order, each kept when it raises the rank: a basis of the design's column space."""
    kept: list[int] = []
    for j in range(design.shape[1]):
        if np.linalg.matrix_rank(design[:, [*kept, j]]) > len(kept):
            kept.append(j)
    return kept


def collinear_terms(design: np.ndarray, names: list[str]) -> dict[str, list[str]]:
    """For every column whose coefficient the design cannot identify, the other columns it is collinear with
    (those sharing a null-space vector with it; empty when the column is zero). Empty dict: full column rank."""
    norms = np.linalg.norm(design, axis=0)
    scaled = design / np.where(norms > 0, norms, 1.0)
    rank = int(np.linalg.matrix_rank(scaled))
    if rank == design.shape[1]:
        return {}
    null = np.linalg.svd(scaled)[2][rank:]  # rows span the null space, unit norm
    involved = np.abs(null) > NULL_TOLERANCE
    out = {}
    for j, name in enumerate(names):
        if involved[:, j].any():
            partners = involved[involved[:, j]].any(axis=0)
            out[name] = [names[i] for i in np.flatnonzero(partners) if i != j]
    return out


def _frame(design: np.ndarray, names: list[str], columns: list[int]) -> pd.DataFrame:
    return pd.DataFrame(design[:, columns], columns=[names[j] for j in columns])


def _coefficients(fit: object, meta: dict[str, object], keep: Callable[[str], bool]) -> list[dict[str, object]]:
    params, bse, tvalues, pvalues = fit.params, fit.bse, fit.tvalues, fit.pvalues  # type: ignore[attr-defined]
    ci = fit.conf_int()  # type: ignore[attr-defined]
    return [{**_ordered(meta), "term": _term_name(term), "test": meta["test"], "estimate": float(params[term]),
             "std_error": float(bse[term]), "statistic": float(tvalues[term]), "p_value": float(pvalues[term]),
             "ci_low": float(ci.loc[term, 0]), "ci_high": float(ci.loc[term, 1])}
            for term in params.index if keep(term)]


def _unidentified(collinear: dict[str, list[str]], meta: dict[str, object],
                  keep: Callable[[str], bool]) -> list[dict[str, object]]:
    """Records for the terms the design cannot identify: no estimate, the collinear terms named."""
    records = []
    for term, partners in collinear.items():
        if not keep(term):
            continue
        named = list(dict.fromkeys(_partner_name(p) for p in partners)) or ["(no variation in this design)"]
        records.append({**_ordered(meta), "term": _term_name(term), "test": meta["test"], "estimate": math.nan,
                        "std_error": math.nan, "statistic": math.nan, "p_value": math.nan, "ci_low": math.nan,
                        "ci_high": math.nan, "identifiable": False, "collinear_with": ", ".join(named)})
    return records


def _ordered(meta: dict[str, object]) -> dict[str, object]:
    """The record's leading keys in the order stats.json has always had."""
    return {k: meta[k] for k in ("domain", "hypothesis", "method", "task", "n")}


def _partner_name(term: str) -> str:
    return TASK_EFFECT if term.startswith("C(task)") else _term_name(term)


def _term_name(term: str) -> str:
    match = re.search(r"\[T\.(.+)\]$", term)
    return f"method={match.group(1)}" if term.startswith("C(method") and match else term
