"""kdscope's training step against a restatement of the study's (study.md section 2 and the released trainer).

The restatement below uses plain torch only, no kdscope loss or batching code:
- tokenisation: the tokenizer's defaults (BOS for a Llama-3-like tokenizer), cut at the cutoff, EOS appended when
  there is room and the text did not already end with it;
- forward and reverse KL: both logit sets divided by T, the divergence summed over the vocabulary at EVERY attended
  position (the logits are not shifted: the position of the last token counts too), averaged over each sequence's
  positions, then over the sequences, times T^2;
- GKD: generalized JSD with beta = 0.5 and no temperature, masked by the labels (every attended position of the
  off-policy batch), averaged over all masked positions of the micro-batch (one token mean, not per sequence);
- GKD's on-policy samples: up to (cutoff - longest prompt of the micro-batch) new tokens at temperature 1, top_k 0.

The study's copy adds 1e-9 to the probabilities inside its KL for numerical safety; the restatement takes it as an
argument (0 for the comparison at 1e-6) and the last test bounds what it changes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from bos_tokenizer import bos_model
from kdscope.models import build_tiny_model
from kdscope.prompts import build_prompt, encode_example
from kdscope.synthetic import generate_domain
from kdscope.teacher import OnlineTeacher
from kdscope.train import TrainSettings, batch_loss, collate, on_policy_batch, window_units

CUTOFF = 80
EXAMPLES = generate_domain("math", 4, seed=3)[:6]


# --------------------------------------------------------------------------------------------------------------------
# The study's step, restated
# --------------------------------------------------------------------------------------------------------------------
def study_tokenize(tok, text: str, cutoff: int, add_eos: bool = True) -> list[int]:
    ids = tok(text, truncation=True, max_length=cutoff)["input_ids"]
    if add_eos and ids[-1] != tok.eos_token_id and len(ids) < cutoff:
        ids = ids + [tok.eos_token_id]
    return ids


@torch.no_grad()
def _logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of one sequence alone: what the study's padded batch computes at its attended positions."""
    return model(input_ids=torch.tensor([ids])).logits[0].double()


def study_kl(student, teacher, sequences: list[list[int]], kind: str, temperature: float, eps: float = 0.0) -> float:
    per_sequence = []
    for ids in sequences:
        s, t = _logits(student, ids) / temperature, _logits(teacher, ids) / temperature
        log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
        if kind == "forward_kl":  # F.kl_div(log q, p + eps) summed over the vocabulary
            p = log_p.exp() + eps
            kl = (p * (p.log() - log_q)).sum(-1)
        else:  # sum q_eps * (log q - log p)
            kl = ((log_q.exp() + eps) * (log_q - log_p)).sum(-1)
        per_sequence.append(kl.sum() / len(ids))  # every attended position, the last one included
    return float(torch.stack(per_sequence).mean()) * temperature**2


def study_gkd_jsd(student, teacher, sequences: list[list[int]], beta: float = 0.5) -> float:
    total, count = 0.0, 0
    for ids in sequences:
        log_q, log_p = F.log_softmax(_logits(student, ids), -1), F.log_softmax(_logits(teacher, ids), -1)
        log_m = torch.logsumexp(torch.stack([log_q + math.log(beta), log_p + math.log(1 - beta)]), 0)
        kl_teacher = (log_p.exp() * (log_p - log_m)).sum(-1)
        kl_student = (log_q.exp() * (log_q - log_m)).sum(-1)
        total += float((beta * kl_teacher + (1 - beta) * kl_student).sum())
        count += len(ids)
    return total / count  # labels != -100: every attended position, one mean over the micro-batch


def study_on_policy_tokens(student, tok, prompts: list[list[int]], cutoff: int) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(temperature=1.0, do_sample=True, top_k=0, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
    out = student.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                           max_new_tokens=cutoff - width)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# kdscope on the same micro-batch
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["bos", "plain"])
def models(request: pytest.FixtureRequest):
    """A pair whose tokenizer prepends BOS (Llama-3-like) and one whose tokenizer adds nothing (Qwen2.5-like)."""
    torch.set_num_threads(1)
    build = bos_model if request.param == "bos" else build_tiny_model
    student, tok = build("tiny-qwen-xs", seed=11)
    teacher, _ = build("tiny-qwen-s", seed=12)
    with torch.no_grad():  # peaked, position-dependent distributions: a fresh init's are near-uniform everywhere,
        for model in (student, teacher):  # which would hide how positions are weighted
            model.get_output_embeddings().weight.mul_(40.0)
    return student.eval(), teacher.eval(), tok


def _kdscope_loss(student, teacher, tok, settings: TrainSettings) -> float:
    encoded = [encode_example(tok, ex, "study", CUTOFF) for ex in EXAMPLES]
    batch = collate(encoded, tok.pad_token_id, settings.token_mask)
    signal = OnlineTeacher(teacher, temperature=settings.temperature)
    with torch.no_grad():
        return float(batch_loss(student, batch, settings, signal, window_units([batch], settings)).total)


def test_tokenisation_is_the_studys(models) -> None:
    _, _, tok = models
    for ex in EXAMPLES:
        text = build_prompt(ex, "study", train=True) + ex.output
        assert encode_example(tok, ex, "study", CUTOFF).input_ids == study_tokenize(tok, text, CUTOFF)
    if tok.bos_token_id is not None:
        assert encode_example(tok, EXAMPLES[0], "study", CUTOFF).input_ids[0] == tok.bos_token_id


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_step_equals_the_studys(models, loss: str, temperature: float) -> None:
    student, teacher, tok = models
    sequences = [study_tokenize(tok, build_prompt(e, "study", train=True) + e.output, CUTOFF) for e in EXAMPLES]
    expected = study_kl(student, teacher, sequences, loss, temperature)
    got = _kdscope_loss(student, teacher, tok, TrainSettings(objective="kd", loss=loss, temperature=temperature))
    assert got == pytest.approx(expected, abs=1e-6, rel=1e-6)


def test_gkd_step_equals_the_studys(models) -> None:
    student, teacher, tok = models
    sequences = [study_tokenize(tok, build_prompt(e, "study", train=True) + e.output, CUTOFF) for e in EXAMPLES]
    expected = study_gkd_jsd(student, teacher, sequences)
    got = _kdscope_loss(student, teacher, tok, TrainSettings(objective="gkd"))  # the study's GKD needs no options
    assert got == pytest.approx(expected, abs=1e-6, rel=1e-6)


def test_gkd_on_policy_samples_are_the_studys(models) -> None:
    student, _, tok = models
    settings = TrainSettings(objective="gkd", max_length=CUTOFF)
    encoded = [encode_example(tok, ex, "study", CUTOFF) for ex in EXAMPLES[:4]]
    batch = collate(encoded, tok.pad_token_id, settings.token_mask)
    prompts = [study_tokenize(tok, build_prompt(e, "study", train=True), CUTOFF, add_eos=False) for e in EXAMPLES[:4]]
    assert batch.prompts == prompts
    torch.manual_seed(123)
    expected = study_on_policy_tokens(student, tok, prompts, CUTOFF)
    torch.manual_seed(123)
    sampled = on_policy_batch(student, tok, batch, settings)
    lengths = sampled.attention_mask.sum(-1).tolist()
    got = [sampled.input_ids[i, len(p): lengths[i]].tolist() for i, p in enumerate(prompts)]
    assert got == expected
    assert max(len(p) + len(s) for p, s in zip(prompts, got)) == CUTOFF  # an untrained student rarely stops early


def test_the_studys_epsilon_changes_the_kl_by_less_than_its_bound(models) -> None:
    """What the restatement leaves out: 1e-9 added to every probability moves each position's KL by at most
    1e-9 * sum over the vocabulary of |log-ratio| + vocab * 1e-9."""
    student, teacher, tok = models
    sequences = [study_tokenize(tok, build_prompt(e, "study", train=True) + e.output, CUTOFF) for e in EXAMPLES]
    exact = study_kl(student, teacher, sequences, "forward_kl", 1.0)
    with_eps = study_kl(student, teacher, sequences, "forward_kl", 1.0, eps=1e-9)
    assert abs(with_eps - exact) < 1e-9 * len(tok) * 50
