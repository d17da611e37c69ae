"""Result tables in the study's CSV layout: reading and checking them, their task columns per domain, and what
each row describes (KD method, temperature, ablation), from the real columns when a table has them, else parsed
from the study's row labels.

Layout: ``Teacher, Student, Method``, one column per task, ``Average``; Method values ``BaseModel``, ``SFT``,
``student_{KD|RevKD|GKD}_temp_T``, ``student_KD_base_teacher_temp_T``. kdscope's own tables add ``KDMethod``
(SeqKD/RevKD/GKD or empty), ``Temperature`` (NaN for non-KD rows), ``Ablation`` ("" | "base_teacher" |
"noise_sigma=<s>") and ``Seed``; the study's published CSVs have none of these. Rows of both domains may be
mixed; each domain is analysed separately from the task columns it has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import InputError, where
from ..labels import KD_METHODS, SFT_LABEL, parse_row_label
from ..tasks import get_task

ID_COLUMNS = ("Teacher", "Student", "Method")
AVERAGE = "Average"
SEED_COLUMN = "Seed"
KD_METHOD_COLUMN = "KDMethod"
TEMPERATURE_COLUMN = "Temperature"
ABLATION_COLUMN = "Ablation"
# The typed columns that say what a row is; seed aggregation keeps them, the label parser stands in without them.
DESCRIPTOR_COLUMNS = (KD_METHOD_COLUMN, TEMPERATURE_COLUMN, ABLATION_COLUMN)
ITEM_COLUMNS = ("Teacher", "Student", "Method", "task", "item", "correct")


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


def row_domains(results: pd.DataFrame) -> pd.Series:
    """Which domain(s) each row has scores for: a model's math and commonsense rows share Teacher, Student and
    Method (and the Average column), so seed aggregation must keep them apart."""
    has = {domain: results[cols].notna().any(axis=1) for domain, cols in domain_columns(results).items()}
    return pd.Series(["+".join(d for d in has if has[d].iloc[i]) for i in range(len(results))], index=results.index,
                     dtype=object)


# --------------------------------------------------------------------------------------------------------------
# What each row describes
# --------------------------------------------------------------------------------------------------------------


def _text(value: object) -> str:
    """A descriptor cell as text; CSV round trips turn empty strings into NaN."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def describe_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Per row: ``kd_method`` (SeqKD/RevKD/GKD, "" for SFT, BaseModel and unknown rows), ``temperature`` (NaN where
    none), ``ablation`` ("" for a plain KD student) and ``cross_tokenizer`` ("" for a same-family pair, else the
    cross-tokenizer loss its label names). A row whose ``KDMethod`` cell is filled is described by its real
    columns; any other row by its ``Method`` label (the study's published CSVs)."""
    parsed = [parse_row_label(label) for label in table["Method"]]
    kd_method = [p.kd_method for p in parsed]
    temperature = [p.temperature for p in parsed]
    ablation = [p.ablation for p in parsed]
    if KD_METHOD_COLUMN in table.columns:
        real = table[KD_METHOD_COLUMN].map(_text).to_numpy()
        temps = (pd.to_numeric(table[TEMPERATURE_COLUMN], errors="coerce").to_numpy(float)
                 if TEMPERATURE_COLUMN in table.columns else np.full(len(table), np.nan))
        ablations = (table[ABLATION_COLUMN].map(_text).to_numpy() if ABLATION_COLUMN in table.columns
                     else np.full(len(table), "", dtype=object))
        for i, method in enumerate(real):
            if method:
                kd_method[i], temperature[i], ablation[i] = method, float(temps[i]), ablations[i]
    return pd.DataFrame({"kd_method": kd_method, "temperature": temperature, "ablation": ablation,
                         "cross_tokenizer": [p.cross_tokenizer for p in parsed]}, index=table.index)


def analysis_method(described: pd.DataFrame) -> pd.Series:
    """The method a row is analysed under: its KD method, or for a cross-family pair ``<method>/<loss>`` (e.g.
    ``SeqKD/xtok_kl``): the study's tests concern same-family distillation, so cross-tokenizer units form groups of
    their own and never enter the SeqKD/RevKD/GKD groups or the pooled "all"."""
    cross = described["cross_tokenizer"]
    return described["kd_method"].where(cross == "", described["kd_method"] + "/" + cross)


def _check_descriptors(df: pd.DataFrame, path: Path) -> None:
    """Real columns, where present, must hold what the layout says."""
    if KD_METHOD_COLUMN in df.columns:
        methods = df[KD_METHOD_COLUMN].map(_text)
        bad = ~methods.isin(["", *KD_METHODS])
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0]) + 1  # the header is row 1, as in a spreadsheet
            raise InputError(f"{where(path, row, KD_METHOD_COLUMN)}: {methods[bad].iloc[0]!r} is not a KD method; "
                             f"write one of {', '.join(KD_METHODS)} "
                             "or leave it empty for SFT and BaseModel rows")
    if TEMPERATURE_COLUMN in df.columns:
        df[TEMPERATURE_COLUMN] = _numeric_column(df[TEMPERATURE_COLUMN], path, TEMPERATURE_COLUMN)


# --------------------------------------------------------------------------------------------------------------
# Reading tables
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
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(f"{path}: cannot parse ({e}); write it as CSV with a header row") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}; the study layout is "
                         f"{', '.join(required)}, one column per task, Average")
    if not domain_columns(df):
        raise InputError(f"{path}: no task columns (e.g. gsm8k, boolq); name columns after the study's tasks")
    if df.empty:
        raise InputError(f"{path}: a header but no rows; add one row per model (BaseModel, SFT, KD students)")
    for column in [*(c for cols in domain_columns(df).values() for c in cols), AVERAGE]:
        if column in df.columns:
            df[column] = _numeric_column(df[column], path, column)
    _check_descriptors(df, path)
    return df


def _numeric_column(values: pd.Series, path: Path, column: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() & values.notna() & (values.astype(str).str.strip() != "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0]) + 1  # the header is row 1, as in a spreadsheet
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
        try:
            frame = pd.read_csv(path)
        except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise InputError(f"{path}: cannot parse ({e}); write it as CSV with a header row") from None
        missing = [c for c in required if c not in frame.columns]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(required)}")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else None


def require_analysable(results: pd.DataFrame, sources: Sequence[Path | str]) -> None:
    """Refuse, on one line naming the input files, a table the study's analysis has no unit in: it needs KD
    student rows and the same students' SFT rows."""
    names = ", ".join(map(str, sources)) or "the result table"
    labels = results["Method"].astype(str).str.strip()
    described = describe_rows(results)
    kd_students = set(results.loc[(described["kd_method"] != "") & (described["ablation"] == ""), "Student"])
    sft_students = set(results.loc[labels == SFT_LABEL, "Student"])
    if not kd_students:
        raise InputError(f"{names}: no KD student rows (Method like 'student_KD_temp_1.0'); the analysis compares "
                         "KD students with their SFT rows, so add the KD rows")
    if not sft_students:
        raise InputError(f"{names}: no SFT rows (Method 'SFT'); add each student's SFT row, the baseline every "
                         "improvement is measured from")
    if not kd_students & sft_students:
        raise InputError(f"{names}: no KD student has an SFT row of its own (students {sorted(kd_students)}); add "
                         "an SFT row with the same Student name for each")
