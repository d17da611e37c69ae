"""Figures of the report (matplotlib, Agg backend: no display needed). Each function returns a Figure, or None
when its data is absent, so the report can say so instead of showing an empty plot."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402
from scipy import stats  # noqa: E402

from .labels import KD_METHOD_TABLE, format_size, teacher_name  # noqa: E402
from .stats import AVERAGE, describe_rows, domain_columns  # noqa: E402

METHOD_COLOURS = dict(zip((m.name for m in KD_METHOD_TABLE), ("#1f77b4", "#d62728", "#2ca02c")))
CROSS_FAMILY_COLOUR = "#7f7f7f"  # cross-family units (method "SeqKD/xtok_kl"), one colour: they are not the study's


def _colours(methods: pd.Series) -> list[str]:
    return [METHOD_COLOURS.get(str(m), CROSS_FAMILY_COLOUR) for m in methods]
# GKD ignores the temperature (the study's tables still label it temp_1.0): where a row has none it is drawn at 1.
NO_TEMPERATURE = 1.0
JOINT_PARTS = ("both", "teacher_only", "student_only", "neither")
JOINT_COLOURS = ("#4c9a2a", "#f0a202", "#3a7ca5", "#b0b0b0")
DPI = 110


def png_bytes(fig: Figure) -> bytes:
    """Render and close a figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buffer.getvalue()


def _domain_axes(n: int, height: float = 3.6) -> tuple[Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, n, figsize=(5.4 * n, height), squeeze=False)
    return fig, list(axes[0])


def _method_legend(ax: plt.Axes) -> None:
    """Method colours plus whatever labelled lines the axes already has (e.g. a fit)."""
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=m) for m, c in METHOD_COLOURS.items()]
    ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=8, frameon=False)


def _average_rows(configs: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    return {d: c[c["task"] == AVERAGE] for d, c in configs.items() if (c["task"] == AVERAGE).any()}


def gain_vs_size(configs: dict[str, pd.DataFrame]) -> Figure | None:
    """Average improvement against student size (log scale), with a least-squares fit on log size per domain."""
    rows = {d: r.dropna(subset=["student_size"]) for d, r in _average_rows(configs).items()}
    rows = {d: r for d, r in rows.items() if not r.empty}
    if not rows:
        return None
    fig, axes = _domain_axes(len(rows))
    for ax, (domain, data) in zip(axes, rows.items()):
        jitter = np.random.default_rng(0).uniform(-0.04, 0.04, len(data))  # seeded: methods overlap at one size
        x = np.log(data["student_size"].to_numpy())
        ax.scatter(np.exp(x + jitter), data["improvement"], c=_colours(data["method"]), s=28, alpha=0.85)
        if len(np.unique(x)) > 1:
            fit = stats.linregress(x, data["improvement"])
            grid = np.linspace(x.min(), x.max(), 50)
            ax.plot(np.exp(grid), fit.intercept + fit.slope * grid, color="black", lw=1.5,
                    label=f"fit: {fit.slope:.2f} pts per log(B), R²={fit.rvalue ** 2:.2f}")
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        sizes = sorted(data["student_size"].unique())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(sizes, [format_size(s) for s in sizes])
        ax.set(title=f"{domain}: KD gain vs student size", xlabel="student size", ylabel="gain over SFT (Average, pts)")
        _method_legend(ax)
    return fig


def accuracy_vs_temperature(results: pd.DataFrame) -> Figure | None:
    """Average accuracy of KD students against temperature, one panel per domain; thin lines per teacher->student
    pair, thick lines the mean over pairs, per method."""
    panels = {}
    for domain, columns in domain_columns(results).items():
        rows = results[results[columns].notna().any(axis=1)]
        described = describe_rows(rows)
        plain_kd = (described["kd_method"] != "") & (described["ablation"] == "")
        kd = rows[plain_kd].assign(
            method=described.loc[plain_kd, "kd_method"],
            T=described.loc[plain_kd, "temperature"].fillna(NO_TEMPERATURE),
            pair=lambda d: d["Teacher"].map(teacher_name) + "→" + d["Student"],
            score=lambda d: d[AVERAGE] if AVERAGE in d else d[columns].mean(axis=1))
        if not kd.empty:
            panels[domain] = kd
    if not panels:
        return None
    fig, axes = _domain_axes(len(panels))
    for ax, (domain, kd) in zip(axes, panels.items()):
        for method, by_method in kd.groupby("method"):
            colour = METHOD_COLOURS.get(str(method), "grey")
            for _, line in by_method.groupby("pair"):
                line = line.sort_values("T")
                ax.plot(line["T"], line["score"], color=colour, alpha=0.25, lw=0.8, marker=".")
            mean = by_method.groupby("T")["score"].mean()
            ax.plot(mean.index, mean.values, color=colour, lw=2.4, marker="o", label=f"{method} (mean)")
        temperatures = sorted(kd["T"].unique())
        ax.set_xticks(temperatures)
        ax.set(title=f"{domain}: accuracy vs temperature", xlabel="temperature T", ylabel="Average accuracy (%)")
        ax.legend(fontsize=8, frameon=False)
    return fig


def gain_vs_pair_score(configs: dict[str, pd.DataFrame], score: str, label: str) -> Figure | None:
    """Per-task improvement against agreement or fidelity (one point per configuration and task)."""
    panels = {d: c.dropna(subset=[score]) for d, c in configs.items() if score in c and c[score].notna().any()}
    if not panels:
        return None
    fig, axes = _domain_axes(len(panels))
    for ax, (domain, data) in zip(axes, panels.items()):
        ax.scatter(data[score], data["improvement"], c=_colours(data["method"]), s=18, alpha=0.75)
        rho = stats.spearmanr(data[score], data["improvement"])
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set(title=f"{domain}: gain vs {label}\nSpearman ρ={rho.statistic:.2f} over all task points",
               xlabel=f"teacher-student {label} of the KD student (%)", ylabel="gain over SFT (pts)")
        _method_legend(ax)
    return fig


def gain_vs_teacher(configs: dict[str, pd.DataFrame]) -> Figure | None:
    """Average improvement against the teacher's own SFT Average score."""
    rows = {d: r.dropna(subset=["teacher_score"]) for d, r in _average_rows(configs).items()}
    rows = {d: r for d, r in rows.items() if not r.empty}
    if not rows:
        return None
    fig, axes = _domain_axes(len(rows))
    for ax, (domain, data) in zip(axes, rows.items()):
        ax.scatter(data["teacher_score"], data["improvement"], c=_colours(data["method"]), s=28)
        for teacher, by_teacher in data.groupby("Teacher"):
            ax.annotate(str(teacher), (by_teacher["teacher_score"].iloc[0], by_teacher["improvement"].max()),
                        fontsize=7, xytext=(2, 4), textcoords="offset points")
        ax.axhline(0, color="grey", lw=0.8, ls=":")
        ax.set(title=f"{domain}: gain vs teacher score", xlabel="teacher SFT Average (%)",
               ylabel="gain over SFT (Average, pts)")
        _method_legend(ax)
    return fig


def task_gain_heatmap(configs: dict[str, pd.DataFrame]) -> Figure | None:
    """Improvement per configuration (rows) and task (columns), diverging around zero."""
    tables = {}
    for domain, data in configs.items():
        labels = data["Teacher"] + " → " + data["Student"] + " · " + data["method"]
        table = data.assign(config=labels).pivot_table(index="config", columns="task", values="improvement",
                                                      sort=False)
        tables[domain] = table[[c for c in table.columns if c != AVERAGE] + ([AVERAGE] if AVERAGE in table else [])]
    if not tables:
        return None
    heights = [len(t) * 0.22 + 1.2 for t in tables.values()]
    fig, axes = plt.subplots(len(tables), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (domain, table) in zip(axes[:, 0], tables.items()):
        values = table.to_numpy()
        # Colour limit at the 98th percentile of |gain| so one collapsed run does not wash out the rest.
        limit = float(np.nanpercentile(np.abs(values), 98)) or 1.0
        image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(table.shape[1]), table.columns, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(table.shape[0]), table.index, fontsize=7)
        ax.set_title(f"{domain}: gain over SFT per task (pts; colour clipped at ±{limit:.0f})")
        fig.colorbar(image, ax=ax, shrink=0.8, pad=0.02)
    fig.tight_layout()
    return fig


def joint_correctness_bars(joint: pd.DataFrame | None) -> Figure | None:
    """Stacked shares of items both / only teacher / only student / neither got right, per student row and task.
    ``joint`` columns: Teacher, Student, Method, task, both, teacher_only, student_only, neither (counts)."""
    if joint is None or joint.empty:
        return None
    data = joint.copy()
    data["label"] = data["Teacher"].map(teacher_name) + "→" + data["Student"] + " " + data["Method"].astype(str) + \
        " · " + data["task"].astype(str)
    shares = data[list(JOINT_PARTS)].div(data[list(JOINT_PARTS)].sum(axis=1), axis=0) * 100
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(data) + 1.4))
    left = np.zeros(len(data))
    for part, colour in zip(JOINT_PARTS, JOINT_COLOURS):
        ax.barh(data["label"], shares[part], left=left, color=colour, label=part.replace("_", " "))
        left += shares[part].to_numpy()
    ax.invert_yaxis()
    ax.set(xlabel="share of test items (%)", xlim=(0, 100))
    ax.set_title("Joint correctness of teacher and student", pad=24)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(ncol=4, fontsize=8, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return fig


def figures(results: pd.DataFrame, configs: dict[str, pd.DataFrame],
            joint: pd.DataFrame | None) -> list[tuple[str, str, Figure | None, str]]:
    """(id, title, figure or None, what is missing) for every plot of the report, in page order."""
    return [
        ("gain-vs-size", "Improvement vs student size", gain_vs_size(configs), "no configurations with SFT rows"),
        ("accuracy-vs-temperature", "Accuracy vs temperature per method", accuracy_vs_temperature(results),
         "no KD rows"),
        ("gain-vs-fidelity", "Improvement vs fidelity", gain_vs_pair_score(configs, "fidelity", "fidelity (BLEU)"),
         "no fidelity table given (pass --fidelity BLEU.csv)"),
        ("gain-vs-agreement", "Improvement vs agreement", gain_vs_pair_score(configs, "agreement", "agreement"),
         "no agreement table given (pass --agreement EM1.csv)"),
        ("gain-vs-teacher", "Improvement vs teacher score", gain_vs_teacher(configs), "no teacher SFT rows"),
        ("task-heatmap", "Per-task gains", task_gain_heatmap(configs), "no configurations"),
        ("joint-correctness", "Joint correctness of teacher and student", joint_correctness_bars(joint),
         "no per-item or joint-correctness table given (pass --joint FILE with columns Teacher, Student, Method, "
         "task, both, teacher_only, student_only, neither)"),
    ]

