"""Teacher signal for distillation: what the student is trained to match, and the study's ablations of it.

A provider is any callable ``(input_ids, attention_mask) -> TeacherOutput``. ``OnlineTeacher`` runs a Hugging Face
causal LM under ``torch.no_grad`` and can (a) add seeded Gaussian noise of scale sigma to its logits (study ablation b),
(b) run the teacher without its LoRA adapter (study ablation a, "base teacher"; a separately loaded base model works as
a plain ``OnlineTeacher`` too), (c) keep only the top-k logits per position (sparse signal, see
``kdscope.losses.distill_loss_sparse``). Non-finite teacher logits on attended positions raise
``TeacherSignalError`` instead of being trained on.

Vocabulary alignment: Qwen2.5-7B/14B emit 152,064 logits and the smaller Qwen2.5 models 151,936, with one tokenizer
(151,665 ids). The extra rows are padding. ``check_same_tokenizer`` and ``check_vocab_widths`` verify that the ids
mean the same tokens and that every real id survives truncation (``common_vocab_width`` runs both); ``align_vocab``
then cuts both logit tensors to the common width, as the study's code does. Every teacher path (online, cache, GKD's
fallback) cuts the teacher to that width before noise, top-k and normaliser, so padding rows never enter them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from kdscope.errors import InputError
from kdscope.labels import DEFAULT_TEMPERATURE, check_temperature

MAX_REPORTED = 5
"""How many offending ids or positions an error message lists before summarising."""


class TeacherSignalError(RuntimeError):
    """The teacher produced logits that must not be trained on (NaN or inf on attended positions)."""


@dataclass(frozen=True)
class TeacherOutput:
    """Teacher signal aligned with the input positions: dense ``logits`` [batch, seq, vocab], or the top-k form
    ``topk_values`` (raw logits) and ``topk_indices`` [batch, seq, k] with ``topk_log_normalizer`` [batch, seq] =
    logsumexp(logits / temperature) over the full (aligned) vocabulary and ``topk_log_tail`` [batch, seq] = the log of
    the teacher's probability mass outside the top-k ids at ``temperature`` (-inf when k covers the vocabulary). The
    tail-bucket loss needs both; the tail is computed from the dense logits, because 1 - sum(top-k probabilities)
    loses any tail below the rounding of the top-k values."""

    logits: Tensor | None = None
    topk_values: Tensor | None = None
    topk_indices: Tensor | None = None
    topk_log_normalizer: Tensor | None = None
    temperature: float = DEFAULT_TEMPERATURE
    topk_log_tail: Tensor | None = None


class TeacherSignal(Protocol):
    """Anything that turns a batch into teacher signal."""

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> TeacherOutput: ...


class _Vocabulary(Protocol):
    """The part of a Hugging Face tokenizer that the checks use."""

    def get_vocab(self) -> dict[str, int]: ...

    def __len__(self) -> int: ...


def _id_to_token(tokenizer: _Vocabulary) -> dict[int, str]:
    return {token_id: token for token, token_id in tokenizer.get_vocab().items()}


def check_same_tokenizer(teacher_tokenizer: _Vocabulary, student_tokenizer: _Vocabulary) -> None:
    """Raise InputError unless every id both tokenizers define maps to the same token in both.

    Distillation compares distributions id by id, so a different tokenizer makes the loss meaningless even when the
    logit widths happen to match.
    """
    teacher_tokens = _id_to_token(teacher_tokenizer)
    student_tokens = _id_to_token(student_tokenizer)
    shared = min(len(teacher_tokenizer), len(student_tokenizer))
    differing = [
        i for i in range(shared) if teacher_tokens.get(i) != student_tokens.get(i)
    ]
    if differing:
        examples = ", ".join(
            f"id {i}: teacher {teacher_tokens.get(i)!r} vs student {student_tokens.get(i)!r}"
            for i in differing[:MAX_REPORTED]
        )
        raise InputError(
            f"teacher and student tokenizers differ on {len(differing)} of {shared} shared ids ({examples}): "
            "distillation on token ids needs one tokenizer; pick a teacher and student of the same model family, "
            "or distil across tokenizers with --loss xtok_kl or --loss uld"
        )


def check_vocab_widths(tokenizer_size: int, student_width: int, teacher_width: int) -> int:
    """Return the common logit width, after checking that every real token id is below it.

    Truncating to the common width is only safe when the dropped rows are padding, i.e. the tokenizer has no id at or
    beyond the narrower head.
    """
    common = min(student_width, teacher_width)
    if tokenizer_size > common:
        raise InputError(
            f"tokenizer has {tokenizer_size} ids but the narrower model head has {common} logits "
            f"(student {student_width}, teacher {teacher_width}): the heads do not cover the vocabulary"
        )
    return common


def real_ids(tokenizer: _Vocabulary) -> int:
    """One past the highest id the tokenizer defines (added tokens included): logit rows at or beyond it are padding."""
    return max(len(tokenizer), 1 + max(tokenizer.get_vocab().values(), default=-1))


def common_vocab_width(teacher_tokenizer: _Vocabulary, student_tokenizer: _Vocabulary, teacher_width: int,
                       student_width: int) -> int:
    """The logit width teacher and student are compared on: the narrower head, after checking by token strings that
    both tokenizers give every shared id the same token and that every real id of either lies below that width (so
    the rows cut off are padding, e.g. Qwen2.5-7B's 152,064 vs 1.5B's 151,936 over 151,665 ids)."""
    check_same_tokenizer(teacher_tokenizer, student_tokenizer)
    return check_vocab_widths(max(real_ids(teacher_tokenizer), real_ids(student_tokenizer)), student_width,
                              teacher_width)


def logit_width(model: torch.nn.Module) -> int:
    """Rows of the model's LM head (its logit width), which may exceed the tokenizer's ids (padding rows)."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    return int(head.weight.shape[0])


def normalizer_and_tail(logits: Tensor, indices: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(logsumexp(logits / T), log of the mass outside ``indices`` at T) of dense ``logits`` [..., vocab], float32.

    The tail is summed over the ids outside the top-k, never taken as 1 - sum(top-k), which cancels to nothing when
    the top-k hold almost all the mass (-inf when ``indices`` cover the vocabulary)."""
    scaled = logits.float() / temperature
    log_normalizer = torch.logsumexp(scaled, dim=-1)
    scaled.scatter_(-1, indices, float("-inf"))
    return log_normalizer, torch.logsumexp(scaled, dim=-1) - log_normalizer


def topk_signal(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top-k raw logits, their ids, logsumexp(logits / T), log of the mass outside the top-k at T) of ``logits``."""
    values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return values, indices, *normalizer_and_tail(logits, indices, temperature)


def align_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Cut both logit tensors to their common width (a view; the padding rows are dropped)."""
    common = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :common], teacher_logits[..., :common]


def check_finite(logits: Tensor, attention_mask: Tensor, batch_index: int | None = None) -> None:
    """Raise TeacherSignalError naming the (row, position) pairs whose logits hold NaN or inf.

    Only attended positions count: padding positions are never trained on, and some attention kernels legitimately
    produce NaN on fully masked rows.
    """
    bad = ~torch.isfinite(logits).all(dim=-1) & attention_mask.to(torch.bool)
    if not bool(bad.any()):
        return
    positions = bad.nonzero().tolist()
    listed = ", ".join(f"(row {row}, position {pos})" for row, pos in positions[:MAX_REPORTED])
    more = f" and {len(positions) - MAX_REPORTED} more" if len(positions) > MAX_REPORTED else ""
    where = f"batch {batch_index}: " if batch_index is not None else ""
    raise TeacherSignalError(
        f"{where}teacher logits are NaN or inf at {len(positions)} attended positions: {listed}{more}; "
        "the batch was not trained on (check the teacher's dtype and weights)"
    )


class OnlineTeacher:
    """A teacher model queried on every batch (dense or top-k signal, optional noise, optional adapter off).

    Args:
        model: a causal LM returning ``.logits``; put in eval mode here (the study runs the teacher in eval mode).
        topk: keep only the k largest logits per position (None: dense).
        noise_sigma: standard deviation of Gaussian noise added to the teacher logits (0: none).
        seed: seed of the noise generator; ``state_dict``/``load_state_dict`` carry it across a resume.
        disable_adapter: run a PEFT teacher with its adapter disabled (the "base teacher" ablation).
        vocab_width: cut the teacher logits to this width first (the student's), so padding rows never enter top-k.
        temperature: the loss temperature; only used for ``topk_log_normalizer``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        topk: int | None = None,
        noise_sigma: float = 0.0,
        seed: int = 0,
        disable_adapter: bool = False,
        vocab_width: int | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        if topk is not None and topk < 1:
            raise InputError(f"teacher top-k must be >= 1, got {topk}")
        if noise_sigma < 0:
            raise InputError(f"teacher noise sigma must be >= 0, got {noise_sigma}")
        if disable_adapter and not hasattr(model, "disable_adapter"):
            raise InputError(
                "disable_adapter needs a PEFT teacher with a LoRA adapter; for a plain model load the base model "
                "as the teacher instead"
            )
        check_temperature(temperature)
        self.model = model.eval()
        self.topk = topk
        self.noise_sigma = noise_sigma
        self.disable_adapter = disable_adapter
        self.vocab_width = vocab_width
        self.temperature = temperature
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.calls = 0

    def state_dict(self) -> dict[str, Any]:
        """Noise generator state and call count, so a resumed run draws the same noise."""
        return {"generator": self.generator.get_state(), "calls": self.calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.calls = int(state["calls"])

    @contextlib.contextmanager
    def _adapter_context(self) -> Iterator[None]:
        if self.disable_adapter:
            with self.model.disable_adapter():  # type: ignore[operator]
                yield
        else:
            yield

    def teacher_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Dense teacher logits (cut to ``vocab_width``, noise added), checked finite on attended positions."""
        with torch.no_grad(), self._adapter_context():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            if self.vocab_width is not None:
                logits = logits[..., : self.vocab_width]
            check_finite(logits, attention_mask, batch_index=self.calls)
            if self.noise_sigma > 0:
                noise = torch.randn(logits.shape, generator=self.generator, device=logits.device, dtype=torch.float32)
                logits = logits.float() + self.noise_sigma * noise
        self.calls += 1
        return logits

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> TeacherOutput:
        logits = self.teacher_logits(input_ids, attention_mask)
        if self.topk is None:
            return TeacherOutput(logits=logits, temperature=self.temperature)
        values, indices, log_normalizer, log_tail = topk_signal(logits, self.topk, self.temperature)
        return TeacherOutput(
            topk_values=values,
            topk_indices=indices,
            topk_log_normalizer=log_normalizer,
            temperature=self.temperature,
            topk_log_tail=log_tail,
        )
