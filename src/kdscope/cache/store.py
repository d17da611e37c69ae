"""The cache on disk: manifest, shards of independently compressed records, per-shard indexes; build and open."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from ..files import atomic_write_bytes
from ..fused import DEFAULT_MEMORY_BUDGET_BYTES, chunked_topk, fused_supported, online_teacher_hidden
from ..padding import pad_rows
from ..teacher import OnlineTeacher
from .codec import (CODECS, VALUE_DTYPES, Codec, RecordFormat, SparseRecord, index_dtype, normalised_temperatures,
                    sparse_record, sparsify)
from .key import CacheKey, sequence_hash, weights_fingerprint

FORMAT_VERSION = 2
"""2: records store log(tail) per temperature (1 had none: the tail was 1 - sum of the rounded top-k)."""
MANIFEST = "manifest.json"
TEMPERATURE_TOLERANCE = 1e-9


def _shard_files(root: Path, shard: int) -> tuple[Path, Path]:
    return root / f"shard-{shard:05d}.bin", root / f"shard-{shard:05d}.json"


def _unique_in_order(sequences: Sequence[Sequence[int]]) -> list[tuple[str, list[int]]]:
    """(hash, ids) of each distinct sequence, first occurrence order: duplicates are stored once."""
    seen: dict[str, list[int]] = {}
    for ids in sequences:
        seen.setdefault(sequence_hash(ids), list(ids))
    return list(seen.items())


class TeacherCache:
    """A built teacher-signal cache (read side). Create with :meth:`build`, open with :meth:`open`."""

    def __init__(self, root: Path, manifest: dict[str, Any], index: dict[str, tuple[int, int, int, int]]) -> None:
        self.root = root
        self.manifest = manifest
        self.index = index  # sequence hash -> (shard, byte offset, byte length, positions)
        self.key = CacheKey(**manifest["key"])
        self.temperatures: list[float] = manifest["temperatures"]
        self.k: int = manifest["k"]
        self.logit_width: int = manifest["logit_width"]  # the teacher's logits were cut to this width before top-k
        self.format = RecordFormat(self.k, len(self.temperatures), np.dtype(manifest["value_dtype"]),
                                   np.dtype(manifest["index_dtype"]), manifest["codec"])
        self._maps: dict[int, np.memmap] = {}

    # ---------------------------------------------------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        root: str | Path,
        key: CacheKey,
        model: torch.nn.Module,
        sequences: Sequence[Sequence[int]],
        pad_id: int,
        temperatures: Iterable[float] = (1.0, 2.0, 5.0),
        shard_size: int = 256,
        batch_size: int = 8,
        codec: Codec = "zlib",
        value_dtype: str = "float16",
        on_batch: Callable[[int], None] | None = None,
        fused: bool = True,
        memory_budget: int = DEFAULT_MEMORY_BUDGET_BYTES,
    ) -> "TeacherCache":
        """Run ``model`` once over the distinct ``sequences`` and store its top-``key.k`` signal under ``root``.

        ``fused`` (when the model's logits are ``head(last hidden state)``, kdscope.fused.fused_supported): the
        top-k, normalisers and tails are taken chunk by chunk from the last hidden states (``fused.chunked_topk``,
        chunks of ``memory_budget`` bytes), never from [batch, seq, vocab] logits; the same records as the dense path.

        Resumable: shards already complete under ``root`` are kept, provided its manifest matches this build (same
        key and format); a different one is refused. ``on_batch`` is called with each batch's row count (progress).
        """
        if codec not in CODECS:
            raise InputError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")
        if value_dtype not in VALUE_DTYPES:
            raise InputError(f"unknown value dtype {value_dtype!r}: use float16 or float32")
        if key.k < 1 or shard_size < 1 or batch_size < 1:
            raise InputError(f"k, shard size and batch size must be >= 1, got {key.k}, {shard_size}, {batch_size}")
        if not sequences or any(len(s) == 0 for s in sequences):
            raise InputError("the cache needs at least one sequence and no empty sequence")
        fingerprint = weights_fingerprint(model)
        if key.weights not in (None, fingerprint):
            raise InputError(f"the key's weights fingerprint {key.weights} is not this model's ({fingerprint})")
        key = replace(key, weights=fingerprint)
        teacher = OnlineTeacher(model, vocab_width=key.vocab_width)
        model_width = int(model.get_output_embeddings().weight.shape[0])
        width = min(key.vocab_width, model_width) if key.vocab_width else model_width
        unique = _unique_in_order(sequences)
        temps = normalised_temperatures(temperatures)
        manifest = {
            "format_version": FORMAT_VERSION, "key": asdict(key), "k": min(key.k, width), "temperatures": temps,
            "logit_width": width, "value_dtype": value_dtype, "index_dtype": np.dtype(index_dtype(width)).name,
            "codec": codec, "shard_size": shard_size, "n_shards": math.ceil(len(unique) / shard_size),
            "n_sequences": len(unique), "n_positions": sum(len(ids) for _, ids in unique),
        }
        out = Path(root)
        _claim(out, manifest)
        record_format = RecordFormat(manifest["k"], len(temps), np.dtype(value_dtype), np.dtype(manifest["index_dtype"]),
                                     codec)
        for shard in range(manifest["n_shards"]):
            members = unique[shard * shard_size : (shard + 1) * shard_size]
            if _shard_files(out, shard)[1].is_file():
                if on_batch is not None:
                    on_batch(len(members))
                continue
            _build_shard(out, shard, members, teacher, record_format, temps, pad_id, batch_size, value_dtype, on_batch,
                         memory_budget if fused and fused_supported(model) else None)
        return cls.open(out, key)

    # ----------------------------------------------------------------------------------------------------------- read
    @classmethod
    def open(cls, root: str | Path, expected: CacheKey | None = None) -> "TeacherCache":
        """Open a complete cache; with ``expected``, refuse one computed from anything else (InputError naming it)."""
        folder = Path(root)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise InputError(f"{folder}: no teacher cache here ({MANIFEST} missing); build one with `kdscope cache-teacher`")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{folder}: cache format {manifest.get('format_version')} != {FORMAT_VERSION}; rebuild it")
        if expected is not None:
            differences = CacheKey(**manifest["key"]).differences(expected)
            if differences:
                raise InputError(f"{folder}: the teacher cache was computed from something else "
                                 f"({'; '.join(differences)}); rebuild it or point to the right cache")
        index: dict[str, tuple[int, int, int, int]] = {}
        missing = []
        for shard in range(manifest["n_shards"]):
            shard_index = _shard_files(folder, shard)[1]
            if not shard_index.is_file():
                missing.append(shard)
                continue
            for seq_hash, (offset, length, positions) in json.loads(shard_index.read_text()).items():
                index[seq_hash] = (shard, offset, length, positions)
        if missing:
            raise InputError(f"{folder}: cache incomplete, {len(missing)} of {manifest['n_shards']} shards missing "
                             f"(first: {missing[0]}); rerun `kdscope cache-teacher` with the same options to resume")
        return cls(folder, manifest, index)

    @staticmethod
    def is_complete(root: str | Path) -> bool:
        """Whether ``root`` holds a finished cache (manifest and every shard's index), without reading the data."""
        manifest_path = Path(root) / MANIFEST
        if not manifest_path.is_file():
            return False
        n_shards = json.loads(manifest_path.read_text())["n_shards"]
        return all(_shard_files(Path(root), shard)[1].is_file() for shard in range(n_shards))

    def __contains__(self, seq_hash: str) -> bool:
        return seq_hash in self.index

    def __len__(self) -> int:
        return len(self.index)

    def record(self, seq_hash: str) -> SparseRecord:
        """The stored signal of the sequence with this hash (KeyError when absent)."""
        shard, offset, length, positions = self.index[seq_hash]
        if shard not in self._maps:
            self._maps[shard] = np.memmap(_shard_files(self.root, shard)[0], dtype=np.uint8, mode="r")
        return self.format.decode(memoryview(self._maps[shard][offset : offset + length]), positions)

    def temperature_column(self, temperature: float) -> int:
        """Where the normaliser of ``temperature`` is stored; InputError when the cache was not built for it."""
        for column, stored in enumerate(self.temperatures):
            if math.isclose(stored, temperature, rel_tol=TEMPERATURE_TOLERANCE):
                return column
        raise InputError(
            f"{self.root}: the teacher cache holds log-normalisers for temperatures {self.temperatures}, not "
            f"{temperature} (logsumexp(logits / T) cannot be rebuilt from the top-k); rebuild it with "
            f"--temperatures including {temperature}"
        )

    def bytes_per_token(self) -> float:
        """Stored bytes (shard files) per cached position."""
        total = sum(_shard_files(self.root, s)[0].stat().st_size for s in range(self.manifest["n_shards"]))
        return total / max(1, self.manifest["n_positions"])


def _claim(out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, or check that the one already there describes the same build (resume)."""
    path = out / MANIFEST
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != manifest:
            # A different key explains the derived fields (k, counts); otherwise name the differing format fields.
            detail = CacheKey(**existing["key"]).differences(CacheKey(**manifest["key"])) or [
                f"{name}: cache has {existing.get(name)!r}, this build {manifest.get(name)!r}"
                for name in sorted(manifest.keys() | existing.keys()) if existing.get(name) != manifest.get(name)]
            raise InputError(f"{out} holds a teacher cache of another build ({'; '.join(detail)}); "
                             "use another output folder or delete this one")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(manifest, indent=1).encode())


def _build_shard(out: Path, shard: int, members: list[tuple[str, list[int]]], teacher: OnlineTeacher,
                 record_format: RecordFormat, temperatures: list[float], pad_id: int, batch_size: int,
                 value_dtype: str, on_batch: Callable[[int], None] | None, fused_budget: int | None = None) -> None:
    """Teacher pass over one shard's sequences (sorted by length within the shard, so batches pad little); fused
    (``fused_budget`` bytes per chunk) or from the dense logits (None)."""
    ordered = sorted(members, key=lambda member: len(member[1]))
    blobs: list[bytes] = []
    shard_index: dict[str, list[int]] = {}
    offset = 0
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        input_ids, attention = pad_rows([ids for _, ids in batch], pad_id)
        device = teacher.device
        input_ids, attention = input_ids.to(device), attention.to(device)
        if fused_budget is None:
            logits = teacher.teacher_logits(input_ids, attention)
            records = [sparsify(logits[row, : len(ids)], record_format.k, temperatures, value_dtype)
                       for row, (_, ids) in enumerate(batch)]
        else:
            records = _fused_records(teacher, input_ids, attention, [len(ids) for _, ids in batch], record_format.k,
                                     temperatures, value_dtype, fused_budget)
        for (seq_hash, ids), record in zip(batch, records):
            blob = record_format.encode(record)
            shard_index[seq_hash] = [offset, len(blob), len(ids)]
            blobs.append(blob)
            offset += len(blob)
        if on_batch is not None:
            on_batch(len(batch))
    data_path, index_path = _shard_files(out, shard)
    atomic_write_bytes(data_path, b"".join(blobs))
    atomic_write_bytes(index_path, json.dumps(shard_index).encode())


def _fused_records(teacher: OnlineTeacher, input_ids: Tensor, attention: Tensor, lengths: list[int], k: int,
                   temperatures: list[float], value_dtype: str, budget: int) -> list[SparseRecord]:
    """The records of one right-padded batch from the teacher's last hidden states, top-k taken chunk by chunk."""
    state = online_teacher_hidden(teacher, input_ids, attention)
    rows = state.hidden[attention.to(torch.bool)]  # the sequences' positions, one sequence after another
    values, indices, normalizers, log_tails = chunked_topk(rows, state.head, k, temperatures, memory_budget=budget)
    records, start = [], 0
    for n in lengths:
        part = slice(start, start + n)
        records.append(sparse_record(values[part], indices[part], normalizers[part], log_tails[part],
                                     state.head.vocab, value_dtype))
        start += n
    return records
