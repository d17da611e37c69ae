"""Fused LM head + loss (kdscope.fused) against the plain path: full logits, then kdscope.losses."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from kdscope.errors import InputError
from kdscope.fused import (
    LinearHead,
    chunk_rows,
    chunked_topk,
    fused_cross_entropy_parts,
    fused_distill_parts,
    fused_distill_sparse_parts,
    fused_supported,
    last_hidden_states,
    masked_row_weights,
    teacher_noise,
)
from kdscope.losses import (
    LOSS_NAMES,
    cross_entropy_parts,
    distill_loss_parts,
    distill_loss_sparse,
)
from kdscope.teacher import align_vocab

B, S, H, HT, V = 3, 7, 16, 24, 50
CHUNK_BUDGET = V * 4 * 4 * 3  # 3 rows per chunk for the closed-form KLs, 1 through autograd, 6 for CE: several chunks


def rel_err(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


def make_mask() -> Tensor:
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1] = False  # an empty row
    mask[2, 4:] = False
    mask[0, 0] = False
    return mask


class Student(torch.nn.Module):
    """hidden = tanh(embed(ids) @ A); head = embed (tied) or its own Linear with bias (untied)."""

    def __init__(self, tied: bool, vocab: int = V, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(vocab, H, generator=gen))
        self.mix = torch.nn.Parameter(torch.randn(H, H, generator=gen) / math.sqrt(H))
        self.head = None if tied else LinearHead(
            torch.nn.Parameter(torch.randn(vocab, H, generator=gen)),
            torch.nn.Parameter(torch.randn(vocab, generator=gen)),
        )

    def hidden(self, ids: Tensor) -> Tensor:
        return torch.tanh(self.embed[ids] @ self.mix)

    def lm_head(self) -> LinearHead:
        return LinearHead(self.embed) if self.head is None else self.head

    def logits(self, ids: Tensor) -> Tensor:
        head = self.lm_head()
        return F.linear(self.hidden(ids), head.weight, head.bias)

    def grads(self) -> list[Tensor]:
        params = [self.embed, self.mix] + ([] if self.head is None else [self.head.weight, self.head.bias])
        return [p.grad.clone() for p in params]

    def zero(self) -> None:
        for p in [self.embed, self.mix] + ([] if self.head is None else [self.head.weight, self.head.bias]):
            p.grad = None


def teacher_parts(vocab: int = V, seed: int = 1) -> tuple[Tensor, LinearHead]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, HT, generator=gen)
    return hidden, LinearHead(torch.randn(vocab, HT, generator=gen) * 1.5, torch.randn(vocab, generator=gen))


def ids(seed: int = 2, vocab: int = V) -> Tensor:
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


def assert_same(fused: Tensor, dense: Tensor, f_grads: list[Tensor], d_grads: list[Tensor]) -> None:
    assert rel_err(fused.detach(), dense.detach()) < 1e-5, (float(fused), float(dense))
    for f, d in zip(f_grads, d_grads):
        assert d.abs().sum() > 0
        assert rel_err(f, d) < 1e-5


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_fused_distill_equals_dense(loss: str, reduction: str, temperature: float, tied: bool) -> None:
    student, (t_hidden, t_head), mask, x = Student(tied), teacher_parts(), make_mask(), ids()
    kw = dict(loss=loss, temperature=temperature, beta=0.3 if loss == "jsd" else 0.5, alpha=0.2, reduction=reduction)
    t_logits = F.linear(t_hidden, t_head.weight, t_head.bias)
    dense = distill_loss_parts(student.logits(x), t_logits, mask, **kw)
    (dense.total / dense.count).backward()
    d_grads = student.grads()
    student.zero()
    fused = fused_distill_parts(student.hidden(x), student.lm_head(), t_hidden, t_head, mask,
                                memory_budget=CHUNK_BUDGET, **kw)
    (fused.total / fused.count).backward()
    assert fused.count == dense.count
    assert_same(fused.total, dense.total, student.grads(), d_grads)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_limits_use_the_closed_forms_exactly(beta: float) -> None:
    """JSD at beta 0 / 1 is forward / reverse KL (TRL's convention): the closed-form gradients must match the dense."""
    student, (t_hidden, t_head), mask, x = Student(tied=False), teacher_parts(), make_mask(), ids()
    dense = distill_loss_parts(student.logits(x), F.linear(t_hidden, t_head.weight, t_head.bias), mask, "jsd", 2.0,
                               beta=beta)
    dense.total.backward()
    d_grads = student.grads()
    student.zero()
    fused = fused_distill_parts(student.hidden(x), student.lm_head(), t_hidden, t_head, mask, "jsd", 2.0, beta=beta,
                                memory_budget=CHUNK_BUDGET)
    fused.total.backward()
    assert_same(fused.total, dense.total, student.grads(), d_grads)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_gradient_accumulation_equals_one_batch(loss: str, reduction: str) -> None:
    """Two micro-batches, each divided by the window's unit count (train.units), give the whole batch's gradient."""
    student, (t_hidden, t_head), mask, x = Student(tied=True), teacher_parts(), make_mask(), ids()
    kw = dict(loss=loss, temperature=2.0, reduction=reduction)
    dense = distill_loss_parts(student.logits(x), F.linear(t_hidden, t_head.weight, t_head.bias), mask, **kw)
    (dense.total / dense.count).backward()
    d_grads = student.grads()
    student.zero()
    window = [slice(0, 2), slice(2, 3)]
    units = sum(masked_row_weights(mask[part], reduction)[1] for part in window)
    assert units == dense.count
    total = torch.zeros(())
    for part in window:
        parts = fused_distill_parts(student.hidden(x[part]), student.lm_head(), t_hidden[part], t_head, mask[part],
                                    memory_budget=CHUNK_BUDGET, **kw)
        (parts.total / units).backward()
        total += parts.total.detach()
    assert_same(total / units, dense.total / dense.count, student.grads(), d_grads)


@pytest.mark.parametrize("teacher_vocab", [V + 6, V - 4])
def test_vocab_alignment_cuts_to_the_common_width(teacher_vocab: int) -> None:
    student, (t_hidden, t_head), mask = Student(tied=False), teacher_parts(teacher_vocab), make_mask()
    x = ids(vocab=min(V, teacher_vocab))
    s_logits, t_logits = align_vocab(student.logits(x), F.linear(t_hidden, t_head.weight, t_head.bias))
    dense = distill_loss_parts(s_logits, t_logits, mask, "reverse_kl", 2.0)
    dense.total.backward()
    d_grads = student.grads()
    student.zero()
    fused = fused_distill_parts(student.hidden(x), student.lm_head(), t_hidden, t_head, mask, "reverse_kl", 2.0,
                                memory_budget=CHUNK_BUDGET)
    fused.total.backward()
    assert_same(fused.total, dense.total, student.grads(), d_grads)
    if teacher_vocab < V:  # the student's rows beyond the common width get no gradient
        assert torch.all(student.head.weight.grad[teacher_vocab:] == 0)


def test_noise_matches_a_seeded_dense_reference_and_not_the_chunking() -> None:
    student, (t_hidden, t_head), mask, x = Student(tied=True), teacher_parts(), make_mask(), ids()
    sigma, seed = 0.7, 123
    t_logits = F.linear(t_hidden, t_head.weight, t_head.bias)
    noisy = t_logits.clone()
    noisy[mask] = t_logits[mask] + sigma * teacher_noise(seed, range(int(mask.sum())), V)
    dense = distill_loss_parts(student.logits(x), noisy, mask, "forward_kl", 2.0)
    dense.total.backward()
    d_grads = student.grads()
    values = []
    for budget in (CHUNK_BUDGET, 10**9):
        student.zero()
        fused = fused_distill_parts(student.hidden(x), student.lm_head(), t_hidden, t_head, mask, "forward_kl", 2.0,
                                    noise_sigma=sigma, noise_seed=seed, memory_budget=budget)
        fused.total.backward()
        assert_same(fused.total, dense.total, student.grads(), d_grads)
        values.append(float(fused.total.detach()))
    clean = fused_distill_parts(student.hidden(x), student.lm_head(), t_hidden, t_head, mask, "forward_kl", 2.0)
    assert values[0] == pytest.approx(values[1], rel=1e-6) and float(clean.total) != pytest.approx(values[0], rel=1e-3)
    draw = teacher_noise(seed, range(400), 500)  # i.i.d. N(0, 1), rows independent
    assert abs(float(draw.mean())) < 0.01 and abs(float(draw.std()) - 1) < 0.01
    assert abs(float(torch.corrcoef(draw[:2])[0, 1])) < 0.1


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("tail", ["renormalise", "tail_bucket", "tail_bucket_summed_tail"])
@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_fused_sparse_equals_distill_loss_sparse(loss: str, tail: str, reduction: str) -> None:
    student, (t_hidden, t_head), mask, x = Student(tied=False), teacher_parts(), make_mask(), ids()
    temperature = 2.0
    values, indices, normalizers, tails = chunked_topk(t_hidden, t_head, 8, (temperature,),
                                                       memory_budget=CHUNK_BUDGET)
    values, indices = values.view(B, S, 8), indices.view(B, S, 8)
    normalizer = normalizers[:, 0].view(B, S)
    kw = dict(loss=loss, temperature=temperature, tail=tail.removesuffix("_summed_tail"),
              teacher_log_normalizer=normalizer, reduction=reduction)
    if tail.endswith("_summed_tail"):  # the tail mass summed from the dense logits (teacher.topk_signal, the cache)
        kw["teacher_log_tail"] = tails[:, 0].view(B, S)
    dense = distill_loss_sparse(student.logits(x), values, indices, mask, **kw)
    dense.backward()
    d_grads = student.grads()
    student.zero()
    fused = fused_distill_sparse_parts(student.hidden(x), student.lm_head(), values, indices, mask,
                                       memory_budget=CHUNK_BUDGET, **kw)
    fused.mean().backward()
    assert_same(fused.mean(), dense, student.grads(), d_grads)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_fused_cross_entropy_equals_dense(reduction: str, tied: bool) -> None:
    student, mask, x = Student(tied), make_mask(), ids()
    targets = ids(seed=5)
    dense = cross_entropy_parts(student.logits(x), targets, mask, reduction=reduction)
    dense.mean().backward()
    d_grads = student.grads()
    student.zero()
    fused = fused_cross_entropy_parts(student.hidden(x), student.lm_head(), targets, mask, reduction=reduction,
                                      memory_budget=CHUNK_BUDGET)
    fused.mean().backward()
    assert fused.count == dense.count
    assert_same(fused.mean(), dense.mean(), student.grads(), d_grads)


def test_chunked_topk_equals_full_logits() -> None:
    t_hidden, t_head = teacher_parts(V + 6)
    values, indices, normalizers, tails = chunked_topk(t_hidden, t_head, 5, (1.0, 2.0), vocab_width=V,
                                                       memory_budget=V * 4 * 4 * 2)
    logits = F.linear(t_hidden, t_head.weight, t_head.bias)[..., :V].reshape(-1, V).double()
    ref_values, ref_indices = logits.topk(5, dim=-1)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values.double(), ref_values, rtol=1e-6, atol=1e-5)
    outside = torch.ones_like(logits, dtype=torch.bool).scatter(1, ref_indices, False)
    for j, t in enumerate((1.0, 2.0)):
        probs = torch.softmax(logits / t, -1)
        torch.testing.assert_close(normalizers[:, j].double(), torch.logsumexp(logits / t, -1), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(tails[:, j].double(), (probs * outside).sum(-1).log(), rtol=1e-5, atol=1e-5)


def test_no_grad_and_empty_masks() -> None:
    student, (t_hidden, t_head), x = Student(tied=True), teacher_parts(), ids()
    empty = torch.zeros(B, S, dtype=torch.bool)
    parts = fused_distill_parts(student.hidden(x), student.lm_head(), t_hidden, t_head, empty)
    assert parts.count == 0 and float(parts.mean()) == 0.0
    parts.mean().backward()
    assert torch.all(student.embed.grad == 0)
    with torch.no_grad():
        parts = fused_distill_parts(student.hidden(x), student.lm_head(), t_hidden, t_head, make_mask())
    assert not parts.total.requires_grad and float(parts.total) > 0


def test_chunk_rows_follow_the_budget() -> None:
    assert chunk_rows(151_936, 1024, 128 * 2**20, blocks_per_row=4) == 55
    assert chunk_rows(151_936, 1024, 128 * 2**20, blocks_per_row=16) == 13
    assert chunk_rows(512, 1024, 128 * 2**20) == 1024
    assert chunk_rows(151_936, 1024, 1) == 1
    with pytest.raises(InputError):
        chunk_rows(10, 10, 0)


# ----------------------------------------------------------------------------------------------------------------
# Real architectures: the body + head split, the fallback, and no vocabulary-sized tensor in a fused step.


def tiny_qwen(vocab: int, hidden: int, seed: int, tied: bool = True) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(config)


def test_body_and_head_reproduce_the_logits() -> None:
    model = tiny_qwen(vocab=64, hidden=16, seed=0, tied=False).eval()
    x, attn = ids(vocab=64), torch.ones(B, S, dtype=torch.long)
    attn[2, 5:] = 0
    head = LinearHead.of(model)
    torch.testing.assert_close(F.linear(last_hidden_states(model, x, attn), head.weight, head.bias),
                               model(input_ids=x, attention_mask=attn).logits, rtol=1e-5, atol=1e-6)
    assert fused_supported(model)


def test_unsupported_architectures_fall_back_once(caplog: pytest.LogCaptureFixture) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    assert gemma.config.final_logit_softcapping is not None
    with caplog.at_level(logging.WARNING, logger="kdscope.fused"):
        assert not fused_supported(gemma) and not fused_supported(gemma)
    assert len([r for r in caplog.records if "final_logit_softcapping" in r.getMessage()]) == 1
    lora_head = get_peft_model(tiny_qwen(64, 16, 0, tied=False), LoraConfig(r=2, target_modules=["lm_head"]))
    assert not fused_supported(lora_head, announce=False)
    lora_body = get_peft_model(tiny_qwen(64, 16, 0), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert fused_supported(lora_body, announce=False)


class AllocationShapes(TorchDispatchMode):
    """Records the element count of every tensor any op returns (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fused_step_never_allocates_batch_by_vocab() -> None:
    vocab, batch, seq = 512, 4, 16
    student, teacher = tiny_qwen(vocab, 16, seed=0), tiny_qwen(vocab, 32, seed=1).eval()
    x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(x)
    mask = torch.ones(batch, seq - 1, dtype=torch.bool)
    limit = batch * seq * vocab

    def fused_step() -> None:
        hidden = last_hidden_states(student, x, attn)[:, :-1]
        with torch.no_grad():
            t_hidden = last_hidden_states(teacher, x, attn)[:, :-1]
        parts = fused_distill_parts(hidden, LinearHead.of(student), t_hidden, LinearHead.of(teacher), mask, "jsd",
                                    2.0, memory_budget=vocab * 4 * 16 * 8)
        (parts.total / parts.count).backward()
        ce = fused_cross_entropy_parts(last_hidden_states(student, x, attn)[:, :-1], LinearHead.of(student),
                                       x[:, 1:], mask, memory_budget=vocab * 4 * 16 * 8)
        ce.mean().backward()

    def plain_step() -> None:
        logits = student(input_ids=x, attention_mask=attn).logits[:, :-1]
        with torch.no_grad():
            t_logits = teacher(input_ids=x, attention_mask=attn).logits[:, :-1]
        parts = distill_loss_parts(logits, t_logits, mask, "jsd", 2.0)
        (parts.total / parts.count).backward()

    with AllocationShapes() as fused_shapes:
        fused_step()
    with AllocationShapes() as plain_shapes:
        plain_step()
    assert plain_shapes.largest >= limit  # the recorder sees the plain path's logits, so it can fail
    assert fused_shapes.largest < limit, fused_shapes.largest


def test_online_teacher_hidden_gives_the_online_teachers_loss() -> None:
    """A dense OnlineTeacher (vocab cut, adapter off) through the fused path gives the loss of its logits."""
    from peft import LoraConfig, get_peft_model

    from kdscope.fused import fused_teacher_ready, online_teacher_hidden
    from kdscope.teacher import OnlineTeacher

    student = tiny_qwen(64, 16, seed=0, tied=False)
    teacher_model = get_peft_model(tiny_qwen(70, 24, seed=1, tied=False),
                                   LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    x, attn = ids(vocab=64), torch.ones(B, S, dtype=torch.long)
    mask = make_mask()
    for disable_adapter in (False, True):
        teacher = OnlineTeacher(teacher_model, vocab_width=64, disable_adapter=disable_adapter)
        assert fused_teacher_ready(teacher)
        dense = distill_loss_parts(student(input_ids=x, attention_mask=attn).logits, teacher(x, attn).logits, mask,
                                   "forward_kl", 2.0)
        signal = online_teacher_hidden(teacher, x, attn)
        fused = fused_distill_parts(last_hidden_states(student, x, attn), LinearHead.of(student), signal.hidden,
                                    signal.head, mask, "forward_kl", 2.0)
        assert rel_err(fused.total.detach(), dense.total.detach()) < 1e-5
        assert teacher.calls == 2
    assert not fused_teacher_ready(OnlineTeacher(teacher_model, topk=4))


FSDP_CHECK = """
import os, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from kdscope.fused import fused_supported, fused_unsupported_reason
from kdscope.models import build_tiny_model
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
model, _ = build_tiny_model("tiny-qwen-xs")
assert fused_supported(model), fused_unsupported_reason(model)
mesh = init_device_mesh("cpu", (1,))
for layer in model.model.layers:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
print(fused_unsupported_reason(model))
dist.destroy_process_group()
"""


def test_fsdp_sharded_model_is_not_fused() -> None:
    """An FSDP2-sharded teacher (placement fsdp) gathers its parameters in its own forward hooks, which the decoder
    body + head weight of the fused path would bypass: it must fall back (a one-rank gloo group, in a subprocess)."""
    port = str(29500 + os.getpid() % 1000)
    done = subprocess.run([sys.executable, "-c", FSDP_CHECK], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PORT": port, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sharded (FSDP" in done.stdout


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_fused_refuses_what_is_no_temperature(temperature: float) -> None:
    """The package's one temperature rule (kdscope.labels): a finite number > 0."""
    student, (t_hidden, t_head), mask, x = Student(True), teacher_parts(), make_mask(), ids()
    with pytest.raises(InputError, match="temperature"):
        fused_distill_parts(student.hidden(x), student.lm_head(), t_hidden, t_head, mask, temperature=temperature)
    with pytest.raises(InputError, match="temperature"):
        chunked_topk(t_hidden, t_head, 4, (1.0, temperature))


def test_backward_after_a_zero_output_gradient_is_refused() -> None:
    student, (t_hidden, t_head), mask, x = Student(False), teacher_parts(), make_mask(), ids()
    total = fused_distill_parts(student.hidden(x), student.lm_head(), t_hidden, t_head, mask).total
    (total * 0.0).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="zero output gradient"):
        total.backward()
