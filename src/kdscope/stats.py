"""Statistics of a distillation study: the study's own analysis (study.md section 5), reproduced exactly, plus what
it lacked (multiple-comparison control, effect sizes with confidence intervals, robustness tests, a regression,
paired per-item tests and multi-seed aggregation).

Input is a result table in the study's CSV layout: ``Teacher, Student, Method``, one column per task, ``Average``;
Method values ``BaseModel``, ``SFT``, ``student_{KD|RevKD|GKD}_temp_T``, ``student_KD_base_teacher_temp_T``. Rows
of both domains may be mixed; each domain is analysed separately from the task columns it has.

The study's aggregation, as in the authors' notebooks (analysis/statistical_tests_{math,cs}.ipynb):
- the unit is one (teacher, student, method) configuration; the KD score is the maximum over temperatures, taken
  per task column and for ``Average`` independently;
- ``KD`` rows are called SeqKD; teacher names lose checkpoint suffixes (``Qwen2.5-3B_ckpt2400`` -> ``Qwen2.5-3B``);
- improvement = KD score - the same student's SFT score; teacher score = the teacher model's SFT row;
- student size in billions is parsed from the model name (``Qwen2.5-0.5B`` -> 0.5, ``Llama-3.2-1B`` -> 1);
- agreement and fidelity come from the ``KD`` rows of the EM1*/BLEU* tables, joined on (teacher, student), so the
  three methods of a pair share one value; they exist per task only (no ``Average``).
The math notebook drops base-teacher rows before the maximum, the commonsense one keeps them (as SeqKD); on the
released tables they never reach the maximum, so this module drops them in both domains with identical results.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

from .errors import InputError, where
from .labels import KD_METHODS, is_base_teacher, kd_method, size_or_nan, student_size, teacher_name  # noqa: F401
from .tasks import canonical_name, get_task

METHOD_GROUPS = ("all", *KD_METHODS)
ID_COLUMNS = ("Teacher", "Student", "Method")
AVERAGE = "Average"
SEED_COLUMN = "Seed"
ITEM_COLUMNS = ("Teacher", "Student", "Method", "task", "item", "correct")
CORRELATES = ("teacher_score", "student_size", "student_sft", "agreement", "fidelity")
CONFIDENCE = 0.95
N_BOOT = 10_000

# --------------------------------------------------------------------------------------------------------------
# Task columns
# --------------------------------------------------------------------------------------------------------------


def task_domain(column: str) -> str | None:
    """The domain of a task column (any alias of kdscope.tasks), None when the column is not a task."""
    try:
        return get_task(column).domain
    except KeyError:
        return None


def domain_columns(df: pd.DataFrame) -> dict[str, list[str]]:
    """Task columns of each domain present in ``df``, in table order."""
    found: dict[str, list[str]] = {}
    for column in df.columns:
        domain = task_domain(str(column))
        if domain is not None:
            found.setdefault(domain, []).append(str(column))
    return found


# --------------------------------------------------------------------------------------------------------------
# Loading tables
# --------------------------------------------------------------------------------------------------------------


def read_table(path: Path, required: Sequence[str] = ID_COLUMNS) -> pd.DataFrame:
    """Read a study-layout table (CSV, JSON list or JSONL of records) and check its id columns and numbers."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; pass a result table in the study's CSV layout")
    try:
        if path.suffix.lower() == ".jsonl":
            df = pd.read_json(path, lines=True)
        elif path.suffix.lower() == ".json":
            df = pd.DataFrame(json.loads(path.read_text()))
        else:
            df = pd.read_csv(path)
    except (ValueError, pd.errors.ParserError) as e:
        raise InputError(f"{path}: cannot parse ({e}); write it as CSV with a header row") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; the study layout is "
                         f"{', '.join(required)}, one column per task, Average")
    if not domain_columns(df):
        raise InputError(f"{path}: no task columns (e.g. gsm8k, boolq); name columns after the study's tasks")
    for column in [*(c for cols in domain_columns(df).values() for c in cols), AVERAGE]:
        if column in df.columns:
            df[column] = _numeric_column(df[column], path, column)
    return df


def _numeric_column(values: pd.Series, path: Path, column: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() & values.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0]) + 2  # +1 header, +1 one-based
        raise InputError(f"{where(path, row, column)}: {values[bad].iloc[0]!r} is not a number; "
                         "write accuracies as numbers (percent) or leave the cell empty")
    return numbers.astype(float)


def read_tables(paths: Iterable[Path], required: Sequence[str] = ID_COLUMNS) -> pd.DataFrame:
    """Concatenate several tables (e.g. math_results_main.csv + llama_math_results.csv)."""
    frames = [read_table(Path(p), required) for p in paths]
    if not frames:
        raise InputError("no input tables given; pass at least one result CSV")
    return pd.concat(frames, ignore_index=True)


def read_side_tables(paths: Sequence[Path], required: Sequence[str] = ID_COLUMNS) -> pd.DataFrame | None:
    """Concatenated agreement/fidelity/per-item/joint tables (CSV), or None when no path is given."""
    frames = []
    for path in map(Path, paths):
        if not path.is_file():
            raise InputError(f"{path}: no such file; check the path")
        frame = pd.read_csv(path)
        missing = [c for c in required if c not in frame.columns]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(required)}")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else None


# --------------------------------------------------------------------------------------------------------------
# Multi-seed aggregation
# --------------------------------------------------------------------------------------------------------------


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


def row_domains(results: pd.DataFrame) -> pd.Series:
    """Which domain(s) each row has scores for: a model's math and commonsense rows share Teacher, Student and
    Method (and the Average column), so seed aggregation must keep them apart."""
    has = {domain: results[cols].notna().any(axis=1) for domain, cols in domain_columns(results).items()}
    return pd.Series(["+".join(d for d in has if has[d].iloc[i]) for i in range(len(results))], index=results.index,
                     dtype=object)


def collapse_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (Teacher, Student, Method, domain): the mean over seeds. Tables without a Seed column pass
    through."""
    if SEED_COLUMN not in results.columns:
        return results
    numeric = [c for c in results.columns if c not in (*ID_COLUMNS, SEED_COLUMN) and
               pd.api.types.is_numeric_dtype(results[c])]
    grouped = results.assign(_domain=row_domains(results)).groupby([*ID_COLUMNS, "_domain"], sort=False, as_index=False)
    return grouped[numeric].mean()  # numeric excludes _domain, so it is dropped here


# --------------------------------------------------------------------------------------------------------------
# The study's unit table
# --------------------------------------------------------------------------------------------------------------


def configurations(results: pd.DataFrame, domain: str) -> pd.DataFrame:
    """Long table, one row per (Teacher, Student, method, task): ``kd`` (max over temperatures), ``student_sft``,
    ``improvement``, ``teacher_score``, ``student_size``. Tasks are the domain's columns plus Average."""
    columns = domain_columns(results).get(domain, [])
    if not columns:
        return pd.DataFrame()
    tasks = columns + ([AVERAGE] if AVERAGE in results.columns else [])
    rows = results[results[columns].notna().any(axis=1)]
    sft = _sft_scores(rows, tasks)
    parsed = rows["Method"].map(kd_method)
    kd_rows = rows[parsed.notna()].assign(
        Teacher=lambda d: d["Teacher"].map(teacher_name), method=parsed[parsed.notna()].map(lambda p: p[0]))
    best = kd_rows.groupby(["Teacher", "Student", "method"], sort=True)[tasks].max()
    long = best.reset_index().melt(id_vars=["Teacher", "Student", "method"], value_vars=tasks,
                                   var_name="task", value_name="kd")
    long = long.merge(sft.rename(columns={"model": "Student", "score": "student_sft"}), on=["Student", "task"],
                      how="inner")
    long = long.merge(sft.rename(columns={"model": "Teacher", "score": "teacher_score"}), on=["Teacher", "task"],
                      how="left")
    long["improvement"] = long["kd"] - long["student_sft"]
    long["student_size"] = long["Student"].map(size_or_nan)
    long.insert(0, "domain", domain)
    return long.dropna(subset=["improvement"]).reset_index(drop=True)


def _sft_scores(rows: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    sft = rows[rows["Method"].astype(str).str.strip() == "SFT"]
    duplicated = sft["Student"][sft["Student"].duplicated()]
    if not duplicated.empty:
        raise InputError(f"model {duplicated.iloc[0]!r} has several SFT rows; keep one per model or add a "
                         f"{SEED_COLUMN!r} column so seeds are averaged")
    return sft.melt(id_vars=["Student"], value_vars=tasks, var_name="task", value_name="score").rename(
        columns={"Student": "model"})


def pair_scores(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """Agreement/fidelity table (study EM1*/BLEU* layout) -> long (Teacher, Student, task key, value) from its KD
    rows, which the study used for every method of the pair. Task keys are canonical names."""
    kd = table[table["Method"].astype(str).str.strip() == "KD"].assign(Teacher=lambda d: d["Teacher"].map(teacher_name))
    columns = [c for cols in domain_columns(table).values() for c in cols]
    long = kd.melt(id_vars=["Teacher", "Student"], value_vars=columns, var_name="column", value_name=name)
    long["task_key"] = long["column"].map(canonical_name)
    return long.drop(columns="column").dropna(subset=[name])


def attach_pair_scores(configs: pd.DataFrame, agreement: pd.DataFrame | None,
                       fidelity: pd.DataFrame | None) -> pd.DataFrame:
    """Add ``agreement`` and ``fidelity`` columns (NaN where the tables have no value)."""
    out = configs.assign(task_key=configs["task"].map(lambda t: t if t == AVERAGE else canonical_name(t)))
    for name, table in (("agreement", agreement), ("fidelity", fidelity)):
        if table is None or table.empty:
            out[name] = np.nan
            continue
        scores = pair_scores(table, name).drop_duplicates(["Teacher", "Student", "task_key"])
        out = out.merge(scores, on=["Teacher", "Student", "task_key"], how="left")
    return out.drop(columns="task_key")


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


def cohens_dz_ci(x: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Cohen's d_z = mean / sd of the improvements, with an exact CI from inverting the noncentral t."""
    n = len(x)
    sd = float(np.std(x, ddof=1)) if n > 1 else math.nan
    if n < 2 or sd == 0 or math.isnan(sd):
        return math.nan, math.nan, math.nan
    d = float(np.mean(x)) / sd
    t_obs, df, root_n = d * math.sqrt(n), n - 1, math.sqrt(n)

    def ncp_for(tail: float) -> float:
        # nct.cdf(t_obs, df, ncp) decreases in ncp. Widen the bracket step by step: far-out ncp values make
        # scipy's nct return NaN, so a fixed wide bracket fails for small df.
        gap = lambda ncp: float(stats.nct.cdf(t_obs, df, ncp)) - tail  # noqa: E731
        step = 1.0 + abs(t_obs) / 4
        for k in range(1, 40):
            low, high = t_obs - k * step, t_obs + k * step
            g_low, g_high = gap(low), gap(high)
            if math.isnan(g_low) or math.isnan(g_high):
                return math.nan
            if g_low > 0 > g_high:
                return optimize.brentq(gap, low, high)
        return math.nan

    alpha = 1 - confidence
    return d, ncp_for(1 - alpha / 2) / root_n, ncp_for(alpha / 2) / root_n


def bootstrap_mean_ci(x: np.ndarray, seed: int, n_boot: int = N_BOOT,
                      confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, seeded."""
    rng = np.random.default_rng(seed)
    means = rng.choice(x, size=(n_boot, len(x)), replace=True).mean(axis=1)
    alpha = 1 - confidence
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def spearman_ci(rho: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Fisher-z CI of a Spearman rho with the Fieller et al. (1957) standard error sqrt(1.06 / (n - 3))."""
    if n < 4 or abs(rho) >= 1 or math.isnan(rho):
        return math.nan, math.nan
    z, se = math.atanh(rho), math.sqrt(1.06 / (n - 3))
    q = stats.norm.ppf(0.5 + confidence / 2)
    return math.tanh(z - q * se), math.tanh(z + q * se)


def kd_beats_sft(improvements: np.ndarray, seed: int) -> dict[str, object]:
    """One-sided one-sample t-test of improvement > 0 (the study's test) plus effect size, CIs and Wilcoxon."""
    t = stats.ttest_1samp(improvements, 0.0, alternative="greater")
    d, d_low, d_high = cohens_dz_ci(improvements)
    boot_low, boot_high = bootstrap_mean_ci(improvements, seed)
    nonzero = improvements[improvements != 0]
    # As R's wilcox.test: exact null distribution for n < 50 without ties, else the tie-corrected normal
    # approximation (scipy's default permutation test under ties is exact too but ~300x slower).
    exact = len(nonzero) < 50 and len(np.unique(np.abs(nonzero))) == len(nonzero)
    wilcoxon = stats.wilcoxon(nonzero, alternative="greater", method="exact" if exact else "approx") \
        if len(nonzero) > 0 else None
    return {"test": "one-sample t (one-sided, > 0)", "statistic": float(t.statistic), "p_value": float(t.pvalue),
            "df": int(len(improvements) - 1), "mean": float(np.mean(improvements)), "cohens_dz": d,
            "dz_ci_low": d_low, "dz_ci_high": d_high, "boot_ci_low": boot_low, "boot_ci_high": boot_high,
            "wilcoxon_statistic": float(wilcoxon.statistic) if wilcoxon else math.nan,
            "wilcoxon_p": float(wilcoxon.pvalue) if wilcoxon else math.nan}


def methods_differ(groups: dict[str, np.ndarray]) -> dict[str, object]:
    """One-way ANOVA over the three methods (the study's test), eta squared, Kruskal-Wallis as robustness check."""
    samples = [groups[m] for m in KD_METHODS]
    f = stats.f_oneway(*samples)
    pooled = np.concatenate(samples)
    ss_between = sum(len(s) * (s.mean() - pooled.mean()) ** 2 for s in samples)
    ss_total = float(((pooled - pooled.mean()) ** 2).sum())
    kruskal = stats.kruskal(*samples)
    return {"test": "one-way ANOVA", "statistic": float(f.statistic), "p_value": float(f.pvalue),
            "eta_squared": float(ss_between / ss_total) if ss_total > 0 else math.nan,
            "kruskal_statistic": float(kruskal.statistic), "kruskal_p": float(kruskal.pvalue)}


def correlation(improvements: np.ndarray, other: np.ndarray) -> dict[str, object]:
    """Spearman correlation (the study's test) with a Fisher-z CI."""
    rho = stats.spearmanr(improvements, other)
    low, high = spearman_ci(float(rho.statistic), len(improvements))
    return {"test": "Spearman", "statistic": float(rho.statistic), "p_value": float(rho.pvalue),
            "rho_ci_low": low, "rho_ci_high": high}


def hypothesis_records(configs: pd.DataFrame, seed: int) -> list[dict[str, object]]:
    """Every study test for one domain, per task (and Average), pooled over methods and per method."""
    records: list[dict[str, object]] = []
    domain = str(configs["domain"].iloc[0])
    for task, by_task in configs.groupby("task", sort=False):
        for method in METHOD_GROUPS:
            subset = by_task if method == "all" else by_task[by_task["method"] == method]
            if len(subset) < 2:
                continue
            base = {"domain": domain, "method": method, "task": task}
            imp = subset["improvement"].to_numpy(float)
            records.append({**base, "hypothesis": "kd_beats_sft", "n": len(imp), **kd_beats_sft(imp, seed)})
            for name in CORRELATES:
                pairs = subset[["improvement", name]].dropna()
                if len(pairs) >= 3 and pairs[name].nunique() > 1:
                    records.append({**base, "hypothesis": name, "n": len(pairs),
                                    **correlation(pairs["improvement"].to_numpy(), pairs[name].to_numpy())})
        groups = {m: by_task.loc[by_task["method"] == m, "improvement"].to_numpy(float) for m in KD_METHODS}
        if all(len(g) >= 2 for g in groups.values()):
            records.append({"domain": domain, "method": "all", "task": task, "hypothesis": "methods_differ",
                            "n": sum(len(g) for g in groups.values()), **methods_differ(groups)})
    return records


def adjust_within_families(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """Holm and Benjamini-Hochberg adjusted p-values; a family is one (domain, hypothesis, method) over its tasks
    (the task columns and Average), the set of tests that answer one question."""
    from statsmodels.stats.multitest import multipletests

    families: dict[tuple[object, ...], list[dict[str, object]]] = {}
    for record in records:
        if "p_value" in record:
            families.setdefault((record["domain"], record["hypothesis"], record["method"]), []).append(record)
    for family in families.values():
        tested = [r for r in family if not math.isnan(float(r["p_value"]))]  # type: ignore[arg-type]
        for r in family:
            r["family_size"], r["p_holm"], r["p_bh"] = len(tested), math.nan, math.nan
        if not tested:
            continue
        p = np.array([float(r["p_value"]) for r in tested])  # type: ignore[arg-type]
        holm = multipletests(p, method="holm")[1]
        bh = multipletests(p, method="fdr_bh")[1]
        for r, h, b in zip(tested, holm, bh):
            r["p_holm"], r["p_bh"] = float(h), float(b)
    return records


# --------------------------------------------------------------------------------------------------------------
# Regression
# --------------------------------------------------------------------------------------------------------------


def regression_records(configs: pd.DataFrame) -> list[dict[str, object]]:
    """Improvement ~ log(student size) + teacher score + method, task as fixed effect (OLS), and the same with task
    as a random intercept (mixed model) when it converges. Uses the task columns, not Average."""
    import statsmodels.formula.api as smf
    from statsmodels.tools.sm_exceptions import ConvergenceWarning

    data = configs[configs["task"] != AVERAGE].dropna(subset=["improvement", "teacher_score", "student_size"]).copy()
    if len(data) < 10 or data["task"].nunique() < 2 or data["method"].nunique() < 2:
        return []
    data["log_size"] = np.log(data["student_size"])
    domain = str(data["domain"].iloc[0])
    method_term = "C(method, Treatment('SeqKD'))" if "SeqKD" in set(data["method"]) else "C(method)"
    fixed = f"improvement ~ log_size + teacher_score + {method_term}"
    records = _coefficients(smf.ols(f"{fixed} + C(task)", data).fit(), domain, "regression_ols", len(data),
                            keep=lambda term: not term.startswith("C(task)"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            mixed = smf.mixedlm(fixed, data, groups=data["task"]).fit(reml=True)
        except (ConvergenceWarning, np.linalg.LinAlgError, ValueError):
            mixed = None
    if mixed is not None and mixed.converged:
        records += _coefficients(mixed, domain, "regression_mixed", len(data), keep=lambda term: term != "Group Var")
    return records


def _coefficients(fit: object, domain: str, hypothesis: str, n: int, keep) -> list[dict[str, object]]:
    params, bse, tvalues, pvalues = fit.params, fit.bse, fit.tvalues, fit.pvalues  # type: ignore[attr-defined]
    ci = fit.conf_int()  # type: ignore[attr-defined]
    return [{"domain": domain, "hypothesis": hypothesis, "method": "all", "task": "all tasks", "n": n,
             "term": _term_name(term), "test": "OLS, task fixed effect" if hypothesis == "regression_ols"
             else "linear mixed model, task random intercept", "estimate": float(params[term]),
             "std_error": float(bse[term]), "statistic": float(tvalues[term]), "p_value": float(pvalues[term]),
             "ci_low": float(ci.loc[term, 0]), "ci_high": float(ci.loc[term, 1])}
            for term in params.index if keep(term)]


def _term_name(term: str) -> str:
    match = re.search(r"\[T\.(.+)\]$", term)
    return f"method={match.group(1)}" if term.startswith("C(method") and match else term


# --------------------------------------------------------------------------------------------------------------
# Per-item tests
# --------------------------------------------------------------------------------------------------------------


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool], exact: bool | None = None) -> dict[str, float]:
    """McNemar's test on paired per-item correctness (statsmodels). ``exact`` defaults to the binomial test when
    there are fewer than 25 discordant items, the chi-square with continuity correction otherwise."""
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

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
    every KD row, McNemar and a paired bootstrap against the same student's SFT row on the shared items."""
    records = []
    sft = items[items["Method"] == "SFT"]
    for (teacher, student, label, task), kd in items[items["Method"] != "SFT"].groupby(
            ["Teacher", "Student", "Method", "task"], sort=False):
        parsed = kd_method(label)
        base = sft[(sft["Student"] == student) & (sft["task"] == task)]
        paired = kd.merge(base[["item", "correct"]], on="item", suffixes=("_kd", "_sft"))
        if parsed is None or paired.empty:
            continue
        test = mcnemar(paired["correct_sft"], paired["correct_kd"])
        boot = paired_bootstrap(paired["correct_sft"], paired["correct_kd"], seed=seed)
        records.append({"domain": task_domain(str(task)), "hypothesis": "kd_vs_sft_items", "method": parsed[0],
                        "task": task, "teacher": teacher_name(teacher), "student": student, "row": label,
                        "n": test["n"], "test": "McNemar", "statistic": test["statistic"],
                        "p_value": test["p_value"], "kd_only_correct": test["only_b"],
                        "sft_only_correct": test["only_a"], "accuracy_difference": boot["difference"],
                        "boot_ci_low": boot["ci_low"], "boot_ci_high": boot["ci_high"]})
    return records


# --------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------

STUDY_HYPOTHESES = ("kd_beats_sft", "methods_differ", *CORRELATES)
HYPOTHESIS_TITLES = {
    "kd_beats_sft": "KD > SFT: one-sided t (p)",
    "methods_differ": "Methods differ: ANOVA F (p)",
    "teacher_score": "Improvement vs teacher SFT score: Spearman rho (p)",
    "student_size": "Improvement vs student size: Spearman rho (p)",
    "student_sft": "Improvement vs student SFT score: Spearman rho (p)",
    "agreement": "Improvement vs agreement: Spearman rho (p)",
    "fidelity": "Improvement vs fidelity: Spearman rho (p)",
}


def json_ready(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """NaN -> None so the JSON is standard."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in records]


def study_table(records: list[dict[str, object]], domain: str, hypothesis: str) -> pd.DataFrame:
    """The notebooks' layout: one row per method group, one column per task, cells ``stat (p)``."""
    chosen = [r for r in records if r["domain"] == domain and r["hypothesis"] == hypothesis]
    if not chosen:
        return pd.DataFrame()
    tasks = list(dict.fromkeys(str(r["task"]) for r in chosen))
    rows = []
    for method in METHOD_GROUPS:
        cells = {str(r["task"]): f"{float(r['statistic']):.2f} ({_p(float(r['p_value']))})"
                 for r in chosen if r["method"] == method}
        if cells:
            rows.append({"method": method, **{t: cells.get(t, "") for t in tasks}})
    return pd.DataFrame(rows)


def effect_table(records: list[dict[str, object]], domain: str) -> pd.DataFrame:
    """KD > SFT with what the study lacked: mean gain and bootstrap CI, d_z and CI, Wilcoxon, adjusted p."""
    rows = [{"method": r["method"], "task": r["task"], "n": r["n"],
             "mean gain [95% boot CI]": f"{r['mean']:.2f} [{r['boot_ci_low']:.2f}, {r['boot_ci_high']:.2f}]",
             "d_z [95% CI]": f"{r['cohens_dz']:.2f} [{r['dz_ci_low']:.2f}, {r['dz_ci_high']:.2f}]",
             "t": f"{r['statistic']:.2f}", "p": _p(float(r["p_value"])), "p Holm": _p(float(r["p_holm"])),
             "p BH": _p(float(r["p_bh"])), "Wilcoxon p": _p(float(r["wilcoxon_p"]))}
            for r in records if r["domain"] == domain and r["hypothesis"] == "kd_beats_sft"]
    return pd.DataFrame(rows)


def regression_table(records: list[dict[str, object]], domain: str) -> pd.DataFrame:
    rows = [{"model": r["test"], "term": r["term"], "estimate": f"{r['estimate']:.3f}",
             "95% CI": f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", "p": _p(float(r["p_value"])), "n": r["n"]}
            for r in records if r["domain"] == domain and str(r["hypothesis"]).startswith("regression")]
    return pd.DataFrame(rows)


def _p(p: float) -> str:
    if math.isnan(p):
        return "-"
    return f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    if df.empty:
        return "_none_\n"
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def markdown_report(records: list[dict[str, object]]) -> str:
    """Markdown tables like the study's notebooks, then effect sizes, adjusted p-values and the regression."""
    parts = ["# kdscope statistics\n",
             "Cells are `statistic (p)` as in the study's notebooks; p-values unadjusted there, Holm and "
             "Benjamini-Hochberg within each (domain, hypothesis, method) family in the effect tables.\n"]
    for domain in dict.fromkeys(str(r["domain"]) for r in records if r["hypothesis"] in STUDY_HYPOTHESES):
        parts.append(f"\n## {domain}\n")
        for hypothesis in STUDY_HYPOTHESES:
            table = study_table(records, domain, hypothesis)
            if not table.empty:
                parts += [f"\n### {HYPOTHESIS_TITLES[hypothesis]}\n\n", markdown_table(table)]
        parts += ["\n### KD > SFT: effect sizes and adjusted p-values\n\n",
                  markdown_table(effect_table(records, domain))]
        parts += ["\n### Regression of improvement\n\n", markdown_table(regression_table(records, domain))]
    return "".join(parts)


def headline(records: list[dict[str, object]]) -> list[str]:
    """One line per domain and study hypothesis, pooled over methods, for the Average column."""
    lines = []
    for r in records:
        if r["method"] == "all" and r["task"] == AVERAGE and r["hypothesis"] in STUDY_HYPOTHESES:
            lines.append(f"{r['domain']:<12} {r['hypothesis']:<15} n={r['n']:<3} statistic={float(r['statistic']):7.2f}"
                         f"  p={float(r['p_value']):.2g}  p_holm={float(r['p_holm']):.2g}")
    return lines
