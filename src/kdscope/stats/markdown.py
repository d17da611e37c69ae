"""The analysis as text: JSON-ready records, the notebooks' tables in Markdown, and the headline lines."""

from __future__ import annotations

import math

import pandas as pd

from .hypotheses import CORRELATES, METHOD_GROUPS
from .tables import AVERAGE

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
    for method in [*METHOD_GROUPS, *dict.fromkeys(str(r["method"]) for r in chosen if r["method"] not in METHOD_GROUPS)]:
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
    """Coefficients with CI and p; a term the design cannot identify says so and names its collinear terms."""
    rows = []
    for r in records:
        if r["domain"] != domain or not str(r["hypothesis"]).startswith("regression"):
            continue
        if r.get("identifiable", True) is False:
            rows.append({"model": r["test"], "term": r["term"],
                         "estimate": f"not identifiable (collinear with {r['collinear_with']})", "95% CI": "-",
                         "p": "-", "n": r["n"]})
        else:
            rows.append({"model": r["test"], "term": r["term"], "estimate": f"{r['estimate']:.3f}",
                         "95% CI": f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", "p": _p(float(r["p_value"])),
                         "n": r["n"]})
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
             "Benjamini-Hochberg within each (domain, hypothesis, method) family of task columns in the effect "
             "tables (Average, computed from those columns, is adjusted on its own).\n"]
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
