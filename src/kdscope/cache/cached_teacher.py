"""The cache as a teacher signal: ``CachedTeacher`` serves stored top-k signal through the ``TeacherSignal`` protocol."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from ..labels import DEFAULT_TEMPERATURE
from ..teacher import OnlineTeacher, TeacherOutput
from .codec import record_tensors
from .key import sequence_hash
from .store import TeacherCache


def _sequence_lengths(attention_mask: Tensor) -> Tensor:
    """Row lengths of a right-padded mask; InputError on any other padding (the hash needs the unpadded ids)."""
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.to(torch.bool), positions.unsqueeze(0) < lengths.unsqueeze(1)):
        raise InputError("CachedTeacher needs right-padded batches (as kdscope.train.collate builds them)")
    return lengths


class CachedTeacher:
    """The ``TeacherSignal`` of a :class:`TeacherCache`: no teacher model in memory, no teacher forward pass.

    Rows are looked up by the hash of their unpadded ids (batches right-padded, the attention mask gives the lengths),
    so any subset or order of the cached sequences works (training and validation sets alike). The output is the
    top-k form of :class:`kdscope.teacher.TeacherOutput` at ``temperature``, which must be one the cache was built
    for. Padding positions hold zeros (they are masked out of every loss).

    No noise ablation: the study adds N(0, sigma^2) to every teacher logit, drawn afresh at each step, and a cache of
    the top-k cannot reproduce that (the tail logits are gone, and noise changes which ids are the top-k). Noise runs
    use the online teacher (``build_teacher_signal`` routes them there; a noisy fallback is refused).

    Sequences not in the cache go to ``fallback``, a noise-free ``OnlineTeacher`` with the same top-k, temperature and
    vocabulary width; a batch with any such row is sent to it whole (one teacher pass). GKD: its off-policy batches are the
    training sequences and read the cache; its on-policy batches are the student's fresh samples, which no cache can
    hold, so GKD needs the teacher online as the fallback (about lambda of its steps). Without a fallback a missing
    sequence raises InputError.
    """

    def __init__(self, cache: TeacherCache, temperature: float = DEFAULT_TEMPERATURE,
                 fallback: OnlineTeacher | None = None) -> None:
        self.column = cache.temperature_column(temperature)
        if fallback is not None:
            wanted = (cache.k, temperature, 0.0, cache.logit_width)
            given = (fallback.topk, fallback.temperature, fallback.noise_sigma, fallback.vocab_width or cache.logit_width)
            if given != wanted:
                raise InputError(f"the fallback teacher must match the cache: (top-k, temperature, noise sigma, "
                                 f"vocabulary width) {given} != {wanted}")
        self.cache = cache
        self.temperature = temperature
        self.fallback = fallback
        self.calls = 0
        self.fallback_calls = 0

    def state_dict(self) -> dict[str, Any]:
        """Call counts and the fallback's state, so a resumed run continues where it stopped."""
        return {"calls": self.calls, "fallback_calls": self.fallback_calls,
                "fallback": None if self.fallback is None else self.fallback.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.fallback_calls = int(state["fallback_calls"])
        if self.fallback is not None and state.get("fallback") is not None:
            self.fallback.load_state_dict(state["fallback"])

    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> TeacherOutput:
        lengths = _sequence_lengths(attention_mask).tolist()
        hashes = [sequence_hash(row[:n].tolist()) for row, n in zip(input_ids.cpu(), lengths)]
        missing = [row for row, h in enumerate(hashes) if h not in self.cache]
        if missing:
            if self.fallback is None:
                raise InputError(
                    f"{len(missing)} of {len(hashes)} sequences of this batch are not in the teacher cache "
                    f"{self.cache.root} (e.g. on-policy samples, or other data); give CachedTeacher a fallback "
                    "OnlineTeacher or rebuild the cache over this data"
                )
            self.fallback_calls += 1
            return self.fallback(input_ids, attention_mask)
        batch, width, k = input_ids.shape[0], input_ids.shape[1], self.cache.k
        values = torch.zeros(batch, width, k)
        indices = torch.zeros(batch, width, k, dtype=torch.long)
        normalizers = torch.zeros(batch, width)
        log_tails = torch.zeros(batch, width)
        for row, (seq_hash, n) in enumerate(zip(hashes, lengths)):
            values[row, :n], indices[row, :n], normalizers[row, :n], log_tails[row, :n] = record_tensors(
                self.cache.record(seq_hash), self.column)
        self.calls += 1
        device = input_ids.device
        return TeacherOutput(topk_values=values.to(device), topk_indices=indices.to(device),
                             topk_log_normalizer=normalizers.to(device), temperature=self.temperature,
                             topk_log_tail=log_tails.to(device))
