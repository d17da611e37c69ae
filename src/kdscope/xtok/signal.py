"""The teacher signal of a cross-tokenizer run: the student's batch re-tokenised for the teacher, the teacher's
logits on its own tokens, and the alignment that the loss compares them through.

``CrossTokenizerTeacher`` is a ``kdscope.teacher.TeacherSignal`` (called with the student's input ids and attention
mask), so the trainer calls it as any teacher, on the data's batches and on GKD's on-policy samples alike: whatever
ids the student holds are spelled out as text (``retokenize_for_teacher``) and encoded by the teacher's tokenizer.
The teacher itself runs through ``kdscope.teacher.OnlineTeacher`` (dense), which brings its noise ablation, the base
teacher (adapter off), the finiteness check and the resumable noise generator unchanged.

On the trainer's fused path (``TrainSettings.fused``) ``hidden_signal`` gives the teacher's last hidden states and head
instead of its logits, and ``xtok_fused_kd_sum`` runs both heads inside the loss, chunk by chunk over the aligned
spans: neither model's [batch, seq, vocab] logits exist. A noisy teacher keeps its dense logits (its noise is drawn
over them; only the student side is fused then).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdscope.errors import InputError
from kdscope.fused import DEFAULT_MEMORY_BUDGET_BYTES, LinearHead, fused_teacher_ready, online_teacher_hidden
from kdscope.losses import LossParts, Reduction
from kdscope.padding import pad_rows
from kdscope.teacher import OnlineTeacher, TeacherOutput, logit_width

from .align import Alignment, retokenize_for_teacher
from .batch import AlignedBatch, aligned_batch
from .loss import TeacherRows, head_rows, logits_rows, xtok_fused_parts, xtok_loss_parts
from .vocab import SharedVocabulary, TokenSpelling, decoder_kind, shared_vocabulary, token_spelling


@dataclass(frozen=True)
class CrossTokenizerSignal(TeacherOutput):
    """Dense teacher ``logits`` [batch, teacher seq, teacher vocab] on the teacher's own tokens (right padded), or on
    the fused path its last ``teacher_hidden`` states and ``teacher_head``; the student ids they were made from, one
    alignment per row and where each row's tokens start in the padded rows."""

    teacher_hidden: Tensor | None = None
    teacher_head: LinearHead | None = None
    student_input_ids: Tensor | None = None
    teacher_input_ids: Tensor | None = None
    alignments: tuple[Alignment, ...] = ()
    student_starts: tuple[int, ...] = ()
    vocab: SharedVocabulary | None = None
    beta: float = 0.5  # the run's JSD interpolation (xtok_jsd) and skew (skew losses), as its settings give them
    alpha: float = 0.1

    def teacher_rows(self) -> tuple[TeacherRows, int]:
        """(the teacher's logits at gathered positions, its vocabulary width), from its logits or hidden states."""
        if self.teacher_hidden is not None and self.teacher_head is not None:
            return head_rows(self.teacher_hidden, self.teacher_head), self.teacher_head.vocab
        if self.logits is None:
            raise InputError("a cross-tokenizer signal needs the teacher's logits or its hidden states and head")
        return logits_rows(self.logits), self.logits.shape[-1]


def _prefix_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before any text (a BOS), found by encoding one character."""
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if not plain:
        return []
    first = with_specials.index(plain[0]) if plain[0] in with_specials else 0
    return list(with_specials[:first])


class CrossTokenizerTeacher:
    """A teacher whose tokenizer differs from the student's, queried on every batch."""

    def __init__(self, model: torch.nn.Module, teacher_tokenizer: Any, student_tokenizer: Any, student_width: int,
                 teacher_width: int, *, noise_sigma: float = 0.0, seed: int = 0, disable_adapter: bool = False,
                 temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1) -> None:
        self.online = OnlineTeacher(model, noise_sigma=noise_sigma, seed=seed, disable_adapter=disable_adapter,
                                    temperature=temperature)
        self.teacher_tokenizer = teacher_tokenizer
        self.student_spelling: TokenSpelling = token_spelling(student_tokenizer)
        self.teacher_spelling: TokenSpelling = token_spelling(teacher_tokenizer)
        self.vocab = shared_vocabulary(self.student_spelling, self.teacher_spelling, student_width, teacher_width)
        self.prefix = _prefix_ids(teacher_tokenizer)
        # the space of SentencePiece's prepended '▁' is not text: its decoder strips it, and so does the teacher's text
        self.strip_leading_space = decoder_kind(student_tokenizer) == "sentencepiece"
        pad = teacher_tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else teacher_tokenizer.eos_token_id)
        self.device = self.online.device
        self.beta, self.alpha = beta, alpha

    @property
    def calls(self) -> int:
        """Teacher forward passes so far (as ``OnlineTeacher.calls``; a study's KD job reports them)."""
        return self.online.calls

    def state_dict(self) -> dict[str, Any]:
        return self.online.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.online.load_state_dict(state)

    @property
    def fused_ready(self) -> bool:
        """Whether ``hidden_signal`` can stand in for the logits: a noise-free teacher whose logits are head(hidden)."""
        return self.online.noise_sigma == 0 and fused_teacher_ready(self.online)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> CrossTokenizerSignal:
        teacher_ids, teacher_mask, fields = self._retokenized(input_ids, attention_mask)
        logits = self.online.teacher_logits(teacher_ids, teacher_mask)
        return CrossTokenizerSignal(logits=logits, **fields)

    def hidden_signal(self, input_ids: Tensor, attention_mask: Tensor) -> CrossTokenizerSignal:
        """The same signal with the teacher's last hidden states and head instead of its logits (``fused_ready``)."""
        teacher_ids, teacher_mask, fields = self._retokenized(input_ids, attention_mask)
        state = online_teacher_hidden(self.online, teacher_ids, teacher_mask)
        return CrossTokenizerSignal(teacher_hidden=state.hidden, teacher_head=state.head, **fields)

    def _retokenized(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """The student's rows re-tokenised for the teacher (padded, on its device) and the signal's other fields."""
        rows: list[list[int]] = []
        alignments: list[Alignment] = []
        starts: list[int] = []
        for ids, attended in zip(input_ids.tolist(), attention_mask.bool().tolist(), strict=True):
            kept = [i for i, keep in zip(ids, attended, strict=True) if keep]
            teacher_ids, alignment = retokenize_for_teacher(kept, self.student_spelling, self.teacher_tokenizer,
                                                            self.teacher_spelling, teacher_prefix_ids=self.prefix,
                                                            strip_leading_space=self.strip_leading_space)
            rows.append(teacher_ids)
            alignments.append(alignment)
            starts.append(attended.index(True) if True in attended else 0)  # left padding before the row's tokens
        teacher_ids, teacher_mask = pad_rows(rows, self.pad_id, min_width=1)
        fields = dict(temperature=self.online.temperature, student_input_ids=input_ids.detach().cpu(),
                      teacher_input_ids=teacher_ids, alignments=tuple(alignments), student_starts=tuple(starts),
                      vocab=self.vocab, beta=self.beta, alpha=self.alpha)
        return teacher_ids.to(self.device), teacher_mask.to(self.device), fields


def cross_tokenizer_teacher(settings: Any, teacher_model: torch.nn.Module | None, teacher_tokenizer: Any,
                            student_tokenizer: Any, student_width: int, teacher_width: int | None = None,
                            cached: bool = False) -> CrossTokenizerTeacher:
    """The teacher signal of a run whose loss is one of ``XTOK_LOSS_NAMES`` (``settings``: its ``teacher_topk``,
    ``noise_sigma``, ``seed``, ``base_teacher``, ``temperature`` and, where it has them, ``beta`` and ``alpha``, as
    TrainSettings has them)."""
    loss = getattr(settings, "loss", "xtok_kl")
    if cached:
        raise InputError(f"loss {loss} compares the teacher on its own tokens, which a teacher cache (top-k ids of "
                         "the student's vocabulary) does not hold: run it without the cache")
    if settings.teacher_topk is not None:
        raise InputError(f"teacher top-k {settings.teacher_topk}: loss {loss} needs the teacher's whole "
                         "distribution on its own vocabulary; drop the teacher top-k")
    if teacher_model is None:
        raise InputError(f"loss {loss} needs the teacher model online")
    return CrossTokenizerTeacher(teacher_model, teacher_tokenizer, student_tokenizer, student_width,
                                 teacher_width or logit_width(teacher_model), noise_sigma=settings.noise_sigma,
                                 seed=settings.seed, disable_adapter=settings.base_teacher,
                                 temperature=settings.temperature, beta=getattr(settings, "beta", 0.5),
                                 alpha=getattr(settings, "alpha", 0.1))


def xtok_kd_sum(student_logits: Tensor, signal: CrossTokenizerSignal, kd_mask: Tensor, loss: str,
                temperature: float, scale_by_t2: bool, reduction: Reduction) -> Tensor:
    """The cross-tokenizer KD term of a micro-batch as the trainer's ``_kd_sum`` returns it: a sum that the trainer
    divides by its window's units. The units it counts are the student's masked positions (or sequences); the sum is
    rescaled from aligned spans to those units, so a window of one micro-batch gets exactly the mean over its spans.
    ``kd_mask`` marks student positions as ``losses.kd_token_mask`` does (position t predicts token t+1)."""
    if signal.logits is None:
        raise InputError("a cross-tokenizer loss on student logits needs the teacher's logits (CrossTokenizerTeacher)")
    batch = _aligned(signal, kd_mask, reduction)
    parts = xtok_loss_parts(student_logits, signal.logits, batch, signal.vocab, loss, temperature, scale_by_t2,
                            beta=signal.beta, alpha=signal.alpha)
    return _per_student_units(parts, kd_mask, reduction)


def xtok_fused_kd_sum(student_hidden: Tensor, student_head: LinearHead, signal: CrossTokenizerSignal,
                      kd_mask: Tensor, loss: str, temperature: float, scale_by_t2: bool, reduction: Reduction,
                      memory_budget: int = DEFAULT_MEMORY_BUDGET_BYTES) -> Tensor:
    """``xtok_kd_sum`` from the student's last hidden states [batch, seq, hidden] and head: the student's logits
    exist only chunk by chunk, and the teacher's too when the signal holds its hidden states (``hidden_signal``)."""
    teacher_rows, teacher_width = signal.teacher_rows()
    parts = xtok_fused_parts(student_hidden, student_head, teacher_rows, teacher_width,
                             _aligned(signal, kd_mask, reduction), signal.vocab, loss, temperature, scale_by_t2,
                             beta=signal.beta, alpha=signal.alpha, memory_budget=memory_budget)
    return _per_student_units(parts, kd_mask, reduction)


def _aligned(signal: CrossTokenizerSignal, kd_mask: Tensor, reduction: Reduction) -> AlignedBatch:
    if signal.student_input_ids is None or signal.teacher_input_ids is None:
        raise InputError("a cross-tokenizer loss needs the signal of kdscope.xtok.CrossTokenizerTeacher")
    return aligned_batch(signal.alignments, signal.student_input_ids, signal.teacher_input_ids, kd_mask.cpu(),
                         student_starts=signal.student_starts, reduction=reduction)


def _per_student_units(parts: LossParts, kd_mask: Tensor, reduction: Reduction) -> Tensor:
    """The span sum rescaled to the student's units (masked positions, or sequences) that the trainer counts."""
    mask = kd_mask.to(torch.bool)
    units = int(mask.sum()) if reduction == "token_mean" else int((mask.sum(-1) > 0).sum())
    return parts.total * (units / parts.count) if parts.count else parts.total
