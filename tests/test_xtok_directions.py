"""The aligned KL's other directions (issue 16): ``xtok_reverse_kl`` (RevKD across tokenizers) and ``xtok_jsd`` (GKD
across tokenizers). With one tokenizer on both sides every span is 1:1 and every token string is shared, so each must
equal the same-tokenizer loss of kdscope.losses (reverse_kl, jsd at the run's beta) - values and gradients."""

from __future__ import annotations

import pytest
import torch

from kdscope.errors import InputError
from kdscope.losses import distill_loss
from kdscope.models import build_tiny_model, tiny_tokenizer
from kdscope.train import TrainSettings
from kdscope.xtok import (
    XTOK_DIVERGENCES,
    XTOK_LOSS_NAMES,
    align_text,
    aligned_batch,
    cross_tokenizer_teacher,
    shared_vocabulary,
    token_spelling,
    xtok_kd_sum,
    xtok_loss_parts,
)

TEXTS = ["Question: what is 12 + 345?  Answer:  357 apples", "naïve café – 東京 🙂 ok", "digits 1234567890 3.14 -42"]


def _same_tokenizer_batch(tok, reduction):
    rows = [align_text(text, tok, tok) for text in TEXTS]
    length = max(len(ids) for ids, _, _ in rows)
    ids = torch.tensor([ids + [tok.pad_token_id] * (length - len(ids)) for ids, _, _ in rows])
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for b, (row_ids, _, _) in enumerate(rows):
        mask[b, 3 : len(row_ids) - 1] = True  # a prompt of 3 tokens; the last position predicts nothing here
    return ids, mask, aligned_batch([a for _, _, a in rows], ids, ids, mask, reduction=reduction)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize(("loss", "divergence", "beta"), [("xtok_reverse_kl", "reverse_kl", 0.5),
                                                          ("xtok_jsd", "jsd", 0.5), ("xtok_jsd", "jsd", 0.9)])
def test_named_directions_equal_the_same_tokenizer_losses(reduction: str, loss: str, divergence: str,
                                                          beta: float) -> None:
    tok = tiny_tokenizer()
    ids, mask, batch = _same_tokenizer_batch(tok, reduction)
    student = torch.randn(*ids.shape, len(tok), generator=torch.Generator().manual_seed(0), requires_grad=True)
    teacher = torch.randn(*ids.shape, len(tok), generator=torch.Generator().manual_seed(1)) * 3
    spell = token_spelling(tok)
    vocab = shared_vocabulary(spell, spell, len(tok), len(tok))
    ours = xtok_loss_parts(student, teacher, batch, vocab, loss, 2.0, beta=beta).mean()
    reference = distill_loss(student, teacher, mask, divergence, temperature=2.0, beta=beta,
                             reduction=reduction)  # type: ignore[arg-type]
    assert abs(float(ours.detach()) - float(reference.detach())) < 1e-6
    (ours_grad,) = torch.autograd.grad(ours, student)
    (reference_grad,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(ours_grad, reference_grad, atol=1e-7, rtol=1e-5)
    # the direction matters: the forward KL on the same logits is another number
    forward = xtok_loss_parts(student, teacher, batch, vocab, "xtok_kl", 2.0).mean()
    assert abs(float(forward.detach()) - float(ours.detach())) > 1e-3


@pytest.mark.parametrize(("loss", "objective"), [("xtok_reverse_kl", "kd"), ("xtok_jsd", "gkd")])
def test_the_training_signal_carries_the_direction_and_beta(loss: str, objective: str) -> None:
    """Through the trainer's path (TrainSettings -> cross_tokenizer_teacher -> xtok_kd_sum) with one tokenizer: the
    sum over the micro-batch's units equals the same-tokenizer loss on the teacher's own logits."""
    teacher_model, tok = build_tiny_model("tiny-qwen-xs", seed=0)
    teacher_model.eval()
    settings = TrainSettings(objective=objective, loss=loss, beta=0.9, seed=3, lora=None)
    assert settings.loss == loss
    signal_fn = cross_tokenizer_teacher(settings, teacher_model, tok, tok, len(tok))
    encoded = [tok(text)["input_ids"] for text in TEXTS]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [tok.pad_token_id] * (width - len(e)) for e in encoded])
    attention = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    kd_mask = attention.bool().clone()
    for b, e in enumerate(encoded):
        kd_mask[b, len(e) - 1] = False  # xtok scores positions that predict a token
    signal = signal_fn(ids, attention)
    assert signal.beta == 0.9 and torch.equal(signal.teacher_input_ids, ids * attention + tok.pad_token_id * (1 - attention))
    student = torch.randn(*ids.shape, len(tok), generator=torch.Generator().manual_seed(4), requires_grad=True)
    summed = xtok_kd_sum(student, signal, kd_mask, loss, 1.0, True, "token_mean")
    with torch.no_grad():
        teacher_logits = teacher_model(input_ids=ids, attention_mask=attention).logits
    reference = distill_loss(student, teacher_logits, kd_mask, XTOK_DIVERGENCES[loss], beta=0.9)
    assert float(summed.detach()) / int(kd_mask.sum()) == pytest.approx(float(reference.detach()), rel=1e-5)


def test_names_and_conflicts() -> None:
    assert set(XTOK_DIVERGENCES) < set(XTOK_LOSS_NAMES) and "uld" in XTOK_LOSS_NAMES
    for loss in XTOK_LOSS_NAMES:
        assert TrainSettings(objective="kd", loss=loss).loss == loss
    tok = tiny_tokenizer()
    ids, mask, batch = _same_tokenizer_batch(tok, "token_mean")
    logits = torch.zeros(*ids.shape, len(tok))
    spell = token_spelling(tok)
    vocab = shared_vocabulary(spell, spell, len(tok), len(tok))
    with pytest.raises(InputError) as e:
        xtok_loss_parts(logits, logits, batch, vocab, "xtok_reverse_kl", divergence="jsd")
    assert "\n" not in str(e.value) and "reverse_kl" in str(e.value)
    with pytest.raises(InputError):
        xtok_loss_parts(logits, logits, batch, vocab, "xtok_bogus")
    for bad in (0.0, -1.0, float("inf"), float("nan")):  # the package's one temperature rule
        with pytest.raises(InputError, match="temperature must be > 0"):
            xtok_loss_parts(logits, logits, batch, vocab, "xtok_kl", bad)
