"""The one place that turns resolved training settings into the teacher signal a KD run trains on.

Both ``kdscope train kd`` and the study's KD job call :func:`build_teacher_signal`, so the two cannot drift apart:

- vocabulary: teacher and student must share one tokenizer (checked id by id on the token strings) and every real id
  must lie below the narrower logit head; the teacher is then cut to that common width on every path (online,
  cached, GKD's on-policy fallback), so padding rows never enter its top-k, noise or normaliser;
- the cache serves only what it holds exactly: the noise-free top-k at a temperature it was built for, at the pair's
  common width. A noise run (the study: N(0, sigma^2) on every teacher logit, fresh each step) always uses the online
  teacher, cache or not;
- base teacher (``settings.base_teacher``): the PEFT teacher runs with its adapter disabled (a plain model is an
  error); a caller that loads the base weights without the adapter (the study's KD job) passes base_teacher False;
- the signal's temperature is the loss temperature (``settings.temperature``); the trainer checks it again where
  signal and loss meet.

``settings`` is anything with the fields below (``kdscope.train.TrainSettings`` is one): this module sits below
``train`` and must not import it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..errors import InputError
from ..teacher import OnlineTeacher, TeacherSignal, common_vocab_width, logit_width
from ..xtok import XTOK_LOSS_NAMES, cross_tokenizer_teacher
from .cached_teacher import CachedTeacher
from .store import TeacherCache

DISTILLING_OBJECTIVES = ("kd", "gkd")
"""Objectives trained on a teacher signal (seqkd trains on teacher responses with cross-entropy, sft on the data)."""


class SignalSettings(Protocol):
    """The resolved settings the teacher signal depends on."""

    objective: str
    temperature: float
    teacher_topk: int | None
    noise_sigma: float
    base_teacher: bool
    seed: int


def build_teacher_signal(
    settings: SignalSettings,
    teacher_model: torch.nn.Module | None,
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    student_width: int,
    cache: TeacherCache | None = None,
    teacher_width: int | None = None,
) -> TeacherSignal | None:
    """The teacher signal of a KD run (None for objectives that train on no signal).

    ``teacher_model`` may be None only when ``cache`` serves every batch (off-policy KD without noise); GKD's
    on-policy samples and noise runs need it. ``student_width`` is the student's logit width (its LM head's rows);
    ``teacher_width`` the teacher's, read from ``teacher_model`` when not given (give it for a teacher whose head is
    sharded across devices, where the local weight no longer has the full shape).
    """
    if teacher_model is not None and teacher_width is None:
        teacher_width = logit_width(teacher_model)
    if settings.objective not in DISTILLING_OBJECTIVES:
        return None
    if getattr(settings, "loss", None) in XTOK_LOSS_NAMES:  # teacher and student tokenizers may differ
        return cross_tokenizer_teacher(settings, teacher_model, teacher_tokenizer, student_tokenizer, student_width,
                                       teacher_width, cached=cache is not None)
    use_cache = cache is not None and settings.noise_sigma == 0
    if use_cache:
        assert cache is not None
        width = _cache_width(cache, settings, teacher_width, teacher_tokenizer, student_tokenizer, student_width)
    elif teacher_model is None:
        why = "a noise run" if cache is not None else "without a teacher cache, the run"
        raise InputError(f"{why} needs the teacher model online (the cache holds only the noise-free top-k)")
    else:
        assert teacher_width is not None
        width = common_vocab_width(teacher_tokenizer, student_tokenizer, teacher_width, student_width)
    online = None if teacher_model is None or (use_cache and settings.objective != "gkd") else OnlineTeacher(
        teacher_model,
        topk=settings.teacher_topk,
        noise_sigma=settings.noise_sigma,
        seed=settings.seed,
        disable_adapter=settings.base_teacher,
        vocab_width=width,
        temperature=settings.temperature,
    )
    if not use_cache:
        return online
    assert cache is not None
    if settings.objective == "gkd" and online is None:
        raise InputError("GKD scores the student's own samples, which no cache holds: it needs the teacher model "
                         "online as the cache's fallback")
    return CachedTeacher(cache, temperature=settings.temperature, fallback=online)


def _cache_width(cache: TeacherCache, settings: SignalSettings, teacher_width: int | None,
                 teacher_tokenizer: Any, student_tokenizer: Any, student_width: int) -> int:
    """The cache's logit width, after checking that it is this pair's common vocabulary and serves this run's top-k."""
    if settings.teacher_topk != cache.k:
        raise InputError(f"{cache.root}: the cache holds the teacher's top-{cache.k}, this run asks for "
                         f"teacher top-k {settings.teacher_topk}; set teacher_topk to {cache.k} or rebuild the cache")
    # without the model, the cache's width stands for the teacher's (cut to key.vocab_width when it was built)
    common = common_vocab_width(teacher_tokenizer, student_tokenizer, teacher_width or cache.logit_width, student_width)
    # a cache cut below the student's width (key.vocab_width) dropped teacher rows the pair shares
    cut_too_far = teacher_width is None and cache.key.vocab_width == cache.logit_width < student_width
    if cache.logit_width != common or cut_too_far:
        raise InputError(f"{cache.root}: the cache holds the teacher cut to {cache.logit_width} logits, not this "
                         f"pair's common vocabulary (student {student_width} logits); rebuild it with "
                         f"--vocab-width {student_width}")
    return common
