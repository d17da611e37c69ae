"""Cross-family pairs (issue 16) in the analysis: their units form groups of their own ("SeqKD/xtok_kl", ...) and
never enter the study's same-family SeqKD/RevKD/GKD groups, the pooled "all", the ANOVA or the regression."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

from kdscope.stats import analyse, describe_rows
from kdscope.stats.markdown import study_table

from stats_helpers import find, toy_table

CROSS_PAIRS = [("X-8B", "M-1B"), ("X-8B", "M-3B"), ("X-3B", "M-1B")]


def _with_cross_rows() -> pd.DataFrame:
    table = toy_table()
    rng = np.random.default_rng(7)
    rows = []
    for teacher, student in CROSS_PAIRS:
        for label in ("student_KD_xtok_kl_temp_1.0", "student_GKD_uld_temp_1.0"):
            # far above every same-family score: pooled, they would move every same-family statistic
            rows.append({"Teacher": teacher, "Student": student, "Method": label,
                         "gsm8k": 90 + rng.normal(), "SVAMP": 95 + rng.normal()})
    cross = pd.DataFrame(rows)
    cross["Average"] = cross[["gsm8k", "SVAMP"]].mean(axis=1)
    return pd.concat([table, cross], ignore_index=True)


def _same_family_gains(table: pd.DataFrame, stem: str) -> np.ndarray:
    """Restated: per same-family pair, the best of T in {1, 2} of the method's rows minus the student's SFT."""
    sft = table[table["Method"] == "SFT"].set_index("Student")["Average"]
    gains = []
    for (teacher, student), rows in table[table["Method"].str.match(rf"student_{stem}_temp_")].groupby(
            ["Teacher", "Student"], sort=True):
        gains.append(rows["Average"].max() - sft[student])
    return np.array(gains)


def test_cross_rows_are_described_by_their_loss() -> None:
    described = describe_rows(_with_cross_rows())
    assert set(described["cross_tokenizer"]) == {"", "xtok_kl", "uld"}
    assert (described.loc[described["cross_tokenizer"] == "uld", "kd_method"] == "GKD").all()


def test_cross_units_never_enter_the_study_groups() -> None:
    table = _with_cross_rows()
    records = analyse(table, seed=0)
    seqkd = find(records, "kd_beats_sft", method="SeqKD")
    expected = sps.ttest_1samp(_same_family_gains(table, "KD"), 0.0, alternative="greater")
    assert seqkd["n"] == 3
    assert np.isclose(seqkd["statistic"], expected.statistic) and np.isclose(seqkd["p_value"], expected.pvalue)
    assert find(records, "kd_beats_sft")["n"] == 9  # "all": 3 same-family pairs x 3 methods
    anova = find(records, "methods_differ")
    assert anova["n"] == 9
    # the cross-family units: their own groups, one per (method, loss), and pooled apart from "all"
    cross = find(records, "kd_beats_sft", method="SeqKD/xtok_kl")
    assert cross["n"] == 3 and cross["mean"] > 40
    assert find(records, "kd_beats_sft", method="GKD/uld")["n"] == 3
    assert find(records, "kd_beats_sft", method="all cross-tokenizer")["n"] == 6
    regression = [r for r in records if str(r["hypothesis"]).startswith("regression")]
    assert all(r["n"] == 2 * 9 for r in regression if "n" in r)  # two task columns x the 9 same-family units
    shown = study_table(records, "math", "kd_beats_sft")
    assert list(shown["method"]) == ["all", "SeqKD", "RevKD", "GKD", "GKD/uld", "SeqKD/xtok_kl",
                                     "all cross-tokenizer"]
