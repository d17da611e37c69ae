"""The unit table: which rows are KD students (real columns, else the study's labels), the maximum over
temperatures, seeds, and agreement/fidelity of the student each configuration describes (issue 12 item 12)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from stats_helpers import find, toy_table, with_real_columns

from kdscope.errors import InputError
from kdscope.stats import analyse, collapse_seeds, configurations, run_analysis


def test_unknown_rows_are_left_out_of_the_tests() -> None:
    records = analyse(toy_table())
    record = find(records, "kd_beats_sft")
    assert record["n"] == 9 and record["domain"] == "math"
    assert record["mean"] < 10  # the 99.0 noise rows would dominate the maximum if they counted


def test_seeds_are_averaged_and_analysis_is_deterministic() -> None:
    from scipy import stats as sps

    from kdscope.stats import mean_ci

    table = toy_table()
    seeded = pd.concat([table.assign(Seed=1), table.assign(Seed=2)])
    assert analyse(seeded, seed=3) == analyse(table, seed=3)
    low_high = mean_ci([1.0, 2.0, 4.0])
    interval = sps.t.interval(0.95, 2, loc=np.mean([1, 2, 4]), scale=sps.sem([1, 2, 4]))
    assert low_high[1:] == pytest.approx(interval)


def test_seed_aggregation_keeps_domains_apart() -> None:
    """A model's math and commonsense rows share Teacher/Student/Method and the Average column."""
    rows = []
    for seed in (1, 2):
        rows.append({"Teacher": "-", "Student": "S-1B", "Method": "SFT", "gsm8k": 10.0 * seed, "Average": 10.0 * seed,
                     "Seed": seed})
        rows.append({"Teacher": "-", "Student": "S-1B", "Method": "SFT", "boolq": 50.0 + seed, "Average": 50.0 + seed,
                     "Seed": seed})
    collapsed = collapse_seeds(pd.DataFrame(rows))
    assert len(collapsed) == 2


# ------------------------------------------------------------------------------------------------------------
# Real columns (issue 14 item 5): KDMethod, Temperature, Ablation, Seed describe a row; labels only for the study's
# published CSVs
# ------------------------------------------------------------------------------------------------------------


def _opaque_labels(table: pd.DataFrame) -> pd.DataFrame:
    """Method labels that say nothing about method or temperature: only the real columns do."""
    labels = [m if m == "SFT" else f"run-{i}" for i, m in enumerate(table["Method"])]
    return table.assign(Method=labels)


def test_real_columns_describe_the_rows() -> None:
    expected = analyse(toy_table(), seed=0)
    assert analyse(_opaque_labels(with_real_columns(toy_table())), seed=0) == expected


def test_real_columns_survive_seed_aggregation() -> None:
    table = _opaque_labels(with_real_columns(toy_table()))
    seeded = pd.concat([table.assign(Seed=1), table.assign(Seed=2)], ignore_index=True)
    assert analyse(seeded, seed=0) == analyse(toy_table(), seed=0)


def test_real_columns_win_over_the_label() -> None:
    """A row labelled like a plain KD student but marked as an ablation in its real columns is no KD unit."""
    table = with_real_columns(toy_table())
    noise = table["Method"].str.contains("noise")
    table.loc[noise, "Method"] = "student_KD_temp_1.0"  # the label lies; the real columns say noise_sigma=2.0
    record = find(analyse(table), "kd_beats_sft")
    assert record["n"] == 9 and record["mean"] < 10


def test_temperature_of_gkd_may_be_empty() -> None:
    """GKD uses no temperature: a real-column table may leave its Temperature empty."""
    table = with_real_columns(toy_table())
    gkd = table["KDMethod"] == "GKD"
    table = table[~gkd | (table["Temperature"] == 1.0)].copy()
    table.loc[table["KDMethod"] == "GKD", "Temperature"] = np.nan
    configs = configurations(table, "math")
    assert len(configs[configs["method"] == "GKD"]) == 3 * 3  # 3 pairs x (2 tasks + Average)


# ------------------------------------------------------------------------------------------------------------
# Agreement and fidelity of the student each configuration describes
# ------------------------------------------------------------------------------------------------------------

TASKS = ("gsm8k", "SVAMP")


def _pair_table(results: pd.DataFrame, seed: int) -> pd.DataFrame:
    """An agreement table as kdscope's fidelity jobs write it: one row per KD student (its label), SFT rows, and
    distinct values so that any mix-up shows."""
    rng = np.random.default_rng(seed)
    kd = results[results["Method"] != "SFT"]
    rows = [{"Teacher": t, "Student": s, "Pair": f"{t} -> {s}", "Method": m,
             **{task: float(rng.uniform(0, 100)) for task in TASKS}}
            for t, s, m in kd[["Teacher", "Student", "Method"]].itertuples(index=False)]
    rows += [{"Teacher": t, "Student": s, "Pair": f"{t} -> {s}", "Method": "SFT", **{task: 1.0 for task in TASKS}}
             for t, s in kd[["Teacher", "Student"]].drop_duplicates().itertuples(index=False)]
    return pd.DataFrame(rows)


def _expected(results: pd.DataFrame, table: pd.DataFrame, name: str) -> pd.DataFrame:
    """Written out with pandas alone: per (pair, method, task) the label of the temperature with the best score
    (lowest temperature on a tie), then that student's value."""
    kd = results[results["Method"].str.match(r"^student_(KD|RevKD|GKD)_temp_")].copy()
    kd["method"] = kd["Method"].str.extract(r"^student_(KD|RevKD|GKD)_")[0].replace({"KD": "SeqKD"})
    kd["T"] = kd["Method"].str.extract(r"_temp_([\d.]+)$")[0].astype(float)
    out = []
    for task in TASKS:
        best = kd.sort_values("T", kind="stable").groupby(["Teacher", "Student", "method"])[task].idxmax()
        for (teacher, student, method), index in best.items():
            label = kd.loc[index, "Method"]
            value = table[(table["Teacher"] == teacher) & (table["Student"] == student) &
                          (table["Method"] == label)][task].mean()
            out.append({"Teacher": teacher, "Student": student, "method": method, "task": task, name: value})
    return pd.DataFrame(out)


def test_agreement_and_fidelity_are_the_described_students() -> None:
    results = toy_table()
    agreement, fidelity = _pair_table(results, 1), _pair_table(results, 2)
    configs = run_analysis(results, agreement, fidelity).configs["math"]
    got = configs[configs["task"] != "Average"][["Teacher", "Student", "method", "task", "agreement", "fidelity"]]
    expected = _expected(results, agreement, "agreement").merge(_expected(results, fidelity, "fidelity"))
    merged = got.merge(expected, on=["Teacher", "Student", "method", "task"], suffixes=("", "_expected"))
    assert len(merged) == 3 * 3 * 2
    np.testing.assert_array_equal(merged["agreement"], merged["agreement_expected"])
    np.testing.assert_array_equal(merged["fidelity"], merged["fidelity_expected"])
    # never the optimistic maximum over the pair's students: the three methods of a pair differ
    assert merged.groupby(["Teacher", "Student", "task"])["agreement"].nunique().min() > 1
    assert configs[configs["task"] == "Average"]["agreement"].isna().all()


def test_pair_values_are_averaged_over_seeds() -> None:
    results = toy_table()
    one, two = _pair_table(results, 1), _pair_table(results, 2)
    seeded = pd.concat([one.assign(Seed=1, Domain="math"), two.assign(Seed=2, Domain="math")], ignore_index=True)
    configs = run_analysis(results, seeded).configs["math"]
    mean = pd.concat([one, two]).groupby(["Teacher", "Student", "Method"], as_index=False)[list(TASKS)].mean()
    expected = _expected(results, mean, "agreement")
    merged = configs.merge(expected, on=["Teacher", "Student", "method", "task"], suffixes=("", "_expected"))
    np.testing.assert_allclose(merged["agreement"], merged["agreement_expected"], rtol=1e-12)


def test_one_unlabelled_kd_row_per_pair_goes_to_every_method() -> None:
    """The study's released EM1/BLEU layout: one row per pair named just 'KD'; its notebooks attach it to all
    three methods (kept so the released tables reproduce them)."""
    results = toy_table()
    pairs = results[results["Teacher"] != "-"][["Teacher", "Student"]].drop_duplicates()
    table = pairs.assign(Method="KD", gsm8k=np.arange(len(pairs)) + 10.0, SVAMP=np.arange(len(pairs)) + 20.0)
    configs = run_analysis(results, table).configs["math"]
    for row in table.itertuples(index=False):
        mine = configs[(configs["Teacher"] == row.Teacher) & (configs["Student"] == row.Student)]
        assert set(mine.loc[mine["task"] == "gsm8k", "agreement"]) == {row.gsm8k}
        assert set(mine.loc[mine["task"] == "SVAMP", "agreement"]) == {row.SVAMP}
        assert mine["method"].nunique() == 3


def test_several_unlabelled_kd_rows_of_a_pair_are_refused() -> None:
    results = toy_table()
    table = pd.DataFrame([{"Teacher": "M-8B", "Student": "M-1B", "Method": method, "gsm8k": value}
                          for method, value in (("KD", 10.0), ("best", 90.0))])
    with pytest.raises(InputError, match="several KD rows"):
        run_analysis(results, table)


def test_students_without_values_stay_empty() -> None:
    """A configuration whose student has no agreement row gets none, not another student's value."""
    results = toy_table()
    table = _pair_table(results, 1)
    table = table[~table["Method"].str.startswith("student_GKD")]
    configs = run_analysis(results, table).configs["math"]
    tasks = configs[configs["task"] != "Average"]
    assert tasks.loc[tasks["method"] == "GKD", "agreement"].isna().all()
    assert not tasks.loc[tasks["method"] != "GKD", "agreement"].isna().any()
    assert not math.isnan(find(analyse(results, table), "agreement", "gsm8k", "SeqKD")["n"])
