"""The analysis entry points: per-domain unit tables, every test, the regression and the adjusted p-values."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pandas as pd

from .hypotheses import adjust_within_families, hypothesis_records
from .items import item_records
from .regression import regression_records
from .seeds import collapse_seeds
from .tables import domain_columns
from .units import attach_pair_scores, configurations


@dataclass
class Analysis:
    """Everything the analysis computed: per-domain unit tables and the records."""

    configs: dict[str, pd.DataFrame]
    records: list[dict[str, object]]


def run_analysis(results_df: pd.DataFrame, agreement_df: pd.DataFrame | None = None,
                 fidelity_df: pd.DataFrame | None = None, seed: int = 0,
                 items_df: pd.DataFrame | None = None) -> Analysis:
    results = collapse_seeds(results_df)
    configs: dict[str, pd.DataFrame] = {}
    records: list[dict[str, object]] = []
    with warnings.catch_warnings():
        # Degenerate inputs of small studies (identical gains, one value per group) make scipy warn and return
        # NaN; the records carry the NaN and every table shows it as "-", so the warning would only be noise.
        warnings.simplefilter("ignore", RuntimeWarning)
        for domain in domain_columns(results):
            table = configurations(results, domain)
            if table.empty:
                continue
            table = attach_pair_scores(table, agreement_df, fidelity_df)
            configs[domain] = table
            records += hypothesis_records(table, seed)
            records += regression_records(table)
        if items_df is not None and not items_df.empty:
            records += item_records(items_df, seed)
    return Analysis(configs, adjust_within_families(records))


def analyse(results_df: pd.DataFrame, agreement_df: pd.DataFrame | None = None,
            fidelity_df: pd.DataFrame | None = None, seed: int = 0,
            items_df: pd.DataFrame | None = None) -> list[dict[str, object]]:
    """The study's tests (section 5) and the additions, as a list of JSON-ready records."""
    return run_analysis(results_df, agreement_df, fidelity_df, seed, items_df).records
