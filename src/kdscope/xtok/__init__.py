"""Cross-tokenizer distillation: a teacher and a student with different tokenizers (issue 16).

- ``vocab``: byte-normalised token spellings and the shared part of two vocabularies;
- ``align``: alignment of two tokenisations of one text by offsets (spans, 1:1 or merged), masks mapped through it,
  and re-tokenisation of student ids (GKD samples) for the teacher;
- ``batch``: a batch of alignments flattened into the positions the losses gather;
- ``loss``: ``xtok_kl`` (exact KL on the shared vocabulary, one tail bucket per side; ``xtok_reverse_kl`` and
  ``xtok_jsd`` the same outcomes in the reverse direction and with the JSD) and ``uld`` (sorted-probability
  L1), chunked over spans, on logits or fused with the LM heads;
- ``signal``: the teacher signal of a training run (the student's batch, or GKD's samples, re-tokenised for the
  teacher) and the KD term the trainer adds.

Layer: above ``losses`` and ``fused``, below ``cache`` and ``train``.
"""

from .align import (
    AlignedSpan,
    Alignment,
    align_offsets,
    align_text,
    byte_offsets_of_ids,
    retokenize_for_teacher,
)
from .batch import AlignedBatch, SideIndex, aligned_batch
from .loss import (XTOK_DIVERGENCES, XTOK_LOSS_NAMES, bucket_log_probs, head_rows, logits_rows, xtok_fused_parts,
                   xtok_loss_parts)
from .signal import (CrossTokenizerSignal, CrossTokenizerTeacher, cross_tokenizer_teacher, xtok_fused_kd_sum,
                     xtok_kd_sum)
from .vocab import SharedVocabulary, TokenSpelling, decoder_kind, shared_vocabulary, token_spelling

__all__ = [
    "XTOK_DIVERGENCES",
    "XTOK_LOSS_NAMES",
    "AlignedBatch",
    "AlignedSpan",
    "Alignment",
    "CrossTokenizerSignal",
    "CrossTokenizerTeacher",
    "SharedVocabulary",
    "SideIndex",
    "TokenSpelling",
    "align_offsets",
    "align_text",
    "aligned_batch",
    "bucket_log_probs",
    "cross_tokenizer_teacher",
    "byte_offsets_of_ids",
    "decoder_kind",
    "head_rows",
    "logits_rows",
    "retokenize_for_teacher",
    "shared_vocabulary",
    "token_spelling",
    "xtok_fused_kd_sum",
    "xtok_fused_parts",
    "xtok_kd_sum",
    "xtok_loss_parts",
]
