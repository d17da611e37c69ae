"""Cross-tokenizer distillation losses on aligned spans: ``xtok_kl`` (exact KL on the shared vocabulary) and ``uld``.

Per aligned span (see ``batch.py``) each side gives the distribution of the span's first token, log_softmax(logits /
T) at the position before it, and the log-probability of the span's whole text, the sum of its tokens' conditional
log-probabilities at T.

``xtok_kl``. A 1:1 span (one token on each side writing the same text, after the same text) compares the two
next-token distributions exactly on the outcomes both vocabularies can write: every byte string both spell is one
outcome (ids of one side writing the same bytes add up), and all the rest is one tail bucket on each side (the
teacher's mass on strings the student cannot write in one token against the student's on strings the teacher cannot).
The tail is dropped when both sides leave it empty (one tokenizer on both sides: the loss then equals
``losses.distill_loss`` exactly); when only the student's is empty its mass is floored at ``TAIL_MASS_FLOOR`` (the
teacher's tail is then an outcome the student cannot produce, an infinite KL otherwise). A merged span (boundaries that
do not coincide) has no common next-token outcome space; there the KL is the one of the event both sides share
exactly, "the next text is this span" against "anything else": a two-outcome distribution [P(span), 1 - P(span)].
The divergence is forward KL by default; ``divergence`` takes any of ``losses.LOSS_NAMES`` on the same outcomes,
and the names ``xtok_reverse_kl`` (RevKD's direction) and ``xtok_jsd`` (GKD's generalised JSD, its ``beta``) choose
it by loss name, as ``TrainSettings.loss`` does (``XTOK_DIVERGENCES``).

``uld`` (Universal Logit Distillation, Boizard et al. 2024): sum_i |p_(i) - q_(i)| between the two probability vectors
sorted in decreasing order, the shorter padded with zeros: the closed form of the Wasserstein-1 distance they use,
with no matching of ids. A merged span's vectors are its first-token distributions times the probability of the
span's actual continuation (TRL GOLD's merged-token rule: the span's log-probability added to the first-token
log-probabilities, minus the first token's own).

Both are multiplied by T^2 when ``scale_by_t2``, reduce as ``token_mean`` (per span) or ``sequence_mean``, and walk the
spans in chunks sized from a memory budget: per chunk the student rows are gathered, the loss and its gradient with
respect to those rows are computed at once and only the gradient is kept (as in ``kdscope.losses`` and
``kdscope.fused``), so no [spans, vocab] tensor outlives its chunk. With a student head (``xtok_fused_parts``) the
logits themselves are made chunk by chunk from the hidden states.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdscope.errors import InputError
from kdscope.fused import DEFAULT_MEMORY_BUDGET_BYTES, LinearHead
from kdscope.labels import check_temperature
from kdscope.losses import LOSS_NAMES, TAIL_MASS_FLOOR, LossParts, divergence_rows

from .batch import AlignedBatch, SideIndex
from .vocab import SharedVocabulary

XtokLossName = Literal["xtok_kl", "xtok_reverse_kl", "xtok_jsd", "uld"]
XTOK_LOSS_NAMES: tuple[str, ...] = ("xtok_kl", "xtok_reverse_kl", "xtok_jsd", "uld")
XTOK_DIVERGENCES: dict[str, str] = {"xtok_kl": "forward_kl", "xtok_reverse_kl": "reverse_kl", "xtok_jsd": "jsd"}
"""The aligned-KL losses by name: each is ``xtok_kl``'s outcomes compared with this divergence of kdscope.losses."""

BLOCKS_PER_ROW = 12
"""Vocabulary-wide float32 blocks alive per gathered row in a chunk (logits, log-softmax, probabilities, sort values
and indices, bucket sums, autograd's copies): an upper count used to size chunks from the memory budget."""

SPAN_COMPLEMENT_FLOOR = 1e-30
"""Floor of 1 - P(span) for a merged span: a span probability that rounds to 1 on both sides would give 0 * log(0/0)."""

TeacherRows = Callable[[Tensor, Tensor], Tensor]
"""(batch ids [n], positions [n]) -> the teacher's logits at those positions [n, teacher vocab], without grad."""


def bucket_log_probs(log_probs: Tensor, bucket: Tensor, buckets: int) -> Tensor:
    """log of the summed probabilities per bucket: [rows, vocab] log-probs -> [rows, buckets] (-inf for an empty
    bucket). Log-space (a per-bucket max shift), so a bucket of tiny probabilities is not rounded to 0."""
    index = bucket.to(log_probs.device).unsqueeze(0).expand_as(log_probs)
    shift = torch.full((log_probs.shape[0], buckets), float("-inf"), dtype=log_probs.dtype, device=log_probs.device)
    shift = shift.scatter_reduce(1, index, log_probs.detach(), reduce="amax", include_self=True)
    shift = torch.nan_to_num(shift, neginf=0.0)  # empty buckets: any finite shift, their sum stays 0
    sums = torch.zeros_like(shift).scatter_add(1, index, (log_probs - shift.gather(1, index)).exp())
    return sums.log() + shift


def _log1mexp(log_p: Tensor) -> Tensor:
    """log(1 - exp(log_p)) for log_p <= 0, accurate at both ends (Maechler 2012)."""
    log_p = log_p.clamp(max=0.0)
    near_one = log_p > -math.log(2.0)
    return torch.where(near_one, torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


def side_span_rows(logits: Tensor, side: SideIndex, r0: int, r1: int, temperature: float) -> tuple[Tensor, Tensor,
                                                                                                     Tensor]:
    """From the gathered logits of spans r0..r1-1 (positions ``span_start[r0]:span_start[r1]``): (first-token
    log-probs [m, vocab], log P(span) [m], log-prob of each span's first token [m])."""
    lo = int(side.span_start[r0])
    log_probs = F.log_softmax(logits / temperature, dim=-1)
    tokens = log_probs.gather(1, side.target[lo : int(side.span_start[r1])].to(logits.device).unsqueeze(1)).squeeze(1)
    counts = (side.span_start[r0 + 1 : r1 + 1] - side.span_start[r0:r1]).to(logits.device)
    segment = torch.repeat_interleave(torch.arange(r1 - r0, device=logits.device), counts)
    span = torch.zeros(r1 - r0, dtype=log_probs.dtype, device=logits.device).index_add(0, segment, tokens)
    first = (side.span_start[r0:r1] - lo).to(logits.device)
    return log_probs[first], span, tokens[first]


@dataclass(frozen=True)
class XtokPlan:
    """Everything a chunk needs besides the student tensors."""

    batch: AlignedBatch
    teacher_rows: TeacherRows
    vocab: SharedVocabulary | None
    loss: str
    divergence: str
    beta: float
    alpha: float
    temperature: float
    scale: float
    chunks: tuple[tuple[int, int], ...]

    def chunk_total(self, student_logits: Tensor, r0: int, r1: int) -> Tensor:
        """scale * sum_r weight_r * loss_r over spans r0..r1-1, from the student logits gathered for them."""
        t = self.batch.teacher
        t_lo, t_hi = int(t.span_start[r0]), int(t.span_start[r1])
        with torch.no_grad():
            teacher_logits = self.teacher_rows(t.batch[t_lo:t_hi], t.position[t_lo:t_hi]).to(student_logits.dtype)
            p_first, p_span, p_token = side_span_rows(teacher_logits, t, r0, r1, self.temperature)
        q_first, q_span, q_token = side_span_rows(student_logits, self.batch.student, r0, r1, self.temperature)
        if self.loss == "uld":
            per_span = _uld_rows(p_first + (p_span - p_token).unsqueeze(1), q_first + (q_span - q_token).unsqueeze(1))
        else:
            per_span = self._xtok_kl_rows(p_first, p_span, q_first, q_span, r0, r1)
        weights = self.batch.weights[r0:r1].to(per_span.dtype).to(per_span.device)
        return (per_span * weights).sum() * self.scale

    def _xtok_kl_rows(self, p_first: Tensor, p_span: Tensor, q_first: Tensor, q_span: Tensor, r0: int,
                      r1: int) -> Tensor:
        assert self.vocab is not None  # checked by the caller
        one = self.batch.one_to_one[r0:r1].to(q_first.device)
        per_span = torch.zeros(r1 - r0, dtype=q_first.dtype, device=q_first.device)
        if bool(one.any()):
            v = self.vocab
            log_p = bucket_log_probs(p_first[one], v.teacher_bucket, v.shared + 1)
            log_q = bucket_log_probs(q_first[one], v.student_bucket, v.shared + 1)
            if v.buckets == v.shared:  # both tails empty (one tokenizer on both sides): no tail outcome at all
                log_p, log_q = log_p[:, :-1], log_q[:, :-1]
            elif v.student_tail_empty:
                log_q = torch.cat([log_q[:, :-1], torch.full_like(log_q[:, -1:], math.log(TAIL_MASS_FLOOR))], 1)
            per_span = per_span.index_put((one.nonzero(as_tuple=True)[0],),
                                          divergence_rows(log_p, log_q, self.divergence, self.beta, self.alpha))
        merged = ~one
        if bool(merged.any()):
            floor = math.log(SPAN_COMPLEMENT_FLOOR)
            log_p = torch.stack([p_span[merged], _log1mexp(p_span[merged]).clamp(min=floor)], 1)
            log_q = torch.stack([q_span[merged], _log1mexp(q_span[merged]).clamp(min=floor)], 1)
            per_span = per_span.index_put((merged.nonzero(as_tuple=True)[0],),
                                          divergence_rows(log_p, log_q, self.divergence, self.beta, self.alpha))
        return per_span


def _uld_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_i |sorted(p)_i - sorted(q)_i| per row, both sorted decreasing, the narrower padded with zeros."""
    p = log_p.exp().sort(dim=-1, descending=True).values
    q = log_q.exp().sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p = F.pad(p, (0, width - p.shape[-1]))
    q = F.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


class _XtokLoss(torch.autograd.Function):
    """The chunked loss with its gradient computed in forward. ``weight`` None: ``student`` is the logits
    [batch, seq, vocab]; otherwise ``student`` is the hidden states and the logits are F.linear(hidden, weight, bias)
    per chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, student: Tensor, weight: Tensor | None, bias: Tensor | None,
        plan: XtokPlan,
    ) -> Tensor:
        inputs = [student, weight, bias]
        wanted = [x is not None and ctx.needs_input_grad[i] for i, x in enumerate(inputs)]
        compute = torch.promote_types(student.dtype, torch.float32)
        # the logits' gradient in their own dtype (as kdscope.losses keeps it: each row is written once); head
        # gradients summed over chunks in float32 or wider (as kdscope.fused)
        accumulate = [None if not w else torch.zeros(x.shape, dtype=student.dtype if i == 0 and weight is None
                                                     else compute, device=x.device)
                      for i, (w, x) in enumerate(zip(wanted, inputs, strict=True))]
        total = torch.zeros((), dtype=compute, device=student.device)
        s = plan.batch.student
        for r0, r1 in plan.chunks:
            lo, hi = int(s.span_start[r0]), int(s.span_start[r1])
            index = (s.batch[lo:hi].to(student.device), s.position[lo:hi].to(student.device))
            with torch.enable_grad():
                rows = student[index].detach().requires_grad_(wanted[0])
                leaves = [rows]
                if weight is None:
                    logits = rows.to(compute)
                else:
                    w = weight.detach().requires_grad_(wanted[1])
                    b = None if bias is None else bias.detach().requires_grad_(wanted[2])
                    leaves += [w, b]
                    logits = F.linear(rows, w, b).to(compute)
                chunk_total = plan.chunk_total(logits, r0, r1)
            need = [leaf for leaf, want in zip(leaves, wanted, strict=False) if leaf is not None and want]
            if need:
                grads = iter(torch.autograd.grad(chunk_total, need))
                for i, (leaf, want) in enumerate(zip(leaves, wanted, strict=False)):
                    if leaf is None or not want:
                        continue
                    grad = next(grads)
                    if i == 0:
                        accumulate[0].index_put_(index, grad.to(accumulate[0].dtype), accumulate=True)
                    else:
                        accumulate[i].add_(grad.to(compute))
            total += chunk_total.detach()
        ctx.grads = [None if g is None else g.to(x.dtype) for g, x in zip(accumulate, inputs, strict=True)]
        ctx.applied_scale = 1.0
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor
    ) -> tuple[Tensor | None, ...]:
        scale = float(grad_total)
        if ctx.applied_scale == 0.0:
            raise RuntimeError("kdscope xtok loss: cannot backward again after a backward with a zero output gradient")
        for grad in ctx.grads:
            if grad is not None:
                grad.mul_(scale / ctx.applied_scale)
        ctx.applied_scale = scale
        return (*ctx.grads, None)


def _chunks(batch: AlignedBatch, width: int, memory_budget: int) -> tuple[tuple[int, int], ...]:
    """Consecutive span ranges whose gathered rows (both sides) fit the budget; at least one span each."""
    max_rows = max(1, memory_budget // (max(width, 1) * 4 * BLOCKS_PER_ROW))
    rows = (batch.student.span_start[1:] - batch.student.span_start[:-1]) + (
        batch.teacher.span_start[1:] - batch.teacher.span_start[:-1])
    chunks: list[tuple[int, int]] = []
    start, used = 0, 0
    for r, n in enumerate(rows.tolist()):
        if r > start and used + n > max_rows:
            chunks.append((start, r))
            start, used = r, 0
        used += n
    if batch.spans > start:
        chunks.append((start, batch.spans))
    return tuple(chunks)


def _plan(batch: AlignedBatch, teacher_rows: TeacherRows, teacher_width: int, student_width: int,
          vocab: SharedVocabulary | None, loss: str, divergence: str, beta: float, alpha: float, temperature: float,
          scale_by_t2: bool, memory_budget: int) -> XtokPlan:
    if loss not in XTOK_LOSS_NAMES:
        raise InputError(f"unknown cross-tokenizer loss {loss!r}: use one of {', '.join(XTOK_LOSS_NAMES)}")
    if divergence not in LOSS_NAMES:
        raise InputError(f"unknown divergence {divergence!r}: use one of {', '.join(LOSS_NAMES)}")
    if loss in XTOK_DIVERGENCES and loss != "xtok_kl":  # the direction chosen by name
        if divergence not in ("forward_kl", XTOK_DIVERGENCES[loss]):
            raise InputError(f"loss {loss!r} compares with {XTOK_DIVERGENCES[loss]}, not divergence {divergence!r}: "
                             "give one of them")
        loss, divergence = "xtok_kl", XTOK_DIVERGENCES[loss]
    check_temperature(temperature)
    if loss == "xtok_kl":
        if vocab is None:
            raise InputError("loss 'xtok_kl' needs the shared vocabulary (kdscope.xtok.shared_vocabulary)")
        if vocab.student_bucket.numel() != student_width or vocab.teacher_bucket.numel() != teacher_width:
            raise InputError(
                f"shared vocabulary built for widths student {vocab.student_bucket.numel()} / teacher "
                f"{vocab.teacher_bucket.numel()}, logits are {student_width} / {teacher_width}: rebuild it"
            )
    if memory_budget < 1:
        raise InputError(f"memory budget must be >= 1 byte, got {memory_budget}")
    return XtokPlan(batch, teacher_rows, vocab, loss, divergence, beta, alpha, temperature,
                    temperature**2 if scale_by_t2 else 1.0,
                    _chunks(batch, max(teacher_width, student_width), memory_budget))


def xtok_loss_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    batch: AlignedBatch,
    vocab: SharedVocabulary | None = None,
    loss: str = "xtok_kl",
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    memory_budget: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> LossParts:
    """(sum over aligned spans, count) of ``loss`` between student logits [batch, student seq, student vocab] and
    teacher logits [batch, teacher seq, teacher vocab]; spans, mask and reduction weights come from ``batch``
    (:func:`kdscope.xtok.aligned_batch`). Gradients flow to the student logits only."""
    if student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise InputError("student and teacher logits must both be [batch, seq, vocab]")
    plan = _plan(batch, logits_rows(teacher_logits), teacher_logits.shape[-1], student_logits.shape[-1], vocab, loss,
                 divergence, beta, alpha, temperature, scale_by_t2, memory_budget)
    return LossParts(total=_XtokLoss.apply(student_logits, None, None, plan), count=batch.count)


def logits_rows(teacher_logits: Tensor) -> TeacherRows:
    """The teacher rows of dense teacher logits [batch, seq, vocab]."""
    teacher = teacher_logits.detach()
    return lambda b, p: teacher[b.to(teacher.device), p.to(teacher.device)]


def head_rows(teacher_hidden: Tensor, teacher_head: LinearHead) -> TeacherRows:
    """The teacher rows made on demand from its last hidden states [batch, seq, hidden] and LM head: only the gathered
    rows' logits ever exist."""
    if teacher_hidden.dim() != 3:
        raise InputError("teacher hidden states must be [batch, seq, hidden]")
    hidden = teacher_hidden.detach()
    weight = teacher_head.weight.detach()
    bias = None if teacher_head.bias is None else teacher_head.bias.detach()
    return lambda b, p: F.linear(hidden[b.to(hidden.device), p.to(hidden.device)], weight, bias)


def xtok_fused_parts(
    student_hidden: Tensor,
    student_head: LinearHead,
    teacher_rows: TeacherRows,
    teacher_width: int,
    batch: AlignedBatch,
    vocab: SharedVocabulary | None = None,
    loss: str = "xtok_kl",
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    memory_budget: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> LossParts:
    """:func:`xtok_loss_parts` from the student's last hidden states [batch, seq, hidden] and LM head (see
    ``kdscope.fused``): the student's logits exist only chunk by chunk; gradients land on the hidden states, head
    weight and bias. The teacher is given as rows: :func:`head_rows` (its hidden states and head, so its logits too
    exist only chunk by chunk) or :func:`logits_rows` (a teacher whose dense logits exist anyway: a noisy one)."""
    if student_hidden.dim() != 3:
        raise InputError("student hidden states must be [batch, seq, hidden]")
    plan = _plan(batch, teacher_rows, teacher_width, student_head.vocab, vocab, loss, divergence, beta, alpha,
                 temperature, scale_by_t2, memory_budget)
    total = _XtokLoss.apply(student_hidden, student_head.weight, student_head.bias, plan)
    return LossParts(total=total, count=batch.count)
