"""`kdscope report`: one self-contained HTML page with every plot present and not blank, checked on the decoded
images and on a headless-Chromium screenshot of the page; the Markdown twin beside it."""

from __future__ import annotations

import base64
import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import require
from kdscope.cli import app
from kdscope.report import render_report

CHROMIUM = Path("/usr/bin/chromium")
PLOT_IDS = ("gain-vs-size", "accuracy-vs-temperature", "gain-vs-fidelity", "gain-vs-agreement", "gain-vs-teacher",
            "task-heatmap", "joint-correctness")
EMBEDDED_PNG = re.compile(r"<figure id='([\w-]+)'><img class='plot' alt='[^']*' src='data:image/png;base64,([^']+)'")


def joint_table() -> pd.DataFrame:
    """A small joint-correctness table in the layout `--joint` takes (counts per category)."""
    return pd.DataFrame([
        {"Teacher": "Qwen2.5-7B", "Student": "Qwen2.5-0.5B", "Method": "SFT", "task": "gsm8k", "both": 300,
         "teacher_only": 500, "student_only": 60, "neither": 459},
        {"Teacher": "Qwen2.5-7B", "Student": "Qwen2.5-0.5B", "Method": "student_KD_temp_2.0", "task": "gsm8k",
         "both": 380, "teacher_only": 420, "student_only": 70, "neither": 449},
    ])


@pytest.fixture(scope="module")
def report(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of both domains, through the CLI, with agreement, fidelity and joint tables."""
    results = shared_data / "results"
    out = tmp_path_factory.mktemp("report") / "report.html"
    joint = out.with_name("joint.csv")
    joint_table().to_csv(joint, index=False)
    files = [results / f for f in ("math_results_main.csv", "llama_math_results.csv", "cs_results_main.csv",
                                   "llama_cs_results.csv")]
    args = ["report", *map(str, files), "--out", str(out), "--agreement", str(results / "EM1.csv"), "--agreement",
            str(results / "EM1_cs.csv"), "--fidelity", str(results / "BLEU.csv"), "--joint", str(joint)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def embedded_images(page: str) -> dict[str, np.ndarray]:
    return {key: np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), dtype=float)
            for key, data in EMBEDDED_PNG.findall(page)}


def assert_not_blank(pixels: np.ndarray, what: str) -> None:
    """A blank image is one colour; a plot has many pixels that differ clearly from the background."""
    background = np.median(pixels.reshape(-1, 3), axis=0)
    inked = (np.abs(pixels - background).sum(axis=2) > 60).mean()
    assert pixels.std() > 10 and inked > 0.02, f"{what} looks blank (std {pixels.std():.1f}, inked {inked:.3f})"


def test_every_plot_is_embedded_and_not_blank(report: Path) -> None:
    page = report.read_text()
    images = embedded_images(page)
    assert tuple(images) == PLOT_IDS
    for key, pixels in images.items():
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400, key
        assert_not_blank(pixels, key)
    # self-contained: nothing loaded from elsewhere
    assert not re.search(r"(src|href)=['\"](https?:|//|file:)", page)
    for heading in ("Headline tests", "Hypothesis tests: math", "Hypothesis tests: commonsense", "Results: math"):
        assert heading in page
    assert "p Holm" in page and "d_z" in page


def test_markdown_twin_references_existing_images(report: Path) -> None:
    markdown = report.with_suffix(".md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", markdown)
    assert len(links) == len(PLOT_IDS)
    for link in links:
        assert_not_blank(np.asarray(Image.open(report.parent / link).convert("RGB"), dtype=float), link)
    assert "| math | kd_beats_sft |" in markdown


def test_chromium_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    require(CHROMIUM.exists(), f"{CHROMIUM} is missing: install it with `apt-get install -y chromium`")
    shot = tmp_path / "page.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--screenshot={shot}",
                    "--window-size=1280,4000", report.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.shape[:2] == (4000, 1280)
    assert_not_blank(pixels, "page screenshot")
    # The plots start within the first screens: the band below the headline table must hold plot ink too.
    assert_not_blank(pixels[800:2400], "page screenshot, plot band")


def test_missing_side_tables_are_said_on_the_page(tmp_path: Path) -> None:
    """Without agreement, fidelity or joint tables the page says what is missing instead of drawing empty plots;
    unknown method rows (kdscope ablations) are shown in the tables but left out of the tests."""
    rows = [{"Teacher": "-", "Student": s, "Method": "SFT", "gsm8k": 30.0 + 10 * i, "SVAMP": 40.0 + 10 * i}
            for i, s in enumerate(["M-0.5B", "M-1.5B", "M-7B"])]
    gains = iter(np.linspace(-1, 6, 40))
    for teacher, student in [("M-7B", "M-0.5B"), ("M-7B", "M-1.5B"), ("M-1.5B", "M-0.5B")]:
        sft = next(r for r in rows if r["Student"] == student)
        for label in ("KD", "RevKD", "GKD"):
            for temp in (1.0, 2.0):
                gain = next(gains)
                rows.append({"Teacher": teacher, "Student": student, "Method": f"student_{label}_temp_{temp}",
                             "gsm8k": sft["gsm8k"] + gain, "SVAMP": sft["SVAMP"] + gain / 2})
    rows.append({"Teacher": "M-7B", "Student": "M-0.5B", "Method": "student_KD_noise_5.0_temp_1.0", "gsm8k": 3.0,
                 "SVAMP": 4.0})
    table = pd.DataFrame(rows)
    table["Average"] = table[["gsm8k", "SVAMP"]].mean(axis=1)
    out = render_report(table, tmp_path / "small.html", title="small study")
    page = out.read_text()
    assert set(embedded_images(page)) == {"gain-vs-size", "accuracy-vs-temperature", "gain-vs-teacher",
                                          "task-heatmap"}
    for missing in ("no fidelity table given", "no agreement table given", "no per-item or joint-correctness"):
        assert missing in page
    assert "student_KD_noise_5.0_temp_1.0" in page
    assert "small study" in page and out.with_suffix(".md").exists()


def _one_teacher_table(labels: bool = True) -> pd.DataFrame:
    """Built-in-sized students of one teacher; ``labels=False`` writes opaque Method labels and the real columns."""
    rows = [{"Teacher": "-", "Student": s, "Method": "SFT", "gsm8k": 20.0 + 10 * i, "SVAMP": 30.0 + 10 * i}
            for i, s in enumerate(["TinyQwen-35K", "TinyQwen-66K", "TinyQwen-144K", "TinyQwen-657K"])]
    gains = iter(np.random.default_rng(0).normal(2, 2, 60))
    for student in ("TinyQwen-35K", "TinyQwen-66K", "TinyQwen-144K"):
        sft = next(r for r in rows if r["Student"] == student)
        for method, stem in (("SeqKD", "KD"), ("RevKD", "RevKD"), ("GKD", "GKD")):
            for temp in ((1.0, 2.0) if method != "GKD" else (1.0,)):
                gain = next(gains)
                rows.append({"Teacher": "TinyQwen-657K", "Student": student,
                             "Method": f"student_{stem}_temp_{temp}" if labels else f"job-{len(rows)}",
                             "KDMethod": method, "Temperature": temp if method != "GKD" else np.nan, "Ablation": "",
                             "gsm8k": sft["gsm8k"] + gain, "SVAMP": sft["SVAMP"] + next(gains)})
    table = pd.DataFrame(rows)
    table["Average"] = table[["gsm8k", "SVAMP"]].mean(axis=1)
    return table if not labels else table.drop(columns=["KDMethod", "Temperature", "Ablation"])


def test_student_sizes_are_written_in_human_units() -> None:
    """Issue 13: the size axis read 3.5e-05B for the built-in models."""
    from kdscope.plots import gain_vs_size
    from kdscope.stats import run_analysis

    fig = gain_vs_size(run_analysis(_one_teacher_table()).configs)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["35K", "66K", "144K"]


def test_plots_read_the_real_columns() -> None:
    """Issue 14 item 5: rows of kdscope's own tables are described by KDMethod/Temperature, not by their label."""
    from kdscope.plots import accuracy_vs_temperature

    fig = accuracy_vs_temperature(_one_teacher_table(labels=False))
    assert fig is not None
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["GKD (mean)", "RevKD (mean)", "SeqKD (mean)"]


def test_unidentifiable_regression_terms_are_said_and_no_warning_escapes(tmp_path: Path) -> None:
    """One teacher: its score is a function of the task, so the regression cannot identify it (issue 13)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        page = render_report(_one_teacher_table(), tmp_path / "one.html").read_text()
    assert [f"{w.filename}: {w.message}" for w in caught] == []
    assert "not identifiable (collinear with" in page and "teacher_score" in page


def test_report_of_a_folder_goes_through_the_study_store(tmp_path: Path) -> None:
    """`kdscope report FOLDER` imported report_from_store from a module that no longer has it (a traceback)."""
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "study.sqlite").write_bytes(b"")
    result = CliRunner().invoke(app, ["report", str(folder), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2 and "no study.json" in result.output and "\n" not in result.output.strip()


def test_report_out_naming_a_folder(tmp_path: Path) -> None:
    table = tmp_path / "results.csv"
    _one_teacher_table().to_csv(table, index=False)
    result = CliRunner().invoke(app, ["report", str(table), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--out" in result.output and "folder" in result.output
