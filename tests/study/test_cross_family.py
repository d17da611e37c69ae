"""Cross-family pairs in a study (issue 16): a KD grid with ``cross_tokenizer`` pairs a teacher and a student of
different families and trains them with the methods' cross-tokenizer counterparts (SeqKD -> xtok_kl, RevKD ->
xtok_reverse_kl, GKD -> xtok_jsd on GKD's re-tokenised samples; or uld), while a same-family study expands to
exactly the jobs it did before."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdscope.cli import app
from kdscope.errors import InputError
from kdscope.labels import parse_row_label, row_label
from kdscope.study import Study, expand, load_study
from kdscope.study.run import plan, plan_text

# Same-family studies and their job keys in graph order, computed on commit 6860b2b (before cross-family grids).
# A failure here means a same-family study no longer expands to the same jobs: its results would not be reused.
# Only a deliberate change of what a job is (its params) may update these, in the commit that makes it.
DEMO = """
name: demo
seeds: [6]
device: cpu
threads: 1
families:
  - name: tiny-qwen
    teachers:
      - {name: TinyQwen-657K, model: "builtin:tiny-qwen-l"}
      - {name: TinyQwen-144K, model: "builtin:tiny-qwen-m"}
    students:
      - {name: TinyQwen-35K, model: "builtin:tiny-qwen-xs"}
      - {name: TinyQwen-66K, model: "builtin:tiny-qwen-s"}
      - {name: TinyQwen-144K, model: "builtin:tiny-qwen-m"}
domains:
  - {name: math, train: "synthetic:math:200", tasks: [{task: toy_add}, {task: toy_mult}, {task: toy_letter}]}
  - {name: commonsense, train: "synthetic:commonsense:300", tasks: [{task: toy_compare}, {task: toy_truefalse}]}
methods: [SeqKD, RevKD, GKD]
temperatures: [1.0, 2.0, 5.0]
ablations: {base_teacher: true, noise_sigmas: [1.0, 5.0], teachers: [TinyQwen-657K]}
pretrain:
  steps: {TinyQwen-657K: 600, TinyQwen-35K: 200, TinyQwen-66K: 200, TinyQwen-144K: 300}
  data: "synthetic:math:400"
  extra_data: ["synthetic:commonsense:400"]
  lr: 0.005
  token_mask: response
training:
  lora: null
  common: {prompt_style: alpaca, token_mask: response, val_size: 40, max_length: 160, micro_batch_size: 8,
           grad_accum: 1, warmup_steps: 5, lr: 0.003, eval_every: 10, save_every: 10, max_new_tokens: 24}
  teacher_sft: {max_steps: 100}
  student_sft: {max_steps: 40}
  kd: {max_steps: 40, teacher_topk: 64}
evaluation: {mode: generate, preset: greedy, synthetic_items: 64, max_new_tokens: 20, batch_size: 64,
             prompt_style: alpaca}
executor: {kind: local, workers: 2}
"""
PUBLISHED = """
name: published
seeds: [6]
device: auto
families:
  - name: qwen2.5
    teachers:
      - {name: Qwen2.5-3B, model: Qwen/Qwen2.5-3B}
      - {name: Qwen2.5-7B, model: Qwen/Qwen2.5-7B}
      - {name: Qwen2.5-14B, model: Qwen/Qwen2.5-14B}
    students:
      - {name: Qwen2.5-0.5B, model: Qwen/Qwen2.5-0.5B}
      - {name: Qwen2.5-1.5B, model: Qwen/Qwen2.5-1.5B}
      - {name: Qwen2.5-3B, model: Qwen/Qwen2.5-3B}
      - {name: Qwen2.5-7B, model: Qwen/Qwen2.5-7B}
  - name: llama
    teachers: [{name: Llama-3.1-8B, model: meta-llama/Llama-3.1-8B}]
    students:
      - {name: Llama-3.2-1B, model: meta-llama/Llama-3.2-1B}
      - {name: Llama-3.2-3B, model: meta-llama/Llama-3.2-3B}
domains:
  - name: math
    train: data/math_10k.json
    training: {epochs: 4}
    tasks: [{task: gsm8k, data: data/dataset}, {task: svamp, data: data/dataset}, {task: aqua, data: data/dataset}]
  - name: commonsense
    train: data/commonsense_15k.json
    training: {epochs: 3}
    tasks: [{task: boolq, data: data/dataset}, {task: hellaswag, data: data/hellaswag_validation}]
kd_runs:
  - {methods: [SeqKD, RevKD, GKD], temperatures: [1.0]}
  - {methods: [SeqKD, RevKD], temperatures: [2.0, 5.0], teachers: [Qwen2.5-3B, Qwen2.5-7B]}
ablations: {base_teacher: true, method: SeqKD, temperature: 1.0, teachers: [Qwen2.5-3B, Qwen2.5-7B]}
evaluation: {mode: generate, preset: study, batch_size: 64}
executor: {kind: ray, gpus_per_job: 1, cpus_per_job: 4}
"""
SAME_FAMILY_STUDIES = {"demo": DEMO, "published": PUBLISHED}
GOLDEN = {  # study -> (jobs, sha256 of their keys in graph order, first 16 hex digits)
    "demo": (299, "66aaca30107202be"),
    "published": (397, "7b6b1a21433e9317"),
}

# Two families (built-in models; their tokenizers happen to be one, which the study does not look at).
CROSS = {
    "name": "cross", "device": "cpu",
    "families": [
        {"name": "a", "teachers": [{"name": "A-657K", "model": "builtin:tiny-qwen-l"}],
         "students": [{"name": "A-35K", "model": "builtin:tiny-qwen-xs"}]},
        {"name": "b", "teachers": [{"name": "B-144K", "model": "builtin:tiny-qwen-m"}],
         "students": [{"name": "B-66K", "model": "builtin:tiny-qwen-s"}]},
    ],
    "domains": [{"name": "math", "train": "synthetic:math:5", "tasks": [{"task": "toy_add"}]}],
    "training": {"kd": {"teacher_topk": 8}},
    "kd_runs": [{"methods": ["SeqKD", "RevKD"], "temperatures": [2.0]}, {"methods": ["GKD"]}],
}
XTOK_GRID = {"methods": ["SeqKD", "RevKD"], "temperatures": [2.0], "cross_tokenizer": "xtok_kl",
             "teachers": ["A-657K", "B-144K"], "students": ["A-35K", "B-66K"]}
XTOK_GRIDS = [XTOK_GRID, {"methods": ["GKD"], "cross_tokenizer": "xtok_kl"}]


def _keys(study: Study) -> list[str]:
    return [job.key for job in expand(study)]


def _digest(keys: list[str]) -> str:
    return hashlib.sha256(" ".join(keys).encode()).hexdigest()[:16]


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("name", sorted(SAME_FAMILY_STUDIES))
def test_same_family_studies_expand_to_the_same_jobs(name: str) -> None:
    study = Study.model_validate(yaml.safe_load(SAME_FAMILY_STUDIES[name]))
    keys = _keys(study)
    assert (len(keys), _digest(keys)) == GOLDEN[name]
    kd = [job for job in expand(study) if job.kind == "kd"]
    assert all("cross_tokenizer" not in job.params for job in kd)
    assert {job.params["settings"]["loss"] for job in kd} == {"forward_kl", "reverse_kl", "jsd"}


def test_a_cross_grid_adds_jobs_and_leaves_the_same_family_jobs_as_they_were() -> None:
    same = Study.model_validate(CROSS)
    mixed = Study.model_validate({**CROSS, "kd_runs": [*CROSS["kd_runs"], *XTOK_GRIDS]})
    before, after = _keys(same), _keys(mixed)
    assert set(before) - {j.key for j in expand(same) if j.kind == "analysis"} < set(after)
    added = [j for j in expand(mixed) if j.key not in set(before)]
    assert Counter(j.kind for j in added) == Counter({"kd": 6, "eval": 6, "fidelity": 6, "analysis": 1})
    kd = [j for j in added if j.kind == "kd"]
    # both directions, whatever the sizes: A-657K -> B-66K and B-144K -> A-35K
    assert {(j.params["teacher_name"], j.params["student_name"]) for j in kd} == {("A-657K", "B-66K"),
                                                                                  ("B-144K", "A-35K")}
    losses = {(j.params["kd_method"], j.params["settings"]["objective"], j.params["settings"]["loss"]) for j in kd}
    assert losses == {("SeqKD", "kd", "xtok_kl"), ("RevKD", "kd", "xtok_reverse_kl"), ("GKD", "gkd", "xtok_jsd")}
    for job in kd:  # the teacher is read online, dense, from its own SFT: no top-k, no cache
        assert job.params["settings"]["teacher_topk"] is None and "cache" not in job.deps
        assert job.params["cross_tokenizer"] == "xtok_kl" and "teacher" in job.deps
        assert job.deps["teacher"].params["name"] == job.params["teacher_name"]
        assert parse_row_label(job.params["label"]).cross_tokenizer == "xtok_kl"
    fidelity = [j for j in added if j.kind == "fidelity"]
    assert {j.deps["student_sft_eval"].params["student"] for j in fidelity} == {"A-35K", "B-66K"}
    assert {j.deps["teacher_eval"].params["student"] for j in fidelity} == {"A-657K", "B-144K"}


def test_uld_grid_and_labels() -> None:
    grids = [{**XTOK_GRID, "methods": ["SeqKD"], "cross_tokenizer": "uld", "teachers": ["A-657K"]},
             {"methods": ["GKD"], "cross_tokenizer": "uld", "teachers": ["A-657K"]}]
    study = Study.model_validate({**CROSS, "kd_runs": grids})
    kd = [j for j in expand(study) if j.kind == "kd"]
    assert {(j.params["label"], j.params["settings"]["objective"], j.params["settings"]["loss"]) for j in kd} == {
        ("student_KD_uld_temp_2.0", "kd", "uld"), ("student_GKD_uld_temp_1.0", "gkd", "uld")}
    assert row_label("RevKD", 2.0, cross_tokenizer="xtok_kl") == "student_RevKD_xtok_kl_temp_2.0"
    parsed = parse_row_label("student_RevKD_xtok_kl_temp_2.0")
    assert (parsed.kind, parsed.kd_method, parsed.temperature, parsed.cross_tokenizer) == ("kd", "RevKD", 2.0,
                                                                                           "xtok_kl")
    assert parse_row_label("student_RevKD_temp_2.0").cross_tokenizer == ""
    with pytest.raises(InputError, match="RevKD has no uld counterpart"):
        row_label("RevKD", 1.0, cross_tokenizer="uld")


@pytest.mark.parametrize(("grid", "message"), [
    ({**XTOK_GRID, "cross_tokenizer": "uld"}, "kd_runs.0.methods: RevKD has no uld counterpart"),
    ({**XTOK_GRID, "teachers": ["A-657K"], "students": ["A-35K"]},
     "kd_runs.0.cross_tokenizer: no teacher and student of different families"),
    ({**XTOK_GRID, "cross_tokenizer": "forward_kl"}, "kd_runs.0.cross_tokenizer"),
    ([XTOK_GRID, {**XTOK_GRID, "methods": ["SeqKD"], "temperatures": [1.0], "cross_tokenizer": "uld"}],
     "kd_runs.1.cross_tokenizer: A-657K -> B-66K SeqKD already runs with xtok_kl (kd_runs.0)"),
])
def test_bad_cross_grids_are_refused_in_one_line(tmp_path: Path, grid: dict | list, message: str) -> None:
    path = _write(tmp_path, {**CROSS, "kd_runs": grid if isinstance(grid, list) else [grid]})
    with pytest.raises(InputError) as e:
        load_study(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    res = CliRunner().invoke(app, ["run", str(path), "--plan"])
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1


def test_plan_shows_the_cross_tokenizer_loss_per_job(tmp_path: Path) -> None:
    path = _write(tmp_path, {**CROSS, "kd_runs": [*CROSS["kd_runs"], *XTOK_GRIDS]})
    res = CliRunner().invoke(app, ["run", str(path), "--plan", "--json"])
    assert res.exit_code == 0, res.output
    kd = [j for j in json.loads(res.output)["jobs"] if j["kind"] == "kd"]
    shown = {(j["teacher"], j["student"], j["method"], j["settings"]["loss"], j["teacher_signal"]["source"])
             for j in kd if j["settings"]["loss"].startswith("xtok")}
    assert shown == {(t, s, label, loss, "online") for t, s in (("A-657K", "B-66K"), ("B-144K", "A-35K"))
                     for label, loss in (("student_KD_xtok_kl_temp_2.0", "xtok_kl"),
                                         ("student_RevKD_xtok_kl_temp_2.0", "xtok_reverse_kl"),
                                         ("student_GKD_xtok_kl_temp_1.0", "xtok_jsd"))}
    resolved = plan(load_study(path))
    assert {j["cross_tokenizer"] for j in resolved["jobs"] if j["kind"] == "kd"} == {"", "xtok_kl"}
    summary = {(r["kd_method"], r["cross_tokenizer"]): r["pairs"] for r in resolved["kd_runs"]}
    assert summary == {("SeqKD", ""): 2, ("RevKD", ""): 2, ("GKD", ""): 2, ("SeqKD", "xtok_kl"): 2,
                       ("RevKD", "xtok_kl"): 2, ("GKD", "xtok_kl"): 2}  # same-family pairs apart from cross ones
    text = plan_text(resolved)
    assert "A-657K->B-66K student_RevKD_xtok_kl_temp_2.0 RevKD T=2.0" in text and "loss=xtok_reverse_kl" in text
    assert "  math RevKD T=2.0 - xtok_kl: 2" in text and "  math RevKD T=2.0 -: 2" in text
