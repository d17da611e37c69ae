"""The tests beyond the study's: adjusted p-values within families, effect-size intervals, paired per-item tests."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from stats_helpers import toy_table

from kdscope.errors import InputError
from kdscope.stats import adjust_within_families, analyse, cohens_dz_ci, mcnemar, paired_bootstrap


def test_average_is_kept_out_of_the_task_family() -> None:
    """A family built by hand from the task records only, adjusted by statsmodels, equals what the analysis gives."""
    from statsmodels.stats.multitest import multipletests

    records = analyse(toy_table(), seed=0)
    for hypothesis in ("kd_beats_sft", "student_sft"):
        tasks = [r for r in records if r["hypothesis"] == hypothesis and r["method"] == "all"
                 and r["task"] in ("gsm8k", "SVAMP")]
        assert len(tasks) == 2
        p = [r["p_value"] for r in tasks]
        assert [r["p_holm"] for r in tasks] == pytest.approx(list(multipletests(p, method="holm")[1]), rel=1e-12)
        assert [r["p_bh"] for r in tasks] == pytest.approx(list(multipletests(p, method="fdr_bh")[1]), rel=1e-12)
        assert all(r["family_size"] == 2 for r in tasks)


def test_mcnemar_and_paired_bootstrap() -> None:
    a = np.array([1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0] * 3, dtype=bool)
    b = np.array([1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0] * 3, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    result = mcnemar(a, b, exact=True)
    assert result["p_value"] == pytest.approx(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    chi2 = mcnemar(a, b, exact=False)
    assert chi2["statistic"] == pytest.approx((abs(only_a - only_b) - 1) ** 2 / (only_a + only_b))
    boot = paired_bootstrap(a, b, n_boot=2000, seed=7)
    assert boot == paired_bootstrap(a, b, n_boot=2000, seed=7)
    assert boot["difference"] == pytest.approx((b.mean() - a.mean()) * 100)
    assert boot["ci_low"] < boot["difference"] < boot["ci_high"]
    with pytest.raises(InputError):
        mcnemar([True], [True, False])


def test_item_records_pair_kd_with_sft() -> None:
    rng = np.random.default_rng(0)
    sft = rng.random(200) < 0.5
    kd = sft | (rng.random(200) < 0.3)
    items = pd.concat([
        pd.DataFrame({"Teacher": "-", "Student": "M-1B", "Method": "SFT", "task": "gsm8k", "item": range(200),
                      "correct": sft}),
        pd.DataFrame({"Teacher": "M-8B", "Student": "M-1B", "Method": "student_KD_temp_2.0", "task": "gsm8k",
                      "item": range(200), "correct": kd})])
    [record] = [r for r in analyse(toy_table(), items_df=items) if r["hypothesis"] == "kd_vs_sft_items"]
    assert record["method"] == "SeqKD" and record["n"] == 200 and record["p_value"] < 0.01
    assert record["accuracy_difference"] == pytest.approx((kd.mean() - sft.mean()) * 100)


def test_adjustment_ignores_untestable_records() -> None:
    records = [{"domain": "d", "hypothesis": "h", "method": "all", "p_value": p} for p in (0.01, math.nan, 0.04)]
    adjusted = adjust_within_families(records)
    assert [r["family_size"] for r in adjusted] == [2, 2, 2] and math.isnan(adjusted[1]["p_holm"])
    assert adjusted[0]["p_holm"] == pytest.approx(0.02)


def test_dz_interval_inverts_the_noncentral_t() -> None:
    x = np.array([1.2, 0.4, 2.5, -0.3, 1.9, 0.8, 1.1, 2.2])
    d, low, high = cohens_dz_ci(x)
    n = len(x)
    t_obs = x.mean() / (x.std(ddof=1) / math.sqrt(n))
    assert sps.nct.cdf(t_obs, n - 1, low * math.sqrt(n)) == pytest.approx(0.975, abs=1e-6)
    assert sps.nct.cdf(t_obs, n - 1, high * math.sqrt(n)) == pytest.approx(0.025, abs=1e-6)
    assert low < d < high


def test_degenerate_input_gives_nan_not_library_warnings() -> None:
    """Issue 13: no library warning reaches the console; a statistic that cannot be computed is NaN (shown "-")."""
    import warnings

    table = toy_table()
    scores = ["gsm8k", "SVAMP", "Average"]
    sft = table["Method"] == "SFT"
    for student in table["Student"].unique():  # every KD student scores exactly its SFT score: zero gains
        mine = table["Student"] == student
        table.loc[mine & ~sft, scores] = table.loc[mine & sft, scores].to_numpy(float)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = analyse(table)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    pooled = [r for r in records if r["hypothesis"] == "kd_beats_sft" and r["method"] == "all"]
    assert pooled and all(math.isnan(r["statistic"]) for r in pooled)
    assert not [r for r in records if r["hypothesis"] in ("student_size", "teacher_score", "student_sft")]
