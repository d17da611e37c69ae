"""The stored form of a sequence's teacher signal (top-k log-probs, ids, log-normalisers) and its byte codec."""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..labels import is_temperature
from ..teacher import normalizer_and_tail

Codec = Literal["zlib", "lzma", "none"]
CODECS: tuple[str, ...] = ("zlib", "lzma", "none")
VALUE_DTYPES: dict[str, type[np.floating[Any]]] = {"float16": np.float16, "float32": np.float32}
ZLIB_LEVEL = 6
LZMA_PRESET = 6


@dataclass(frozen=True)
class SparseRecord:
    """Teacher signal of n positions: ``log_probs`` and ``indices`` [n, k] (top-k at T = 1, descending),
    ``log_normalizers`` [n, len(temperatures)] = logsumexp(logits / T) over the full vocabulary, and ``log_tails``
    [n, len(temperatures)] = the log of the mass outside the top-k at T, summed over those ids at build time (1 - sum
    of the stored, rounded top-k probabilities would lose any tail below their rounding)."""

    log_probs: np.ndarray
    indices: np.ndarray
    log_normalizers: np.ndarray
    log_tails: np.ndarray


def index_dtype(vocab_width: int) -> type[np.integer[Any]]:
    return np.uint16 if vocab_width <= np.iinfo(np.uint16).max + 1 else np.int32


def normalised_temperatures(temperatures: Iterable[float]) -> list[float]:
    """T = 1 first (its normaliser turns stored log-probs back into logits), then the others sorted, deduplicated."""
    temps = {float(t) for t in temperatures}
    if not all(map(is_temperature, temps)):
        raise InputError(f"temperatures must all be > 0, got {sorted(temps)}")
    return [1.0, *sorted(temps - {1.0})]


def sparsify(logits: Tensor, k: int, temperatures: Sequence[float], value_dtype: str = "float16") -> SparseRecord:
    """The stored form of dense teacher ``logits`` [n, vocab] (float32 arithmetic); ``temperatures`` as returned by
    :func:`normalised_temperatures` (T = 1 first)."""
    if temperatures[0] != 1.0:
        raise ValueError(f"temperatures must start with 1.0, got {list(temperatures)}")
    dense = logits.float()
    values, indices = dense.topk(min(k, dense.shape[-1]), dim=-1)
    per_temperature = [normalizer_and_tail(dense, indices, t) for t in temperatures]
    normalizers = torch.stack([normalizer for normalizer, _ in per_temperature], dim=-1)
    log_tails = torch.stack([tail for _, tail in per_temperature], dim=-1)
    return sparse_record(values, indices, normalizers, log_tails, dense.shape[-1], value_dtype)


def sparse_record(values: Tensor, indices: Tensor, normalizers: Tensor, log_tails: Tensor, vocab_width: int,
                  value_dtype: str = "float16") -> SparseRecord:
    """The stored form of a top-k signal already taken: raw top-k ``values`` and ``indices`` [n, k] (float32,
    descending), ``normalizers`` and ``log_tails`` [n, len(temperatures)] (T = 1 first), as ``sparsify`` computes
    them from dense logits and ``kdscope.fused.chunked_topk`` chunk by chunk."""
    log_probs = values - normalizers[:, :1]
    return SparseRecord(
        log_probs=log_probs.cpu().numpy().astype(VALUE_DTYPES[value_dtype]),
        indices=indices.cpu().numpy().astype(index_dtype(vocab_width)),
        log_normalizers=normalizers.cpu().numpy().astype(np.float32),
        log_tails=log_tails.cpu().numpy().astype(np.float32),
    )


def _byte_planes(array: np.ndarray) -> bytes:
    """All first bytes, then all second bytes, ...: exponents and high id bytes vary slowly, so they form runs."""
    return np.ascontiguousarray(array.view(np.uint8).reshape(-1, array.itemsize).T).tobytes()


def _from_byte_planes(buffer: memoryview | bytes, dtype: np.dtype[Any], shape: tuple[int, int]) -> np.ndarray:
    planes = np.frombuffer(buffer, dtype=np.uint8).reshape(dtype.itemsize, -1)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(shape)


@dataclass(frozen=True)
class RecordFormat:
    """How records of one cache are laid out: k columns, one normaliser and one log tail per temperature, dtypes,
    codec."""

    k: int
    n_temperatures: int
    value_dtype: np.dtype[Any]
    index_dtype: np.dtype[Any]
    codec: str

    def _parts(self, n: int) -> list[tuple[np.dtype[Any], tuple[int, int]]]:
        return [(self.value_dtype, (n, self.k)), (self.index_dtype, (n, self.k)),
                (np.dtype(np.float32), (n, self.n_temperatures)), (np.dtype(np.float32), (n, self.n_temperatures))]

    def encode(self, record: SparseRecord) -> bytes:
        arrays = (record.log_probs, record.indices, record.log_normalizers, record.log_tails)
        if self.codec == "none":
            return b"".join(a.tobytes() for a in arrays)
        raw = b"".join(_byte_planes(a) for a in arrays)
        return zlib.compress(raw, ZLIB_LEVEL) if self.codec == "zlib" else lzma.compress(raw, preset=LZMA_PRESET)

    def decode(self, blob: memoryview, n: int) -> SparseRecord:
        if self.codec == "none":
            raw: memoryview | bytes = blob
        else:
            raw = zlib.decompress(blob) if self.codec == "zlib" else lzma.decompress(blob)
        arrays, start = [], 0
        for dtype, shape in self._parts(n):
            size = shape[0] * shape[1] * dtype.itemsize
            chunk = raw[start : start + size]
            if self.codec == "none":
                arrays.append(np.frombuffer(chunk, dtype=dtype).reshape(shape))
            else:
                arrays.append(_from_byte_planes(chunk, dtype, shape))
            start += size
        return SparseRecord(*arrays)


def record_tensors(record: SparseRecord, temperature_column: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(raw top-k logits float32 [n, k], ids int64 [n, k], logsumexp(logits / T) float32 [n], log of the mass outside
    the top-k at T float32 [n]) of a record."""
    # np.array copies: records of codec "none" are read-only views of the memory map
    log_normalizers = torch.from_numpy(np.array(record.log_normalizers, dtype=np.float32))
    unit = torch.from_numpy(np.array(record.log_probs, dtype=np.float32))
    values = unit + log_normalizers[:, :1]  # column 0 is T = 1
    log_tail = torch.from_numpy(np.array(record.log_tails[:, temperature_column], dtype=np.float32))
    return values, torch.from_numpy(record.indices.astype(np.int64)), log_normalizers[:, temperature_column], log_tail


