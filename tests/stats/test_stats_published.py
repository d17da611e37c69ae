"""The study's analysis reproduced from its released CSVs (study.md sections 5-6): checked against the published
figures, against the authors' notebook printouts, and against an independent re-implementation of the notebooks
written here with pandas + scipy only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from stats_helpers import find
from typer.testing import CliRunner

from kdscope.cli import app
from kdscope.stats import analyse, configurations, read_tables

MATH_FILES = ("math_results_main.csv", "llama_math_results.csv")
CS_FILES = ("cs_results_main.csv", "llama_cs_results.csv")


# ------------------------------------------------------------------------------------------------------------
# Fixtures: run the CLI once per domain on the study's tables
# ------------------------------------------------------------------------------------------------------------


def _run_stats(tmp: Path, files: list[Path], extra: list[str]) -> list[dict]:
    out = tmp / "stats.json"
    result = CliRunner().invoke(app, ["stats", *map(str, files), "--json", str(out), "--markdown",
                                      str(tmp / "stats.md"), *extra])
    assert result.exit_code == 0, result.output
    assert (tmp / "stats.md").read_text().count("|") > 100
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results_dir(shared_data: Path) -> Path:
    return shared_data / "results"


@pytest.fixture(scope="module")
def math_records(results_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _run_stats(tmp_path_factory.mktemp("math"), [results_dir / f for f in MATH_FILES],
                      ["--agreement", str(results_dir / "EM1.csv"), "--fidelity", str(results_dir / "BLEU.csv")])


@pytest.fixture(scope="module")
def cs_records(results_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _run_stats(tmp_path_factory.mktemp("cs"), [results_dir / f for f in CS_FILES],
                      ["--agreement", str(results_dir / "EM1_cs.csv")])


# ------------------------------------------------------------------------------------------------------------
# study.md section 6: the published figures, to two decimals
# ------------------------------------------------------------------------------------------------------------

PUBLISHED = [
    # (domain, hypothesis, statistic, p-value, p digits) - study.md section 6
    ("math", "kd_beats_sft", 8.47, 6e-10, 10),
    ("commonsense", "kd_beats_sft", 3.86, 3e-4, 4),
    ("math", "student_size", -0.66, 3e-5, 5),
    ("commonsense", "student_size", -0.54, 0.001, 3),
    ("math", "teacher_score", -0.01, None, None),
    ("commonsense", "teacher_score", -0.30, None, None),
    ("math", "methods_differ", None, 0.12, 2),
    ("commonsense", "methods_differ", None, 0.75, 2),
]


@pytest.mark.parametrize("domain,hypothesis,statistic,p_value,digits", PUBLISHED)
def test_published_figures(math_records: list[dict], cs_records: list[dict], domain: str, hypothesis: str,
                           statistic: float | None, p_value: float | None, digits: int | None) -> None:
    record = find(math_records if domain == "math" else cs_records, hypothesis)
    assert record["domain"] == domain
    assert record["n"] == 33  # 11 pairs x 3 methods
    if statistic is not None:
        assert round(record["statistic"], 2) == statistic
    if p_value is not None:
        # rounded to the quoted figure's last decimal: 5.65e-10 -> 6e-10, 3.38e-5 -> 3e-5, 0.0012 -> 0.001
        assert round(record["p_value"], digits) == pytest.approx(p_value)


def test_teacher_score_not_significant(math_records: list[dict], cs_records: list[dict]) -> None:
    """study.md: improvement vs teacher score is about zero and not significant in either domain."""
    assert find(math_records, "teacher_score")["p_value"] > 0.05
    assert find(cs_records, "teacher_score")["p_value"] > 0.05


# The authors' notebooks print these (analysis/statistical_tests_math.ipynb, cells 18-20 and 31): pooled t per
# task column, ANOVA F per task, size correlation per method for Average.
NOTEBOOK_MATH_T = {"AQuA": 4.072992801385696, "AddSub": 5.568897122396901, "gsm8k": 8.86504174606726,
                   "MultiArith": 7.088076711702631, "SVAMP": 7.393615265661642, "SingleEq": 8.309176476087927}
NOTEBOOK_CS_T = {"ARC-Challenge": 5.43416276778673, "ARC-Easy": 5.303659136479958, "boolq": 1.3988879518619723,
                 "hellaswag": 0.6591504075040326, "openbookqa": 7.593553450495701, "piqa": 4.768814711459237,
                 "social_i_qa": 7.920820162339729, "winogrande": 7.237212925000095}


def test_notebook_printouts_per_task(math_records: list[dict], cs_records: list[dict]) -> None:
    for task, t in NOTEBOOK_MATH_T.items():
        assert find(math_records, "kd_beats_sft", task)["statistic"] == pytest.approx(t, rel=1e-9)
    for task, t in NOTEBOOK_CS_T.items():
        assert find(cs_records, "kd_beats_sft", task)["statistic"] == pytest.approx(t, rel=1e-9)
    assert find(math_records, "student_size", method="RevKD")["statistic"] == pytest.approx(-0.8601512308077806)
    assert find(math_records, "agreement", "MultiArith")["statistic"] == pytest.approx(-0.6320408986083471)
    assert find(math_records, "fidelity", "MultiArith")["statistic"] == pytest.approx(-0.4599927890265838)
    assert find(cs_records, "agreement", "openbookqa")["statistic"] == pytest.approx(-0.3193525830422865)


def test_gains_quoted_in_section_6(results_dir: Path) -> None:
    """Qwen2.5-0.5B math Average 52.84 -> 63.21; Llama-3.2-1B MultiArith 64.00 -> 86.33; largest students ~1.3."""
    math_cfg = configurations(read_tables([results_dir / f for f in MATH_FILES]), "math")
    best = math_cfg.groupby(["Student", "task"])[["student_sft", "kd"]].max()
    assert tuple(best.loc[("Qwen2.5-0.5B", "Average")].round(2)) == (52.84, 63.21)
    assert tuple(best.loc[("Llama-3.2-1B", "MultiArith")].round(2)) == (64.00, 86.33)
    cs_cfg = configurations(read_tables([results_dir / f for f in CS_FILES]), "commonsense")
    # "about 1.3 points for the largest students" is not an exact figure of the tables: the closest are the
    # commonsense Qwen2.5-7B mean gain over methods, 1.24, and the math one, -0.12 (mean 0.56 over both domains).
    # We pin what the tables give and that it is "about" the quoted value.
    largest = cs_cfg[(cs_cfg.Student == "Qwen2.5-7B") & (cs_cfg.task == "Average")]["improvement"].mean()
    assert round(largest, 2) == 1.24 and abs(largest - 1.3) < 0.1


def test_temperature_and_ablation_figures(results_dir: Path) -> None:
    """Section 6 statements read directly from the tables (no kdscope code): T=5 collapse 8.3/4.8 (Qwen 3B->0.5B
    math), RevKD T=1 commonsense collapse to averages 10-22, base teacher costs 21-51 points."""
    math_t = pd.concat([pd.read_csv(results_dir / f) for f in MATH_FILES])
    cs_t = pd.concat([pd.read_csv(results_dir / f) for f in CS_FILES])
    pair = math_t[(math_t.Teacher.str.startswith("Qwen2.5-3B")) & (math_t.Student == "Qwen2.5-0.5B")]
    t5 = pair.set_index("Method").loc[["student_KD_temp_5.0", "student_RevKD_temp_5.0"], "Average"]
    assert t5.round(1).tolist() == [8.3, 4.8]
    rev1 = cs_t[cs_t.Method == "student_RevKD_temp_1.0"]["Average"]
    collapsed = rev1[rev1 < 30]
    assert len(collapsed) >= 2 and collapsed.min() >= 10 and round(collapsed.max()) <= 22
    costs = []
    for table in (math_t, cs_t):
        table = table.assign(T=table.Teacher.str.split("_").str[0]).set_index(["T", "Student", "Method"])
        base = table.xs("student_KD_base_teacher_temp_1.0", level="Method")["Average"]
        tuned = table.xs("student_KD_temp_1.0", level="Method")["Average"].reindex(base.index)
        costs += list(tuned - base)
    assert round(min(costs)) == 21 and round(max(costs)) == 51


def test_fidelity_rises_under_kd_for_every_pair(results_dir: Path) -> None:
    bleu = pd.read_csv(results_dir / "BLEU.csv")
    tasks = [c for c in bleu.columns if c not in ("Teacher", "Student", "Pair", "Method")]
    mean = bleu.groupby(["Teacher", "Student", "Method"])[tasks].mean().mean(axis=1).unstack("Method")
    # True for the mean over tasks (the paper's claim); not for every single task (e.g. 14B->0.5B AQuA).
    assert len(mean) == 11 and (mean["KD"] > mean["SFT"]).all()


# ------------------------------------------------------------------------------------------------------------
# Independent re-implementation of the notebooks (pandas + scipy only) on every task column
# ------------------------------------------------------------------------------------------------------------


def notebook_unit_table(results_dir: Path, files: tuple[str, ...],
                        drop_base_teacher: bool) -> tuple[pd.DataFrame, list[str]]:
    """Literally the notebooks' steps: base-teacher rows dropped in math only; 'student' rows; method by substring;
    teacher name before '_'; max per (Teacher, Student, Method); inner merge with SFT on Student and Teacher."""
    data = pd.concat([pd.read_csv(results_dir / f) for f in files])
    if drop_base_teacher:
        data = data[~data.Method.str.contains("base_teacher_")]
    tasks = sorted(data.columns[3:-1].tolist()) + ["Average"]
    sft = data[data.Method == "SFT"]
    kd = data[data.Method.str.contains("student")].copy()
    kd["Method"] = kd.Method.map(lambda x: "RevKD" if "RevKD" in x else "GKD" if "GKD" in x else "SeqKD")
    kd["Teacher"] = kd.Teacher.map(lambda x: x.split("_")[0])
    kd = kd.groupby(["Teacher", "Student", "Method"])[tasks].max().reset_index()
    unit = kd.merge(sft[["Student"] + tasks].rename(columns={t: t + " SFT" for t in tasks}), how="inner")
    for t in tasks:
        unit[t + " Improvement"] = unit[t] - unit[t + " SFT"]
    teacher = sft[["Student"] + tasks].rename(columns={**{t: t + " Teacher" for t in tasks}, "Student": "Teacher"})
    unit = unit.merge(teacher, how="inner")
    unit["Model Size"] = unit.Student.map(lambda x: float(x.split("-")[-1].replace("B", "")))
    return unit, tasks


def add_pair_table(unit: pd.DataFrame, table: pd.DataFrame, tasks: list[str], name: str) -> pd.DataFrame:
    kd = table[table.Method == "KD"]
    return unit.merge(kd[["Teacher", "Student"] + tasks].rename(columns={t: f"{t} {name}" for t in tasks}), how="inner")


def oracle_tests(unit: pd.DataFrame, tasks: list[str], pair_columns: dict[str, list[str]]) -> dict[tuple, tuple]:
    out: dict[tuple, tuple] = {}
    for method in ["all", "SeqKD", "RevKD", "GKD"]:
        sub = unit if method == "all" else unit[unit.Method == method]
        for t in tasks:
            imp = sub[t + " Improvement"]
            r = sps.ttest_1samp(imp, 0, alternative="greater")
            out[("kd_beats_sft", method, t)] = (r.statistic, r.pvalue)
            for hyp, column in (("teacher_score", t + " Teacher"), ("student_size", "Model Size"),
                                ("student_sft", t + " SFT")):
                r = sps.spearmanr(imp, sub[column])
                out[(hyp, method, t)] = (r.statistic, r.pvalue)
            for hyp, columns in pair_columns.items():
                if t in columns:
                    r = sps.spearmanr(imp, sub[f"{t} {hyp}"])
                    out[(hyp, method, t)] = (r.statistic, r.pvalue)
    for t in tasks:
        r = sps.f_oneway(*(unit[unit.Method == m][t + " Improvement"] for m in ("SeqKD", "RevKD", "GKD")))
        out[("methods_differ", "all", t)] = (r.statistic, r.pvalue)
    return out


@pytest.mark.parametrize("domain", ["math", "commonsense"])
def test_agrees_with_independent_scipy_on_every_task(results_dir: Path, math_records: list[dict],
                                                     cs_records: list[dict], domain: str) -> None:
    is_math = domain == "math"
    unit, tasks = notebook_unit_table(results_dir, MATH_FILES if is_math else CS_FILES, drop_base_teacher=is_math)
    task_columns = [t for t in tasks if t != "Average"]
    pair_columns = {"agreement": task_columns}
    unit = add_pair_table(unit, pd.read_csv(results_dir / ("EM1.csv" if is_math else "EM1_cs.csv")), task_columns,
                          "agreement")
    if is_math:
        unit = add_pair_table(unit, pd.read_csv(results_dir / "BLEU.csv"), task_columns, "fidelity")
        pair_columns["fidelity"] = task_columns
    assert len(unit) == 33
    expected = oracle_tests(unit, tasks, pair_columns)
    records = math_records if is_math else cs_records
    got = {(r["hypothesis"], r["method"], r["task"]): (r["statistic"], r["p_value"]) for r in records
           if r["hypothesis"] in {h for h, _, _ in expected}}
    assert set(got) == set(expected)
    for key, (statistic, p_value) in expected.items():
        assert got[key][0] == pytest.approx(statistic, rel=1e-9, abs=1e-12), key
        assert got[key][1] == pytest.approx(p_value, rel=1e-9, abs=1e-15), key


def test_base_teacher_rows_never_reach_the_maximum(results_dir: Path) -> None:
    """Why dropping base-teacher rows in both domains reproduces the commonsense notebook, which kept them."""
    kept, tasks = notebook_unit_table(results_dir, CS_FILES, drop_base_teacher=False)
    dropped, _ = notebook_unit_table(results_dir, CS_FILES, drop_base_teacher=True)
    cols = [t + " Improvement" for t in tasks]
    pd.testing.assert_frame_equal(kept[cols], dropped[cols])


# ------------------------------------------------------------------------------------------------------------
# Beyond the study: adjusted p-values, effect sizes, regression
# ------------------------------------------------------------------------------------------------------------


def test_holm_and_bh_within_families(math_records: list[dict]) -> None:
    """Issue 12 item 14: Average is computed from the task columns, so it is no test of their family."""
    from statsmodels.stats.multitest import multipletests

    family = [r for r in math_records if r["hypothesis"] == "kd_beats_sft" and r["method"] == "all"
              and r["task"] != "Average"]
    assert len(family) == 6 and all(r["family_size"] == 6 for r in family)
    p = np.array([r["p_value"] for r in family])
    np.testing.assert_allclose([r["p_holm"] for r in family], multipletests(p, method="holm")[1], rtol=1e-12)
    np.testing.assert_allclose([r["p_bh"] for r in family], multipletests(p, method="fdr_bh")[1], rtol=1e-12)
    order = np.argsort(p)
    m = len(p)
    holm = np.maximum.accumulate(np.minimum(1, p[order] * (m - np.arange(m))))  # step-down, written out
    bh = np.minimum.accumulate((p[order] * m / np.arange(1, m + 1))[::-1])[::-1]  # step-up, written out
    np.testing.assert_allclose([family[i]["p_holm"] for i in order], holm, rtol=1e-12)
    np.testing.assert_allclose([family[i]["p_bh"] for i in order], np.minimum(bh, 1), rtol=1e-12)
    average = find(math_records, "kd_beats_sft")
    assert average["family_size"] == 1 and average["p_holm"] == average["p_bh"] == average["p_value"]


def test_effect_sizes_and_intervals(math_records: list[dict], results_dir: Path) -> None:
    record = find(math_records, "kd_beats_sft")
    unit, _ = notebook_unit_table(results_dir, MATH_FILES, drop_base_teacher=True)
    imp = unit["Average Improvement"].to_numpy()
    assert record["mean"] == pytest.approx(imp.mean())
    assert record["cohens_dz"] == pytest.approx(imp.mean() / imp.std(ddof=1))
    assert record["dz_ci_low"] < record["cohens_dz"] < record["dz_ci_high"]
    assert record["boot_ci_low"] < record["mean"] < record["boot_ci_high"]
    no_ties = len(np.unique(np.abs(imp))) == len(imp)  # R's wilcox.test rule: exact unless ties (or n >= 50)
    expected = sps.wilcoxon(imp, alternative="greater", method="exact" if no_ties else "approx").pvalue
    assert record["wilcoxon_p"] == pytest.approx(expected)
    rho = find(math_records, "student_size")
    assert rho["rho_ci_low"] < rho["statistic"] < rho["rho_ci_high"] < 0


def test_regression_matches_least_squares(results_dir: Path) -> None:
    res = read_tables([results_dir / f for f in MATH_FILES])
    records = [r for r in analyse(res) if r["hypothesis"] == "regression_ols"]
    cfg = configurations(res, "math")
    data = cfg[cfg.task != "Average"].dropna(subset=["teacher_score"])
    design = np.column_stack([np.ones(len(data)), np.log(data.student_size), data.teacher_score,
                              data.method == "GKD", data.method == "RevKD",
                              *[data.task == t for t in sorted(data.task.unique())[1:]]]).astype(float)
    beta = np.linalg.lstsq(design, data.improvement.to_numpy(), rcond=None)[0]
    terms = {r["term"]: r["estimate"] for r in records}
    assert terms["log_size"] == pytest.approx(beta[1], rel=1e-8)
    assert terms["teacher_score"] == pytest.approx(beta[2], rel=1e-8)
    assert terms["method=GKD"] == pytest.approx(beta[3], rel=1e-8)
    assert terms["method=RevKD"] == pytest.approx(beta[4], rel=1e-8)
