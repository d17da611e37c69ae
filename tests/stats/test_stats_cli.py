"""`kdscope stats` on bad input: one line naming the file, row or option and the fix, exit code 2."""

from __future__ import annotations

from pathlib import Path

from stats_helpers import toy_table
from typer.testing import CliRunner

from kdscope.cli import app


def test_cli_bad_cell_names_file_row_and_column(tmp_path: Path) -> None:
    bad = toy_table()
    bad["gsm8k"] = bad["gsm8k"].astype(object)
    bad.loc[2, "gsm8k"] = "n/a%"
    path = tmp_path / "bad.csv"
    bad.to_csv(path, index=False)
    result = CliRunner().invoke(app, ["stats", str(path)])
    assert result.exit_code == 2
    message = result.output.strip()
    assert "\n" not in message and "bad.csv row 4" in message and "'gsm8k'" in message and "number" in message


def test_cli_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "nomethod.csv"
    toy_table().drop(columns="Method").to_csv(path, index=False)
    result = CliRunner().invoke(app, ["stats", str(path)])
    assert result.exit_code == 2 and "Method" in result.output


def _one_line_exit_2(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    message = result.output.strip()
    assert result.exit_code == 2, result.output
    assert message and "\n" not in message and "Traceback" not in message
    return message


def test_cli_header_only(tmp_path: Path) -> None:
    """Issue 13: a header-only table printed a blank line and wrote []."""
    path = tmp_path / "empty.csv"
    toy_table().head(0).to_csv(path, index=False)
    out = tmp_path / "stats.json"
    message = _one_line_exit_2(["stats", str(path), "--json", str(out)])
    assert "empty.csv" in message and "no rows" in message and not out.exists()


def test_cli_no_sft_rows(tmp_path: Path) -> None:
    table = toy_table()
    path = tmp_path / "nosft.csv"
    table[table["Method"] != "SFT"].to_csv(path, index=False)
    message = _one_line_exit_2(["stats", str(path)])
    assert "nosft.csv" in message and "no SFT rows" in message and "add" in message


def test_cli_no_kd_student_with_its_own_sft_row(tmp_path: Path) -> None:
    table = toy_table()
    table.loc[table["Method"] == "SFT", "Student"] = table.loc[table["Method"] == "SFT", "Student"] + "-base"
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    table.iloc[:3].to_csv(first, index=False)
    table.iloc[3:].to_csv(second, index=False)
    message = _one_line_exit_2(["stats", str(first), str(second)])
    assert "a.csv" in message and "b.csv" in message and "SFT row" in message


def test_cli_no_kd_rows(tmp_path: Path) -> None:
    table = toy_table()
    path = tmp_path / "sftonly.csv"
    table[table["Method"] == "SFT"].to_csv(path, index=False)
    message = _one_line_exit_2(["stats", str(path)])
    assert "sftonly.csv" in message and "no KD student rows" in message


def test_cli_json_naming_a_folder(tmp_path: Path) -> None:
    """Issue 13: `stats --json FOLDER` raised IsADirectoryError with a traceback."""
    path = tmp_path / "results.csv"
    toy_table().to_csv(path, index=False)
    message = _one_line_exit_2(["stats", str(path), "--json", str(tmp_path)])
    assert "--json" in message and str(tmp_path) in message and "folder" in message
    message = _one_line_exit_2(["stats", str(path), "--markdown", str(tmp_path)])
    assert "--markdown" in message and "folder" in message


def test_cli_bad_kd_method_cell(tmp_path: Path) -> None:
    table = toy_table().assign(KDMethod="", Temperature=float("nan"), Ablation="")
    table.loc[5, "KDMethod"] = "DistilKD"
    path = tmp_path / "typed.csv"
    table.to_csv(path, index=False)
    message = _one_line_exit_2(["stats", str(path)])
    assert "typed.csv row 7" in message and "'KDMethod'" in message and "DistilKD" in message
