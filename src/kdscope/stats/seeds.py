"""Multi-seed aggregation: mean and Student-t interval over seeds, and one row per configuration for the tests."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .tables import AVERAGE, DESCRIPTOR_COLUMNS, ID_COLUMNS, SEED_COLUMN, domain_columns, row_domains

CONFIDENCE = 0.95


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval; the interval is NaN with fewer than two values."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def seed_summary(results: pd.DataFrame, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """Long table of mean and t-CI over seeds for every (Teacher, Student, Method, task) of a table with a Seed
    column (one row per run). Without a Seed column every row is one seed."""
    task_cols = [c for cols in domain_columns(results).values() for c in cols]
    if AVERAGE in results.columns:
        task_cols.append(AVERAGE)
    rows = []
    for key, group in results.assign(_domain=row_domains(results)).groupby([*ID_COLUMNS, "_domain"], sort=False):
        key = key[: len(ID_COLUMNS)]
        for task in task_cols:
            values = group[task].dropna()
            if values.empty:
                continue
            mean, low, high = mean_ci(values.to_numpy(), confidence)
            rows.append({**dict(zip(ID_COLUMNS, key)), "task": task, "n_seeds": len(values), "mean": mean,
                         "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows)


def collapse_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (Teacher, Student, Method, domain): the mean over seeds. The real columns that describe a row
    (KDMethod, Temperature, Ablation) are kept as keys. Tables without a Seed column pass through."""
    if SEED_COLUMN not in results.columns:
        return results
    descriptors = [c for c in DESCRIPTOR_COLUMNS if c in results.columns]
    keys = [*ID_COLUMNS, *descriptors, "_domain"]
    numeric = [c for c in results.columns if c not in (*keys, SEED_COLUMN) and
               pd.api.types.is_numeric_dtype(results[c])]
    grouped = results.assign(_domain=row_domains(results)).groupby(keys, sort=False, as_index=False, dropna=False)
    return grouped[numeric].mean().drop(columns="_domain")
