"""A study's teacher cache serves students of different logit widths (issue 12 item 10): Qwen2.5-14B (152,064
logits) teaches the 0.5B-3B students (151,936) and the 7B (152,064). The cache job stores one cache per common
width, and each KD job reads the one of its pair (before, one cache at the teacher's full width made every
narrower student's KD job fail after the teacher pass)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from kdscope.models import build_tiny_model, config_logit_width, save_model, tiny_config
from kdscope.study import Study, StudyStore, expand, job_dir
from kdscope.study.jobs import run_job

PADDING_ROWS = 8


def _wide(tmp_path: Path, name: str, size: str) -> str:
    """A tiny model saved with PADDING_ROWS head rows beyond the tokenizer's ids (like Qwen2.5-7B/14B)."""
    tok = build_tiny_model("tiny-qwen-xs")[1]
    config = tiny_config(size, len(tok) + PADDING_ROWS, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(1)
    save_model(AutoModelForCausalLM.from_config(config), tok, tmp_path / name)
    return str(tmp_path / name)


def test_one_cache_per_common_width_and_each_student_reads_its_own(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    teacher, wide_student = _wide(tmp_path, "teacher", "tiny-qwen-s"), _wide(tmp_path, "wide", "tiny-qwen-xs")
    narrow = "builtin:tiny-qwen-xs"
    vocab = config_logit_width(narrow)
    assert config_logit_width(teacher) == config_logit_width(wide_student) == vocab + PADDING_ROWS
    study = Study(**{
        "name": "widths", "seeds": [3], "device": "cpu", "threads": 1, "methods": ["SeqKD"], "temperatures": [1.0],
        "families": [{"name": "f", "teachers": [{"name": "T-66K", "model": teacher}],
                      "students": [{"name": "S-35K", "model": narrow}, {"name": "W-36K", "model": wide_student}]}],
        "domains": [{"name": "math", "train": "synthetic:math:12", "tasks": [{"task": "toy_add"}]}],
        "training": {"lora": None, "common": {"val_size": 4, "max_length": 64, "micro_batch_size": 4,
                                              "grad_accum": 1, "warmup_steps": 0, "max_steps": 1, "save_every": 1},
                     "kd": {"teacher_topk": 8}},
    })
    jobs = expand(study)
    (cache,) = [j for j in jobs if j.kind == "cache"]
    kd_jobs = [j for j in jobs if j.kind == "kd"]
    assert sorted(ref for ref, _ in cache.params["students"]) == sorted([narrow, wide_student])
    store = StudyStore(tmp_path / "s" / "study.sqlite")
    needed = {cache.key, *(d.key for j in kd_jobs for d in j.deps.values()), *(j.key for j in kd_jobs)}
    for job in jobs:  # dependency order: the teacher's SFT, the cache, then both KD runs
        if job.key in needed:
            store.complete(job, run_job(job, tmp_path / "s", store, progress=False))
    folders = sorted(p.name for p in job_dir(tmp_path / "s", cache).glob("cache-w*"))
    assert folders == [f"cache-w{vocab}", f"cache-w{vocab + PADDING_ROWS}"]
    assert store.result(cache.key)["logit_widths"] == [vocab, vocab + PADDING_ROWS]
    for job in kd_jobs:  # served by the cache alone: the teacher model was never loaded
        assert (job_dir(tmp_path / "s", job) / "final").exists(), job.name
        assert store.result(job.key)["teacher_loaded"] is False
