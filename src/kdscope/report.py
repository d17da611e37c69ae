"""One self-contained HTML report (plots embedded as base64 PNG, no scripts, no server) and its Markdown twin
(plots as PNG files in ``<name>_files/`` beside it).

The study orchestrator calls :func:`render_report` with a DataFrame in the study CSV layout."""

from __future__ import annotations

import base64
import html
import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from . import __version__
from .plots import JOINT_PARTS, figures, png_bytes
from .stats import (AVERAGE, HYPOTHESIS_TITLES, SEED_COLUMN, STUDY_HYPOTHESES, Analysis, domain_columns,
                    effect_table, markdown_table, regression_table, run_analysis, seed_summary, study_table)

JOINT_COLUMNS = ("Teacher", "Student", "Method", "task", *JOINT_PARTS)
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px;background:#fff}
h1{font-size:1.6rem;margin:.2em 0}
h2{font-size:1.25rem;margin-top:2em;border-bottom:1px solid #dde1e6;padding-bottom:4px}
h3{font-size:1.02rem;margin-top:1.4em}p,li{line-height:1.45}.meta{color:#5b6675;font-size:.88rem}
.scroll{overflow-x:auto;margin:.6em 0}table{border-collapse:collapse;font-size:.8rem;white-space:nowrap}
th,td{border:1px solid #dde1e6;padding:3px 7px;text-align:right}th{background:#eef1f5;position:sticky;top:0}
td:first-child,th:first-child{text-align:left}tr:nth-child(even) td{background:#fafbfc}
figure{margin:1em 0 1.6em}figure img{max-width:100%;height:auto;border:1px solid #e4e7eb}
figcaption{font-size:.85rem;color:#5b6675;margin-top:4px}.missing{background:#fff6e0;border:1px solid #f0d48a;
padding:10px 14px;border-radius:4px}details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
.sig{font-weight:600;color:#0b6b2f}nav a{margin-right:14px;font-size:.9rem}
"""


def render_report(results_df: pd.DataFrame, out_path: Path | str, agreement: pd.DataFrame | None = None,
                  fidelity: pd.DataFrame | None = None, joint: pd.DataFrame | None = None,
                  title: str = "kdscope report", seed: int = 0, items: pd.DataFrame | None = None) -> Path:
    """Write ``out_path`` (HTML) and ``out_path`` with suffix .md; returns the HTML path."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    analysis = run_analysis(results_df, agreement, fidelity, seed, items)
    plots = [(key, caption, png_bytes(fig) if fig is not None else None, missing)
             for key, caption, fig, missing in figures(results_df, analysis.configs, joint)]
    sections = _sections(results_df, analysis)
    out.write_text(_html(title, sections, plots), encoding="utf-8")
    _write_markdown(out.with_suffix(".md"), title, sections, plots)
    return out


# A section is (heading, intro text, [(table title, DataFrame)]); HTML and Markdown render the same sections.
Section = tuple[str, str, list[tuple[str, pd.DataFrame]]]


def _sections(results: pd.DataFrame, analysis: Analysis) -> list[Section]:
    records = analysis.records
    domains = list(analysis.configs)
    out: list[Section] = [(
        "Headline tests",
        "Pooled over methods, Average column. Holm/BH adjust within each (domain, hypothesis, method) family of "
        "task columns; Average, computed from those columns, is adjusted on its own. Effect: Cohen's d_z for KD > SFT, Spearman rho for correlations, eta² for the ANOVA; "
        "[95% CI].",
        [("", _headline_table(records))])]
    for domain in domains:
        tables = [(HYPOTHESIS_TITLES[h], study_table(records, domain, h)) for h in STUDY_HYPOTHESES]
        tables.append(("KD > SFT: mean gain, effect size, adjusted p-values, Wilcoxon", effect_table(records, domain)))
        tables.append(("Regression of per-task improvement on log(student size), teacher score and method",
                       regression_table(records, domain)))
        out.append((f"Hypothesis tests: {domain}", "Cells are `statistic (p)`, unadjusted, as in the study's "
                    "notebooks; rows are methods pooled (all) and per method.", [t for t in tables if not t[1].empty]))
    items = [r for r in records if r["hypothesis"] == "kd_vs_sft_items"]
    if items:
        out.append(("Paired per-item tests (KD vs SFT)", "McNemar on the items both were scored on; accuracy "
                    "difference KD - SFT with a paired bootstrap 95% CI.", [("", _item_table(items))]))
    for domain in domains:
        out.append((f"Results: {domain}", "KD score = maximum over temperatures per task column; gain = KD - the "
                    "student's SFT score.", [("Best KD vs SFT per configuration (Average)",
                                                _config_table(analysis.configs[domain])),
                                               ("All rows as given", _raw_table(results, domain))]))
    if SEED_COLUMN in results.columns:
        out.append(("Seeds", "Mean and Student-t 95% CI over seeds.",
                    [("", seed_summary(results).round(2))]))
    return out


def _fmt(value: object, digits: int = 2) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.2g}" if 0 < abs(value) < 0.01 else f"{value:.{digits}f}"
    return str(value)


def _headline_table(records: list[dict[str, object]]) -> pd.DataFrame:
    rows = []
    for r in records:
        if r["method"] != "all" or r["task"] != AVERAGE or r["hypothesis"] not in STUDY_HYPOTHESES:
            continue
        if r["hypothesis"] == "kd_beats_sft":
            effect = f"d_z {_fmt(r['cohens_dz'])} [{_fmt(r['dz_ci_low'])}, {_fmt(r['dz_ci_high'])}]; " \
                     f"mean {_fmt(r['mean'])} [{_fmt(r['boot_ci_low'])}, {_fmt(r['boot_ci_high'])}]"
            robust = f"Wilcoxon p {_fmt(float(r['wilcoxon_p']))}"
        elif r["hypothesis"] == "methods_differ":
            effect = f"eta² {_fmt(r['eta_squared'])}"
            robust = f"Kruskal p {_fmt(float(r['kruskal_p']))}"
        else:
            effect = f"rho {_fmt(r['statistic'])} [{_fmt(r['rho_ci_low'])}, {_fmt(r['rho_ci_high'])}]"
            robust = ""
        rows.append({"domain": r["domain"], "hypothesis": r["hypothesis"], "test": r["test"], "n": r["n"],
                     "statistic": _fmt(r["statistic"]), "p": _fmt(float(r["p_value"])),
                     "p Holm": _fmt(float(r["p_holm"])), "p BH": _fmt(float(r["p_bh"])), "effect [95% CI]": effect,
                     "robustness": robust})
    return pd.DataFrame(rows)


def _item_table(items: list[dict[str, object]]) -> pd.DataFrame:
    return pd.DataFrame([{"teacher": r["teacher"], "student": r["student"], "row": r["row"], "task": r["task"],
                          "n": r["n"], "KD - SFT (pts)": _fmt(r["accuracy_difference"]),
                          "95% CI": f"[{_fmt(r['boot_ci_low'])}, {_fmt(r['boot_ci_high'])}]",
                          "McNemar p": _fmt(float(r["p_value"])), "p Holm": _fmt(float(r["p_holm"]))}
                         for r in items])


def _config_table(configs: pd.DataFrame) -> pd.DataFrame:
    average = configs[configs["task"] == AVERAGE]
    table = average[["Teacher", "Student", "method", "kd_row", "student_sft", "kd", "improvement", "teacher_score"]]
    return table.rename(columns={"kd_row": "best row", "student_sft": "SFT", "kd": "best KD", "improvement": "gain",
                                 "teacher_score": "teacher SFT"}).map(_fmt)


def _raw_table(results: pd.DataFrame, domain: str) -> pd.DataFrame:
    columns = domain_columns(results)[domain]
    rows = results[results[columns].notna().any(axis=1)]
    keep = ["Teacher", "Student", "Method", *([SEED_COLUMN] if SEED_COLUMN in rows else []), *columns,
            *([AVERAGE] if AVERAGE in rows else [])]
    return rows[keep].map(_fmt)


def _html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html(title: str, sections: list[Section], plots: list[tuple[str, str, bytes | None, str]]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}"
             f"</title><style>{CSS}</style></head><body><main><h1>{html.escape(title)}</h1>"
             f"<p class='meta'>kdscope {__version__} · {stamp}</p>"
             "<nav><a href='#plots'>Plots</a>" +
             "".join(f"<a href='#s{i}'>{html.escape(s[0])}</a>" for i, s in enumerate(sections)) + "</nav>"]
    for i, (heading, intro, tables) in enumerate(sections[:1]):
        parts.append(_html_section(i, heading, intro, tables, collapsed=False))
    parts.append("<h2 id='plots'>Plots</h2>")
    for key, caption, png, missing in plots:
        if png is None:
            parts.append(f"<figure id='{key}'><p class='missing'><b>{html.escape(caption)}:</b> not shown, "
                         f"{html.escape(missing)}.</p></figure>")
        else:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<figure id='{key}'><img class='plot' alt='{html.escape(caption)}' "
                         f"src='data:image/png;base64,{data}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    for i, (heading, intro, tables) in enumerate(sections[1:], start=1):
        parts.append(_html_section(i, heading, intro, tables, collapsed=heading.startswith("Results")))
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _html_section(index: int, heading: str, intro: str, tables: list[tuple[str, pd.DataFrame]],
                  collapsed: bool) -> str:
    out = [f"<h2 id='s{index}'>{html.escape(heading)}</h2><p>{html.escape(intro)}</p>"]
    for name, table in tables:
        body = _html_table(table)
        if collapsed or len(table) > 40:
            summary = f"{html.escape(name or heading)} ({len(table)} rows)"
            out.append(f"<details><summary>{summary}</summary>{body}</details>")
        else:
            out.append((f"<h3>{html.escape(name)}</h3>" if name else "") + body)
    return "\n".join(out)


def _write_markdown(path: Path, title: str, sections: list[Section],
                    plots: list[tuple[str, str, bytes | None, str]]) -> None:
    folder = path.with_name(f"{path.stem}_files")
    folder.mkdir(exist_ok=True)
    lines = [f"# {title}\n", f"kdscope {__version__}\n"]
    for heading, intro, tables in sections[:1]:
        lines += _md_section(heading, intro, tables)
    lines.append("\n## Plots\n")
    for key, caption, png, missing in plots:
        if png is None:
            lines.append(f"\n**{caption}:** not shown, {missing}.\n")
        else:
            (folder / f"{key}.png").write_bytes(png)
            lines.append(f"\n### {caption}\n\n![{caption}]({folder.name}/{key}.png)\n")
    for heading, intro, tables in sections[1:]:
        lines += _md_section(heading, intro, tables)
    path.write_text("".join(lines), encoding="utf-8")


def _md_section(heading: str, intro: str, tables: list[tuple[str, pd.DataFrame]]) -> list[str]:
    lines = [f"\n## {heading}\n\n{intro}\n"]
    for name, table in tables:
        lines += ([f"\n### {name}\n"] if name else []) + ["\n", markdown_table(table)]
    return lines
