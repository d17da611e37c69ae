"""A cross-family study runs end to end (issue 16): a built-in teacher on the byte-level BPE tokenizer and a tiny
student on a SentencePiece-style tokenizer (another vocabulary), SFT baselines, SeqKD / RevKD / GKD's cross-tokenizer
counterparts (GKD fully on-policy: every sample re-tokenised for the teacher), evaluation, fidelity and the
report, through the same study jobs as a same-family pair (ULD takes the same path with another loss)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForCausalLM

from kdscope.models import save_model, tiny_config
from kdscope.study import Study, StudyStore, expand, run_study
from xtok_tokenizers import sentencepiece_tokenizer

LABELS = {"student_KD_xtok_kl_temp_2.0": "xtok_kl", "student_RevKD_xtok_kl_temp_2.0": "xtok_reverse_kl",
          "student_GKD_xtok_kl_temp_1.0": "xtok_jsd"}


def _study(student_dir: Path) -> dict:
    return {
        "name": "cross-run", "seeds": [3], "device": "cpu", "threads": 1,
        "families": [{"name": "bpe", "teachers": [{"name": "T-66K", "model": "builtin:tiny-qwen-s"}], "students": []},
                     {"name": "sentencepiece", "teachers": [],
                      "students": [{"name": "SP-35K", "model": str(student_dir)}]}],
        "domains": [{"name": "commonsense", "train": "synthetic:commonsense:12", "tasks": [{"task": "toy_truefalse"}]}],
        "kd_runs": [{"methods": ["SeqKD", "RevKD"], "temperatures": [2.0], "cross_tokenizer": "xtok_kl"},
                    {"methods": ["GKD"], "cross_tokenizer": "xtok_kl"}],
        "training": {"lora": None, "common": {"prompt_style": "alpaca", "val_size": 0, "max_length": 64,
                                              "micro_batch_size": 2, "grad_accum": 1, "warmup_steps": 1,
                                              "save_every": 2, "max_steps": 2, "max_new_tokens": 8},
                     "kd": {"lmbda": 1.0}},
        "evaluation": {"synthetic_items": 4, "max_new_tokens": 6, "batch_size": 4, "prompt_style": "alpaca"},
    }


def test_a_cross_family_study_runs_every_stage(tmp_path: Path) -> None:
    tok = sentencepiece_tokenizer()
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(tiny_config("tiny-llama-s", len(tok), tok.eos_token_id,
                                                           tok.pad_token_id))
    save_model(student, tok, tmp_path / "student")
    study = Study(**_study(tmp_path / "student"))
    root = tmp_path / "run"
    summary = run_study(study, root, progress=False, log=lambda m: None)
    assert not summary.failed and not summary.blocked, summary.failed
    store = StudyStore(root / "study.sqlite", create=False)
    kd = [job for job in expand(study) if job.kind == "kd"]
    assert {job.params["label"]: job.params["settings"]["loss"] for job in kd} == LABELS
    for job in kd:
        result = store.result(job.key)
        assert result["steps"] == 2 and result["teacher_loaded"] and result["online_teacher_passes"] >= 2
        assert math.isfinite(result["final_kd"]) and result["final_kd"] > 0, (job.params["label"], result)
    results = pd.read_csv(root / "cs_results.csv")
    kd_rows = results[results["Method"].isin(LABELS)]
    assert set(kd_rows["Method"]) == set(LABELS) and set(kd_rows["Teacher"]) == {"T-66K"}
    assert set(kd_rows["Student"]) == {"SP-35K"} and {"SFT", "BaseModel"} <= set(results["Method"])
    assert (root / "report.md").is_file()
