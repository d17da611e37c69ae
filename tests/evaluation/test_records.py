"""Summary rows in the study's layout, and the `kdscope eval` command end to end."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from kdscope.cli import app
from kdscope.evaluation import summary_row


def test_summary_row_uses_the_study_layout() -> None:
    summaries = [{"task": "gsm8k", "accuracy": 0.5}, {"task": "svamp", "accuracy": 0.25}, {"task": "aqua", "accuracy": 0.123456}]
    row = summary_row(summaries, student="Qwen2.5-0.5B", teacher="Qwen2.5-7B", method="KD")
    assert list(row) == ["Teacher", "Student", "Method", "gsm8k", "SVAMP", "AQuA", "Average"]
    assert row["AQuA"] == 12.35 and row["Average"] == round((50 + 25 + 12.3456) / 3, 2)


def test_cli_eval_generate_and_loglik(shared_data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    data = str(shared_data / "dataset")
    out = tmp_path / "run"
    base = ["eval", "--model", "builtin:tiny-qwen-xs", "--data", data, "--limit", "3", "--out", str(out), "--quiet"]
    result = runner.invoke(app, [*base, "--tasks", "gsm8k,SVAMP", "--max-new-tokens", "4", "--method", "SFT"])
    assert result.exit_code == 0, result.output
    assert len((out / "gsm8k.jsonl").read_text().splitlines()) == 3
    assert "cleaned parse" in result.output  # generative runs also report the cleaned parse's accuracy
    result = runner.invoke(app, [*base, "--tasks", "ARC-Easy,boolq", "--mode", "loglik", "--out", str(tmp_path / "ll")])
    assert result.exit_code == 0, result.output
    header = (tmp_path / "ll" / "summary.csv").read_text().splitlines()[0]
    assert header == "Teacher,Student,Method,ARC-Easy,boolq,Average"
    bad = runner.invoke(app, [*base, "--tasks", "gsm8k", "--mode", "beam"])
    assert bad.exit_code == 2 and "error: --mode" in bad.output
