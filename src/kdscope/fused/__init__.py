"""Fused LM head + loss: KD divergences, cross-entropy and the teacher cache's top-k without vocabulary-sized logits.

The plain path runs each model to its logits, [batch, seq, vocab] per model plus the gradient of the student's, and
then takes the loss chunk by chunk (kdscope.losses). Here the models stop at their last hidden states and the heads
run inside the loss: per chunk of masked rows the student head (with grad), the teacher head (no grad), temperature,
divergence (``losses.divergence_rows``, the same functions as the plain path) and T^2 factor, after which the chunk's
gradient with respect to its logits is turned at once into gradients for the hidden rows, the head weight and the
bias (Liger-Kernel's trick: the backward is computed in the forward, so no chunk's logits outlive the chunk). At most
one chunk's [rows, vocab] temporaries are alive; nothing of size [batch x seq, vocab] is ever allocated.

Values equal the plain path's: the same per-row formulas in the same float32 (or wider) arithmetic on the same logits
(``F.linear`` in the head's dtype, then upcast), the same row weights (``token_mean``: 1; ``sequence_mean``:
1 / sequence length) and counts, so ``LossParts.total`` / unit count of the accumulation window gives the trainer's
gradient under accumulation exactly as ``losses.distill_loss_parts`` does (tests/test_fused.py checks to 1e-5).

Vocabulary alignment: a teacher head wider than the student's (Qwen2.5-7B's 152,064 vs 151,936) is cut to the common
width, as ``kdscope.teacher.align_vocab`` cuts logits; the rows beyond are padding.

Noise (the study's noisy-teacher ablation): N(0, sigma^2) is added to every teacher logit in float32, generated chunk
by chunk, row r of the call from its own generator seeded with ``noise_row_seed(seed, r)``. The noise is therefore
i.i.d. N(0, sigma^2) on every (row, id), the same distribution as ``OnlineTeacher(noise_sigma=...)`` draws over the full
logits (not the same numbers: that one draws one [batch, seq, vocab] block from a running generator), and it does not
depend on the chunk size; ``teacher_noise`` rebuilds the whole [rows, vocab] draw for a dense reference.

Architectures whose logits are not ``head(last hidden state)`` (final-logit softcapping, scaled logits, a LoRA or
quantised head) are detected by ``fused_supported``; callers fall back to the plain path.
"""

from .api import chunked_topk, fused_cross_entropy_parts, fused_distill_parts, fused_distill_sparse_parts
from .engine import DEFAULT_MEMORY_BUDGET_BYTES, chunk_rows, masked_row_weights, noise_row_seed, teacher_noise
from .heads import LinearHead, fused_supported, fused_unsupported_reason, last_hidden_states
from .online import TeacherHidden, fused_teacher_ready, online_teacher_hidden

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "LinearHead",
    "TeacherHidden",
    "chunk_rows",
    "chunked_topk",
    "fused_cross_entropy_parts",
    "fused_distill_parts",
    "fused_distill_sparse_parts",
    "fused_supported",
    "fused_teacher_ready",
    "fused_unsupported_reason",
    "last_hidden_states",
    "masked_row_weights",
    "noise_row_seed",
    "online_teacher_hidden",
    "teacher_noise",
]
