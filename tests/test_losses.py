"""kdscope.losses against independent float64 formulas, chunking, accumulation and the sparse teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdscope.errors import InputError
from kdscope.losses import (
    LOSS_NAMES,
    cross_entropy_loss,
    distill_loss,
    distill_loss_parts,
    distill_loss_sparse,
    kd_token_mask,
    student_objective,
)

BATCH, SEQ, VOCAB = 3, 7, 23


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * np.log(a / b), axis=-1)


def reference_divergence(p: np.ndarray, q: np.ndarray, loss: str, beta: float, alpha: float) -> np.ndarray:
    """Textbook definitions, written out with numpy in float64 (independent of kdscope's log-space code)."""
    if loss == "forward_kl":
        return _kl(p, q)
    if loss == "reverse_kl":
        return _kl(q, p)
    if loss == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if loss == "skew_forward_kl":
        return _kl(p, alpha * p + (1 - alpha) * q)
    if loss == "skew_reverse_kl":
        return _kl(q, alpha * q + (1 - alpha) * p)
    if loss == "tvd":
        return 0.5 * np.abs(p - q).sum(axis=-1)
    raise AssertionError(loss)


def reference_loss(
    student: np.ndarray,
    teacher: np.ndarray,
    mask: np.ndarray,
    loss: str,
    temperature: float,
    beta: float = 0.5,
    alpha: float = 0.1,
    sequence_mean: bool = False,
) -> float:
    per_token = reference_divergence(_softmax(teacher, temperature), _softmax(student, temperature), loss, beta, alpha)
    per_token = per_token * temperature**2
    if sequence_mean:
        rows = [per_token[b][mask[b] > 0].mean() for b in range(mask.shape[0]) if mask[b].sum() > 0]
        return float(np.mean(rows))
    return float(per_token[mask > 0].mean())


def random_case(seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(BATCH, SEQ, VOCAB, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(BATCH, SEQ, VOCAB, generator=g, dtype=torch.float64) * scale
    mask = (torch.rand(BATCH, SEQ, generator=g) > 0.3).long()
    mask[0, 0] = 1
    return student, teacher, mask


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_identical_inputs_give_zero(loss: str) -> None:
    student, _, mask = random_case(0)
    value = distill_loss(student, student.clone(), mask, loss=loss, temperature=2.0)
    assert abs(float(value)) < 1e-12


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_matches_independent_formula(loss: str, temperature: float, reduction: str) -> None:
    student, teacher, mask = random_case(int(temperature * 10))
    got = distill_loss(
        student, teacher, mask, loss=loss, temperature=temperature, beta=0.3, alpha=0.2, reduction=reduction
    )
    want = reference_loss(
        student.numpy(), teacher.numpy(), mask.numpy(), loss, temperature, 0.3, 0.2, reduction == "sequence_mean"
    )
    assert float(got) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_scale_by_t2_off_divides_out_t2() -> None:
    student, teacher, mask = random_case(1)
    scaled = distill_loss(student, teacher, mask, temperature=3.0)
    unscaled = distill_loss(student, teacher, mask, temperature=3.0, scale_by_t2=False)
    assert float(scaled) == pytest.approx(9.0 * float(unscaled), rel=1e-12)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_chunked_equals_dense_values_and_gradients(loss: str) -> None:
    student, teacher, mask = random_case(2)
    student32, teacher32 = student.float(), teacher.float()
    results = []
    for chunk in (1, 5, BATCH * SEQ):
        logits = student32.clone().requires_grad_(True)
        value = distill_loss(logits, teacher32, mask, loss=loss, temperature=2.0, chunk_size=chunk)
        value.backward()
        results.append((value.detach(), logits.grad))
    dense_value, dense_grad = results[-1]
    for value, grad in results[:-1]:
        assert torch.allclose(value, dense_value, atol=1e-6, rtol=0)
        assert torch.allclose(grad, dense_grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_gradient_matches_autograd_of_reference(loss: str) -> None:
    student, teacher, mask = random_case(3)
    logits = student.clone().requires_grad_(True)
    distill_loss(logits, teacher, mask, loss=loss, temperature=1.5, chunk_size=4).backward()

    reference_logits = student.clone().requires_grad_(True)
    p = torch.softmax(teacher / 1.5, -1)
    q = torch.softmax(reference_logits / 1.5, -1)
    terms = {
        "forward_kl": lambda: (p * (p / q).log()).sum(-1),
        "reverse_kl": lambda: (q * (q / p).log()).sum(-1),
        "jsd": lambda: 0.5 * (p * (p / (0.5 * p + 0.5 * q)).log()).sum(-1)
        + 0.5 * (q * (q / (0.5 * p + 0.5 * q)).log()).sum(-1),
        "skew_forward_kl": lambda: (p * (p / (0.1 * p + 0.9 * q)).log()).sum(-1),
        "skew_reverse_kl": lambda: (q * (q / (0.1 * q + 0.9 * p)).log()).sum(-1),
        "tvd": lambda: 0.5 * (p - q).abs().sum(-1),
    }
    reference = (terms[loss]() * mask).sum() / mask.sum() * 1.5**2
    reference.backward()
    assert torch.allclose(logits.grad, reference_logits.grad, atol=1e-10)


def test_sliced_logits_equal_contiguous_and_get_full_gradient() -> None:
    """Callers may pass logits[:, :-1]; rows are gathered in place, so the result matches a contiguous copy."""
    student, teacher, mask = random_case(16)
    sliced = student.clone().requires_grad_(True)
    value = distill_loss(sliced[:, :-1], teacher[:, :-1], mask[:, :-1], loss="reverse_kl", chunk_size=3)
    value.backward()
    copy = student[:, :-1].contiguous().requires_grad_(True)
    distill_loss(copy, teacher[:, :-1].contiguous(), mask[:, :-1], loss="reverse_kl").backward()
    assert torch.allclose(sliced.grad[:, :-1], copy.grad, atol=1e-12)
    assert torch.all(sliced.grad[:, -1] == 0)


def test_gradients_reach_student_only() -> None:
    student, teacher, mask = random_case(4)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    distill_loss(student, teacher, mask).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    masked_out = ~mask.bool()
    assert torch.all(student.grad[masked_out] == 0)


def test_retain_graph_second_backward_accumulates_same_gradient() -> None:
    student, teacher, mask = random_case(5)
    student.requires_grad_(True)
    value = 3.0 * distill_loss(student, teacher, mask, loss="jsd")
    value.backward(retain_graph=True)
    first = student.grad.clone()
    value.backward()
    assert torch.allclose(student.grad, 2 * first)


def test_a_second_backward_after_a_zero_output_gradient_is_refused() -> None:
    """The stored gradient was scaled to zero in place, so it cannot be scaled back: refuse rather than return 0."""
    student, teacher, mask = random_case(5)
    student.requires_grad_(True)
    value = distill_loss(student, teacher, mask)
    (0.0 * value).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="kdscope loss: cannot backward again"):
        value.backward()


def test_jsd_beta_limits_follow_trl() -> None:
    """beta == 0 / 1 are forward / reverse KL exactly (TRL); jsd/beta and jsd/(1-beta) tend to them continuously."""
    student, teacher, mask = random_case(6, scale=1.0)  # moderate logits: the O(beta) correction stays small
    forward = float(distill_loss(student, teacher, mask, loss="forward_kl"))
    reverse = float(distill_loss(student, teacher, mask, loss="reverse_kl"))
    assert float(distill_loss(student, teacher, mask, loss="jsd", beta=0.0)) == pytest.approx(forward, rel=1e-12)
    assert float(distill_loss(student, teacher, mask, loss="jsd", beta=1.0)) == pytest.approx(reverse, rel=1e-12)
    eps = 1e-7
    near_zero = float(distill_loss(student, teacher, mask, loss="jsd", beta=eps)) / eps
    near_one = float(distill_loss(student, teacher, mask, loss="jsd", beta=1 - eps)) / eps
    assert near_zero == pytest.approx(forward, rel=1e-4)
    assert near_one == pytest.approx(reverse, rel=1e-4)


def test_skew_alpha_zero_is_plain_kl() -> None:
    student, teacher, mask = random_case(7)
    forward = float(distill_loss(student, teacher, mask, loss="forward_kl"))
    reverse = float(distill_loss(student, teacher, mask, loss="reverse_kl"))
    assert float(distill_loss(student, teacher, mask, loss="skew_forward_kl", alpha=0.0)) == pytest.approx(forward)
    assert float(distill_loss(student, teacher, mask, loss="skew_reverse_kl", alpha=0.0)) == pytest.approx(reverse)


def test_study_sequence_mean_matches_its_formula() -> None:
    """The study: per-sequence sum / per-sequence token count, then mean over the batch, times T^2."""
    student, teacher, mask = random_case(8)
    mask[:, 0] = 1
    t = 2.0
    per_token = torch.sum(
        torch.softmax(teacher / t, -1) * (torch.log_softmax(teacher / t, -1) - torch.log_softmax(student / t, -1)),
        -1,
    )
    study = ((per_token * mask).sum(-1) / mask.sum(-1)).mean() * t**2
    got = distill_loss(student, teacher, mask, temperature=t, reduction="sequence_mean")
    assert float(got) == pytest.approx(float(study), rel=1e-12)


class TinyLM(torch.nn.Module):
    """A linear 'language model' so accumulation can be checked on real parameter gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 8, dtype=torch.float64)
        self.head = torch.nn.Linear(8, VOCAB, dtype=torch.float64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_gradient_accumulation_invariance(reduction: str) -> None:
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, VOCAB, (16, SEQ), generator=g)
    teacher = torch.randn(16, SEQ, VOCAB, generator=g, dtype=torch.float64)
    mask = (torch.rand(16, SEQ, generator=g) > 0.4).long()
    mask[:, 0] = 1

    whole = TinyLM()
    distill_loss(whole(ids), teacher, mask, reduction=reduction, temperature=2.0).backward()

    accumulated = TinyLM()
    micro = [slice(i, i + 4) for i in range(0, 16, 4)]
    batch_count = sum(
        distill_loss_parts(accumulated(ids[s]).detach(), teacher[s], mask[s], reduction=reduction).count for s in micro
    )
    for s in micro:
        parts = distill_loss_parts(accumulated(ids[s]), teacher[s], mask[s], reduction=reduction, temperature=2.0)
        (parts.total / batch_count).backward()

    for a, b in zip(whole.parameters(), accumulated.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-12)


def test_empty_mask_gives_zero_not_nan() -> None:
    student, teacher, _ = random_case(10)
    student.requires_grad_(True)
    value = distill_loss(student, teacher, torch.zeros(BATCH, SEQ))
    value.backward()
    assert float(value.detach()) == 0.0 and torch.all(student.grad == 0)


@pytest.mark.parametrize("loss", LOSS_NAMES)
@pytest.mark.parametrize("tail", ["renormalise", "tail_bucket"])
def test_sparse_with_full_vocab_equals_dense(loss: str, tail: str) -> None:
    student, teacher, mask = random_case(11)
    values, indices = teacher.topk(VOCAB, dim=-1)
    normalizer = torch.logsumexp(teacher / 2.0, -1)
    dense = distill_loss(student, teacher, mask, loss=loss, temperature=2.0)
    sparse = distill_loss_sparse(
        student, values, indices, mask, loss=loss, temperature=2.0, tail=tail, teacher_log_normalizer=normalizer
    )
    assert float(sparse) == pytest.approx(float(dense), rel=1e-10)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_sparse_topk_matches_reference(loss: str) -> None:
    student, teacher, mask = random_case(12)
    t, k = 1.5, 5
    values, indices = teacher.topk(k, dim=-1)
    s, tv, idx, m = student.numpy(), values.numpy(), indices.numpy(), mask.numpy()
    s_topk = np.take_along_axis(s, idx, axis=-1)

    # renormalise: softmax over the k ids on both sides
    got = distill_loss_sparse(student, values, indices, mask, loss=loss, temperature=t)
    want = reference_divergence(_softmax(tv, t), _softmax(s_topk, t), loss, 0.5, 0.1) * t**2
    assert float(got) == pytest.approx(float(want[m > 0].mean()), rel=1e-10)

    # tail bucket: k exact probabilities plus the remaining mass, on each side
    p_full, q_full = _softmax(teacher.numpy(), t), _softmax(s, t)
    p_k = np.take_along_axis(p_full, idx, axis=-1)
    q_k = np.take_along_axis(q_full, idx, axis=-1)
    p = np.concatenate([p_k, 1 - p_k.sum(-1, keepdims=True)], axis=-1)
    q = np.concatenate([q_k, 1 - q_k.sum(-1, keepdims=True)], axis=-1)
    got = distill_loss_sparse(
        student,
        values,
        indices,
        mask,
        loss=loss,
        temperature=t,
        tail="tail_bucket",
        teacher_log_normalizer=torch.logsumexp(teacher / t, -1),
    )
    want = reference_divergence(p, q, loss, 0.5, 0.1) * t**2
    assert float(got) == pytest.approx(float(want[m > 0].mean()), rel=1e-8)


def test_sparse_tail_bucket_requires_normalizer() -> None:
    student, teacher, mask = random_case(13)
    values, indices = teacher.topk(3, dim=-1)
    with pytest.raises(InputError, match="teacher_log_normalizer"):
        distill_loss_sparse(student, values, indices, mask, tail="tail_bucket")


def test_cross_entropy_matches_torch() -> None:
    student, _, mask = random_case(14)
    targets = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    want = torch.nn.functional.cross_entropy(student[mask.bool()], targets[mask.bool()])
    assert float(cross_entropy_loss(student, targets, mask, chunk_size=4)) == pytest.approx(float(want), rel=1e-12)


def test_masks_and_objective() -> None:
    attention = torch.tensor([[1, 1, 1, 0]])
    response = torch.tensor([[0, 1, 1, 1]])
    assert kd_token_mask(attention).tolist() == [[True, True, True, False]]
    assert kd_token_mask(attention, response, "response").tolist() == [[False, True, True, False]]
    with pytest.raises(InputError):
        kd_token_mask(attention, None, "response")
    kd, ce = torch.tensor(2.0), torch.tensor(4.0)
    assert float(student_objective(kd, ce, 0.25)) == pytest.approx(0.75 * 4 + 0.25 * 2)
    assert float(student_objective(kd, None, 1.0)) == 2.0
    with pytest.raises(InputError):
        student_objective(kd, None, 0.5)


def test_bad_options_are_input_errors() -> None:
    student, teacher, mask = random_case(15)
    for kwargs in ({"loss": "kl"}, {"temperature": 0.0}, {"beta": 1.5}, {"alpha": -0.1}):
        with pytest.raises(InputError):
            distill_loss(student, teacher, mask, **kwargs)
    with pytest.raises(InputError, match="align_vocab"):
        distill_loss(student, teacher[..., :-1], mask)
