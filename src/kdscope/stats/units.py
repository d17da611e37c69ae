"""The study's unit table: one row per (teacher, student, KD method, task), the KD score the maximum over
temperatures, with the student's SFT score, the teacher's score, the student's size, and the agreement and fidelity
of the student that maximum selected.

The study's aggregation, as in the authors' notebooks (analysis/statistical_tests_{math,cs}.ipynb):
- the KD score is the maximum over temperatures, taken per task column and for ``Average`` independently;
- ``KD`` rows are called SeqKD; teacher names lose checkpoint suffixes (``Qwen2.5-3B_ckpt2400`` -> ``Qwen2.5-3B``);
- improvement = KD score - the same student's SFT score; teacher score = the teacher model's SFT row;
- student size in billions is parsed from the model name (``Qwen2.5-0.5B`` -> 0.5, ``Llama-3.2-1B`` -> 1).
The math notebook drops base-teacher rows before the maximum, the commonsense one keeps them (as SeqKD); on the
released tables they never reach the maximum, so this module drops them in both domains with identical results.

Agreement and fidelity (study EM1*/BLEU* layout) exist per task only (no ``Average``). Each configuration gets the
value of the student it describes: the row of that pair and method whose temperature gave the maximum for that task
column. The study's released tables carry a single unlabelled ``KD`` row per pair, so for such a table (and only
then) that one value is attached to all three methods of the pair, as its notebooks did.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputError
from ..labels import PAIR_TABLE_KD_LABEL, SFT_LABEL, size_or_nan, teacher_name
from ..tasks import canonical_name
from .tables import AVERAGE, SEED_COLUMN, analysis_method, describe_rows, domain_columns


def configurations(results: pd.DataFrame, domain: str) -> pd.DataFrame:
    """Long table, one row per (Teacher, Student, method, task): ``kd`` (max over temperatures), ``kd_row`` (the
    Method label of the student that gave it), ``student_sft``, ``improvement``, ``teacher_score``,
    ``student_size``. Tasks are the domain's columns plus Average."""
    columns = domain_columns(results).get(domain, [])
    if not columns:
        return pd.DataFrame()
    tasks = columns + ([AVERAGE] if AVERAGE in results.columns else [])
    rows = results[results[columns].notna().any(axis=1)]
    sft = _sft_scores(rows, tasks)
    described = describe_rows(rows)
    plain_kd = (described["kd_method"] != "") & (described["ablation"] == "")
    kd_rows = rows[plain_kd].assign(Teacher=lambda d: d["Teacher"].map(teacher_name),
                                    method=analysis_method(described)[plain_kd],
                                    _temperature=described.loc[plain_kd, "temperature"])
    long = kd_rows.melt(id_vars=["Teacher", "Student", "method", "Method", "_temperature"], value_vars=tasks,
                        var_name="task", value_name="kd").dropna(subset=["kd"])
    # The maximum over temperatures; on a tie the lowest temperature's student is the one the row describes.
    long = long.sort_values(["_temperature", "Method"], kind="stable", na_position="first")
    best = long.loc[long.groupby(["Teacher", "Student", "method", "task"], sort=True)["kd"].idxmax()]
    best = best.rename(columns={"Method": "kd_row"}).drop(columns="_temperature")
    order = {t: i for i, t in enumerate(tasks)}
    best = best.assign(_order=best["task"].map(order)).sort_values(["_order", "Teacher", "Student", "method"])
    long = best.drop(columns="_order")[["Teacher", "Student", "method", "task", "kd", "kd_row"]]
    long = long.merge(sft.rename(columns={"model": "Student", "score": "student_sft"}), on=["Student", "task"],
                      how="inner")
    long = long.merge(sft.rename(columns={"model": "Teacher", "score": "teacher_score"}), on=["Teacher", "task"],
                      how="left")
    long["improvement"] = long["kd"] - long["student_sft"]
    long["student_size"] = long["Student"].map(size_or_nan)
    long.insert(0, "domain", domain)
    return long.dropna(subset=["improvement"]).reset_index(drop=True)


def _sft_scores(rows: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    sft = rows[rows["Method"].astype(str).str.strip() == SFT_LABEL]
    duplicated = sft["Student"][sft["Student"].duplicated()]
    if not duplicated.empty:
        raise InputError(f"model {duplicated.iloc[0]!r} has several SFT rows; keep one per model or add a "
                         f"{SEED_COLUMN!r} column so seeds are averaged")
    return sft.melt(id_vars=["Student"], value_vars=tasks, var_name="task", value_name="score").rename(
        columns={"Student": "model"})


def pair_scores(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """Agreement/fidelity table (study EM1*/BLEU* layout) -> long table of its KD rows (not SFT): Teacher,
    Student, ``kd_row`` (the row's Method label), ``labelled`` (whether the label names a KD student), task key
    (canonical name) and the value, averaged over seeds."""
    labels = table["Method"].astype(str).str.strip()
    kd = table[labels != SFT_LABEL].assign(Teacher=lambda d: d["Teacher"].map(teacher_name),
                                           kd_row=labels[labels != SFT_LABEL])
    columns = [c for cols in domain_columns(table).values() for c in cols]
    long = kd.melt(id_vars=["Teacher", "Student", "kd_row"], value_vars=columns, var_name="column", value_name=name)
    long["task_key"] = long["column"].map(canonical_name)
    long = long.drop(columns="column").dropna(subset=[name])
    long = long.groupby(["Teacher", "Student", "kd_row", "task_key"], sort=False, as_index=False)[name].mean()
    long["labelled"] = describe_rows(long.rename(columns={"kd_row": "Method"}))["kd_method"] != ""
    return long


def attach_pair_scores(configs: pd.DataFrame, agreement: pd.DataFrame | None,
                       fidelity: pd.DataFrame | None) -> pd.DataFrame:
    """Add ``agreement`` and ``fidelity`` columns (NaN where the tables have no value): per configuration the value
    of the student the configuration's row describes; for pairs whose table has only one unlabelled KD row (the
    study's released layout), that row's value for every method of the pair."""
    out = configs.assign(task_key=configs["task"].map(lambda t: t if t == AVERAGE else canonical_name(t)))
    pair = ["Teacher", "Student", "task_key"]
    for name, table in (("agreement", agreement), ("fidelity", fidelity)):
        if table is None or table.empty:
            out[name] = np.nan
            continue
        scores = pair_scores(table, name)
        per_student = scores[scores["labelled"]][[*pair, "kd_row", name]]
        out = out.merge(per_student, on=[*pair, "kd_row"], how="left")
        per_pair = scores[~scores["labelled"]]
        labelled_pairs = per_student[pair].drop_duplicates()
        per_pair = per_pair.merge(labelled_pairs, on=pair, how="left", indicator=True)
        per_pair = per_pair[per_pair["_merge"] == "left_only"]
        several = per_pair[per_pair.duplicated(pair, keep=False)]
        if not several.empty:
            first = several.iloc[0]
            raise InputError(f"{name} table: pair {first['Teacher']} -> {first['Student']} has several KD rows "
                             f"({', '.join(sorted(set(several['kd_row'])))}) that name no student; label each with "
                             f"its student's row label (e.g. student_KD_temp_1.0) or keep one "
                             f"{PAIR_TABLE_KD_LABEL!r} row per pair")
        fallback = out.drop(columns=name).merge(per_pair[[*pair, name]], on=pair, how="left")[name]
        out[name] = out[name].fillna(pd.Series(fallback.to_numpy(), index=out.index))
    return out.drop(columns="task_key")
