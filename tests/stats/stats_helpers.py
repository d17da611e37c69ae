"""Small result tables for the statistics tests (no shared data needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd

STUDY_LABELS = {"SeqKD": "KD", "RevKD": "RevKD", "GKD": "GKD"}  # written out here, not taken from kdscope.labels


def find(records: list[dict], hypothesis: str, task: str = "Average", method: str = "all") -> dict:
    hits = [r for r in records if r["hypothesis"] == hypothesis and r["task"] == task and r["method"] == method]
    assert len(hits) == 1, (hypothesis, task, method, len(hits))
    return hits[0]


def toy_table() -> pd.DataFrame:
    """Three SFT rows, three pairs x three methods x T in {1, 2}, and a noise row per pair that must not count."""
    rng = np.random.default_rng(1)
    rows = [{"Teacher": "-", "Student": s, "Method": "SFT", "gsm8k": 40.0 + i, "SVAMP": 50.0 + i}
            for i, s in enumerate(["M-1B", "M-3B", "M-8B"])]
    for teacher, student in [("M-8B", "M-1B"), ("M-8B", "M-3B"), ("M-3B", "M-1B")]:
        for label in ("KD", "RevKD", "GKD"):
            for temp in (1.0, 2.0):
                rows.append({"Teacher": teacher, "Student": student, "Method": f"student_{label}_temp_{temp}",
                             "gsm8k": 45 + rng.normal(), "SVAMP": 52 + rng.normal()})
        rows.append({"Teacher": teacher, "Student": student, "Method": "student_KD_noise_2.0_temp_1.0",
                     "gsm8k": 99.0, "SVAMP": 99.0})
    table = pd.DataFrame(rows)
    table["Average"] = table[["gsm8k", "SVAMP"]].mean(axis=1)
    return table


def with_real_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The same rows as kdscope's own tables write them: KDMethod, Temperature, Ablation beside the label."""
    methods, temps, ablations = [], [], []
    stems = {v: k for k, v in STUDY_LABELS.items()}
    for label in table["Method"]:
        parts = str(label).split("_")
        if parts[0] != "student":
            methods.append(""), temps.append(np.nan), ablations.append("")
            continue
        methods.append(stems[parts[1]])
        temps.append(float(parts[-1]))
        ablations.append(f"noise_sigma={parts[3]}" if parts[2] == "noise" else
                         "base_teacher" if parts[2] == "base" else "")
    return table.assign(KDMethod=methods, Temperature=temps, Ablation=ablations)
