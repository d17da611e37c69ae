"""kdscope.teacher: online teacher (dense, top-k, noise, adapter off), vocabulary alignment, error reporting."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from kdscope.errors import InputError
from kdscope.losses import distill_loss, distill_loss_sparse
from kdscope.teacher import (
    OnlineTeacher,
    TeacherSignalError,
    align_vocab,
    check_finite,
    check_same_tokenizer,
    check_vocab_widths,
)

QWEN_SMALL_WIDTH = 151936  # Qwen2.5-0.5B/1.5B/3B lm_head rows
QWEN_LARGE_WIDTH = 152064  # Qwen2.5-7B/14B lm_head rows


def tiny_qwen(vocab_size: int, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(words)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=words[0])))


def batch(vocab: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 6), generator=g)
    attention = torch.ones(2, 6, dtype=torch.long)
    attention[1, 4:] = 0
    return ids, attention


@pytest.fixture(scope="module")
def small_teacher() -> Qwen2ForCausalLM:
    return tiny_qwen(64, seed=1)


def test_qwen_152064_vs_151936_alignment() -> None:
    """A 7B/14B-width teacher and a 0.5B-width student with one tokenizer: check, truncate, distil."""
    teacher_model = tiny_qwen(QWEN_LARGE_WIDTH, seed=1)
    student_model = tiny_qwen(QWEN_SMALL_WIDTH, seed=2)
    tokenizer = word_tokenizer([f"w{i}" for i in range(100)])
    check_same_tokenizer(tokenizer, tokenizer)
    common = check_vocab_widths(len(tokenizer), QWEN_SMALL_WIDTH, QWEN_LARGE_WIDTH)
    assert common == QWEN_SMALL_WIDTH

    ids, attention = batch()
    teacher_logits = OnlineTeacher(teacher_model)(ids, attention).logits
    student_logits = student_model(input_ids=ids, attention_mask=attention).logits
    assert teacher_logits.shape[-1] == QWEN_LARGE_WIDTH and student_logits.shape[-1] == QWEN_SMALL_WIDTH
    student_aligned, teacher_aligned = align_vocab(student_logits, teacher_logits)
    assert student_aligned.shape == teacher_aligned.shape == (2, 6, QWEN_SMALL_WIDTH)
    assert torch.equal(teacher_aligned, teacher_logits[..., :QWEN_SMALL_WIDTH])
    loss = distill_loss(student_aligned, teacher_aligned, attention, chunk_size=4)
    loss.backward()
    assert torch.isfinite(loss) and student_model.lm_head.weight.grad is not None


def test_vocab_width_check_rejects_ids_beyond_the_narrow_head() -> None:
    with pytest.raises(InputError, match="151937 ids"):
        check_vocab_widths(QWEN_SMALL_WIDTH + 1, QWEN_SMALL_WIDTH, QWEN_LARGE_WIDTH)


def test_tokenizer_mismatch_names_the_ids() -> None:
    teacher = word_tokenizer(["a", "b", "c", "d"])
    student = word_tokenizer(["a", "b", "x", "d", "e"])
    with pytest.raises(InputError, match=r"1 of 4 shared ids \(id 2: teacher 'c' vs student 'x'\)"):
        check_same_tokenizer(teacher, student)


def test_same_tokenizer_with_extra_ids_passes_on_shared_range() -> None:
    check_same_tokenizer(word_tokenizer(["a", "b", "c"]), word_tokenizer(["a", "b", "c", "d"]))


def test_dense_teacher_is_no_grad_and_eval(small_teacher: Qwen2ForCausalLM) -> None:
    ids, attention = batch()
    small_teacher.train()
    teacher = OnlineTeacher(small_teacher)
    out = teacher(ids, attention)
    assert not small_teacher.training
    assert out.logits is not None and not out.logits.requires_grad
    with torch.no_grad():
        want = small_teacher(input_ids=ids, attention_mask=attention).logits
    assert torch.equal(out.logits, want)


def test_topk_teacher_matches_dense_topk_and_feeds_sparse_loss(small_teacher: Qwen2ForCausalLM) -> None:
    ids, attention = batch()
    dense = OnlineTeacher(small_teacher)(ids, attention).logits
    out = OnlineTeacher(small_teacher, topk=8, temperature=2.0)(ids, attention)
    values, indices = dense.topk(8, dim=-1)
    assert torch.equal(out.topk_values, values) and torch.equal(out.topk_indices, indices)
    assert torch.allclose(out.topk_log_normalizer, torch.logsumexp(dense / 2.0, -1))
    student = torch.randn(2, 6, 64, requires_grad=True)
    loss = distill_loss_sparse(
        student,
        out.topk_values,
        out.topk_indices,
        attention,
        temperature=2.0,
        tail="tail_bucket",
        teacher_log_normalizer=out.topk_log_normalizer,
    )
    loss.backward()
    assert torch.isfinite(loss) and student.grad is not None


def test_topk_tail_is_summed_over_the_ids_outside_the_topk(small_teacher: Qwen2ForCausalLM) -> None:
    """The tail mass comes from the dense logits, not from 1 - sum(top-k), and the sparse loss with it equals the
    dense loss when the tail is a single id (k = vocab - 1), where the tail bucket is exact."""
    ids, attention = batch()
    dense = OnlineTeacher(small_teacher)(ids, attention).logits.double()
    width = dense.shape[-1]
    for k in (8, width - 1):
        out = OnlineTeacher(small_teacher, topk=k, temperature=2.0)(ids, attention)
        probs = torch.softmax(dense / 2.0, dim=-1)
        outside = probs.sum(-1) - probs.gather(-1, out.topk_indices).sum(-1)
        assert torch.allclose(out.topk_log_tail.double(), outside.log(), atol=1e-5)
    student = torch.randn(2, 6, width, dtype=torch.float64)
    sparse = distill_loss_sparse(student, out.topk_values.double(), out.topk_indices, attention, "reverse_kl", 2.0,
                                 tail="tail_bucket", teacher_log_normalizer=out.topk_log_normalizer,
                                 teacher_log_tail=out.topk_log_tail)
    reference = distill_loss(student, dense, attention, "reverse_kl", 2.0)
    assert torch.allclose(sparse, reference, rtol=1e-5)


def test_topk_ignores_padding_rows_beyond_vocab_width(small_teacher: Qwen2ForCausalLM) -> None:
    ids, attention = batch()
    out = OnlineTeacher(small_teacher, topk=5, vocab_width=40)(ids, attention)
    assert int(out.topk_indices.max()) < 40


def test_noise_is_seeded_with_the_right_std() -> None:
    model = tiny_qwen(4096, seed=3)
    ids, attention = batch()
    clean = OnlineTeacher(model)(ids, attention).logits
    first = OnlineTeacher(model, noise_sigma=2.0, seed=7)
    noisy_a = first(ids, attention).logits
    noisy_b = OnlineTeacher(model, noise_sigma=2.0, seed=7)(ids, attention).logits
    noisy_c = OnlineTeacher(model, noise_sigma=2.0, seed=8)(ids, attention).logits
    assert torch.equal(noisy_a, noisy_b) and not torch.equal(noisy_a, noisy_c)
    noise = noisy_a - clean
    assert float(noise.std()) == pytest.approx(2.0, rel=0.02)
    assert abs(float(noise.mean())) < 0.02
    # a resumed provider draws the noise the uninterrupted one would have drawn next
    state = first.state_dict()
    following = first(ids, attention).logits
    resumed = OnlineTeacher(model, noise_sigma=2.0, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(ids, attention).logits, following)


def test_base_teacher_disables_the_lora_adapter() -> None:
    base = tiny_qwen(64, seed=4)
    ids, attention = batch()
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=attention).logits
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tuned = get_peft_model(base, config)
    adapted = OnlineTeacher(tuned)(ids, attention).logits
    without = OnlineTeacher(tuned, disable_adapter=True)(ids, attention).logits
    assert not torch.allclose(adapted, base_logits)
    assert torch.allclose(without, base_logits, atol=1e-6)
    assert torch.equal(OnlineTeacher(tuned)(ids, attention).logits, adapted)  # the adapter is back afterwards


def test_disable_adapter_on_plain_model_is_an_input_error(small_teacher: Qwen2ForCausalLM) -> None:
    with pytest.raises(InputError, match="PEFT"):
        OnlineTeacher(small_teacher, disable_adapter=True)


def test_non_finite_teacher_logits_are_reported_with_positions() -> None:
    logits = torch.zeros(2, 4, 5)
    logits[0, 2, 1] = float("nan")
    logits[1, 1, 0] = float("inf")
    logits[1, 3, 0] = float("nan")  # padding: ignored
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with pytest.raises(TeacherSignalError, match=r"batch 3: .* 2 attended positions: \(row 0, position 2\), "
                       r"\(row 1, position 1\)"):
        check_finite(logits, attention, batch_index=3)
    check_finite(logits[:, :2][:1], attention[:1, :2])


def test_online_teacher_raises_on_nan_model_output() -> None:
    ids, attention = batch()
    broken = tiny_qwen(64, seed=5)
    with torch.no_grad():
        broken.lm_head.weight[3].fill_(float("nan"))
    with pytest.raises(TeacherSignalError, match="batch 0"):
        OnlineTeacher(broken)(ids, attention)
