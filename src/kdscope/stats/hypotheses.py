"""The study's tests (study.md section 5: one-sided t, one-way ANOVA, Spearman) with what it lacked: effect sizes
with confidence intervals, robustness tests, and Holm / Benjamini-Hochberg adjustment within families."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import optimize, stats

from ..labels import KD_METHODS
from .seeds import CONFIDENCE
from .tables import AVERAGE

METHOD_GROUPS = ("all", *KD_METHODS)
CROSS_ALL = "all cross-tokenizer"  # cross-family pairs' methods pooled (never with the same-family "all")
CORRELATES = ("teacher_score", "student_size", "student_sft", "agreement", "fidelity")
N_BOOT = 10_000


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


def method_groups(configs: pd.DataFrame) -> list[str]:
    """The groups tests run in: "all" (the same-family methods pooled), each method, then each cross-tokenizer
    method (``SeqKD/xtok_kl``, kdscope.stats.tables.analysis_method) and, with more than one, CROSS_ALL pooling them."""
    cross = sorted(m for m in configs["method"].unique() if m not in KD_METHODS)
    return [*METHOD_GROUPS, *cross, *([CROSS_ALL] if len(cross) > 1 else [])]


def _group(by_task: pd.DataFrame, method: str) -> pd.DataFrame:
    if method == "all":
        return by_task[by_task["method"].isin(KD_METHODS)]
    if method == CROSS_ALL:
        return by_task[~by_task["method"].isin(KD_METHODS)]
    return by_task[by_task["method"] == method]


def hypothesis_records(configs: pd.DataFrame, seed: int) -> list[dict[str, object]]:
    """Every study test for one domain, per task (and Average), pooled over methods and per method."""
    records: list[dict[str, object]] = []
    domain = str(configs["domain"].iloc[0])
    groups_tested = method_groups(configs)
    for task, by_task in configs.groupby("task", sort=False):
        for method in groups_tested:
            subset = _group(by_task, method)
            if len(subset) < 2:
                continue
            base = {"domain": domain, "method": method, "task": task}
            imp = subset["improvement"].to_numpy(float)
            records.append({**base, "hypothesis": "kd_beats_sft", "n": len(imp), **kd_beats_sft(imp, seed)})
            for name in CORRELATES:
                pairs = subset[["improvement", name]].dropna()
                # a rank correlation needs variation on both sides; without it there is nothing to test
                if len(pairs) >= 3 and pairs[name].nunique() > 1 and pairs["improvement"].nunique() > 1:
                    records.append({**base, "hypothesis": name, "n": len(pairs),
                                    **correlation(pairs["improvement"].to_numpy(), pairs[name].to_numpy())})
        groups = {m: by_task.loc[by_task["method"] == m, "improvement"].to_numpy(float) for m in KD_METHODS}
        if all(len(g) >= 2 for g in groups.values()):
            records.append({"domain": domain, "method": "all", "task": task, "hypothesis": "methods_differ",
                            "n": sum(len(g) for g in groups.values()), **methods_differ(groups)})
    return records


def family_key(record: dict[str, object]) -> tuple[object, ...]:
    """The family a test is adjusted in: one (domain, hypothesis, method) over its task columns. ``Average`` is
    computed from those columns, so it is not another test of the family: it forms a family of its own."""
    return (record["domain"], record["hypothesis"], record["method"], record.get("task") == AVERAGE)


def holm_adjust(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values, as statsmodels' ``multipletests(method="holm")`` computes them (which
    runs a full garbage collection on every call: 0.2 s each in a process holding torch)."""
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(np.maximum.accumulate(p[order] * np.arange(m, 0, -1)), 1.0)
    return adjusted


def adjust_within_families(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """Holm and Benjamini-Hochberg adjusted p-values within each family (see :func:`family_key`)."""
    from statsmodels.stats.multitest import multipletests  # slow to import; here only when used

    families: dict[tuple[object, ...], list[dict[str, object]]] = {}
    for record in records:
        if "p_value" in record:
            families.setdefault(family_key(record), []).append(record)
    for family in families.values():
        tested = [r for r in family if not math.isnan(float(r["p_value"]))]  # type: ignore[arg-type]
        for r in family:
            r["family_size"], r["p_holm"], r["p_bh"] = len(tested), math.nan, math.nan
        if not tested:
            continue
        p = np.array([float(r["p_value"]) for r in tested])  # type: ignore[arg-type]
        holm = holm_adjust(p)
        bh = multipletests(p, method="fdr_bh")[1]
        for r, h, b in zip(tested, holm, bh):
            r["p_holm"], r["p_bh"] = float(h), float(b)
    return records
