"""Teacher-signal cache: run the teacher once over a training set; every KD run distilling from it reads the cache.

What is stored, per position of each (deduplicated) training sequence:

- the teacher's top-k token ids (uint16 when the logit width fits, int32 otherwise);
- their log-probabilities at T = 1, ``logit - logsumexp(logits)``, in float16 (or float32). Log-probabilities rather
  than raw logits because float16 precision is relative: the entries that carry the mass sit near 0, where float16
  resolves ~5e-4, while raw logits of 20-30 would be rounded by 0.01-0.03 (1-3 % in probability);
- ``logsumexp(logits / T)`` over the full vocabulary, float32, for every temperature T named at build time (T = 1
  always included). The top-k logits do not determine this normaliser for T != 1 (it depends on every tail logit),
  and ``tail="tail_bucket"`` needs it at the loss temperature to know the teacher's tail mass. Storing it costs
  4 bytes per position and temperature and is exact; a cache refuses a temperature it was not built for.
  Raw logits are rebuilt at load as ``log_prob + logsumexp(logits)``; the temperature is applied by the loss.

Layout of a cache folder::

    manifest.json        the key (what the signal was computed from) and the format (k, temperatures, dtypes, codec)
    shard-00000.bin      the records of shard 0's sequences, each compressed on its own, back to back
    shard-00000.json     shard 0's index: sequence hash -> [byte offset, byte length, positions]. Written last, so
                         its presence marks the shard complete; a killed build resumes at the first missing shard.

Compression and reads: each sequence's record (its three arrays, byte-shuffled so that the slowly varying high bytes
form long runs) is compressed on its own with stdlib zlib or lzma, or stored raw (codec ``none``). Shard files are
memory-mapped and a lookup touches only its record's bytes: the trainer's shuffled order costs one small
decompression per sequence, no shard is ever held in memory whole, and concurrent KD runs share the file through the
OS page cache. Compressing whole shards would compress a little better but make random access decompress (and hold)
a shard per lookup; codec ``none`` makes reads zero-copy at ~1.5x the bytes.

The cache key (``CacheKey``) names the teacher (model reference, adapter path, adapter file digest, a fingerprint of
its weights), the data (digest of the token id lists), the prompt style, the tokenizer (digest of its vocabulary), k,
max_length and the logit width. ``TeacherCache.open(path, expected)`` refuses a cache whose key differs, naming the
component.

``CachedTeacher`` serves the cache through the ``TeacherSignal`` protocol; see its docstring for noise and GKD.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError
from .losses import TailMode, sparse_log_probs, divergence_rows
from .teacher import OnlineTeacher, TeacherOutput

Codec = Literal["zlib", "lzma", "none"]
CODECS: tuple[str, ...] = ("zlib", "lzma", "none")
VALUE_DTYPES: dict[str, type[np.floating[Any]]] = {"float16": np.float16, "float32": np.float32}
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DIGEST_BYTES = 16
FINGERPRINT_SAMPLES = 65_536
"""Values sampled (evenly strided) from each fingerprinted parameter tensor: enough to catch any retraining, cheap
even for a 151,936 x 1,536 embedding."""
ZLIB_LEVEL = 6
LZMA_PRESET = 6
TEMPERATURE_TOLERANCE = 1e-9


def _digest(*chunks: bytes) -> str:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# The key: what a cache was computed from
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheKey:
    """Everything the cached signal depends on. ``weights`` may be None in an *expected* key: a caller that does not
    load the teacher (the point of the cache) then relies on the model reference and the adapter's file digest."""

    teacher: str
    adapter: str | None
    adapter_digest: str | None
    weights: str | None
    data: str
    prompt_style: str
    tokenizer: str
    k: int
    max_length: int
    vocab_width: int | None

    def folder_name(self) -> str:
        """A folder name for this key, without the weights fingerprint, so a caller that never loads the teacher
        finds the cache its builder wrote."""
        return _digest(json.dumps({**asdict(self), "weights": None}, sort_keys=True).encode())[:16]

    def differences(self, expected: "CacheKey") -> list[str]:
        """One line per component where this (stored) key differs from ``expected``."""
        out = []
        for field in fields(self):
            want, have = getattr(expected, field.name), getattr(self, field.name)
            if field.name == "weights" and want is None:
                continue
            if have != want:
                out.append(f"{field.name}: cache has {have!r}, expected {want!r}")
        return out


def sequence_hash(ids: Iterable[int]) -> str:
    """The index key of one unpadded token sequence."""
    return _digest(np.asarray(list(ids), dtype=np.int64).tobytes())


def data_digest(sequences: Sequence[Sequence[int]]) -> str:
    """Digest of a list of token id sequences, order included."""
    return _digest(*(sequence_hash(s).encode() for s in sequences))


def tokenizer_digest(tokenizer: Any) -> str:
    """Digest of the tokenizer's vocabulary (token -> id) and its EOS/pad ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    return _digest(json.dumps([vocab, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Digest of the parameter names and shapes, a strided sample of the first, middle and last parameter tensors, and
    every LoRA tensor (small, and the part a fine-tuned teacher changes)."""
    named = list(model.named_parameters())
    chosen = {0, len(named) // 2, len(named) - 1} | {i for i, (name, _) in enumerate(named) if "lora_" in name}
    chunks = [json.dumps([(name, list(p.shape)) for name, p in named]).encode()]
    for i in sorted(chosen):
        flat = named[i][1].detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)]
        chunks.append(sample.float().cpu().numpy().tobytes())
    return _digest(*chunks)


def adapter_digest(adapter: str | Path | None) -> str | None:
    """Digest of an adapter folder's files (names and contents); adapters are small, so this reads them whole."""
    if adapter is None:
        return None
    folder = Path(adapter)
    if not folder.is_dir():
        raise InputError(f"adapter {folder}: not a folder; give the folder written by `kdscope train` or peft")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return _digest(*(c for p in files for c in (str(p.relative_to(folder)).encode(), p.read_bytes())))


def encode_sequences(tokenizer: Any, examples: Sequence[Any], prompt_style: str, max_length: int) -> list[list[int]]:
    """The token sequences the trainer builds for ``examples`` (same function, so the ids match)."""
    from .train import encode_example

    return [encode_example(tokenizer, ex, prompt_style, max_length).input_ids for ex in examples]


def cache_key(
    teacher: str,
    adapter: str | Path | None,
    tokenizer: Any,
    sequences: Sequence[Sequence[int]],
    prompt_style: str,
    k: int,
    max_length: int,
    vocab_width: int | None = None,
    model: torch.nn.Module | None = None,
) -> CacheKey:
    """The key of a cache of ``teacher`` (+ ``adapter``) over ``sequences``; ``model`` adds the weights fingerprint."""
    return CacheKey(
        teacher=teacher,
        adapter=None if adapter is None else str(adapter),
        adapter_digest=adapter_digest(adapter),
        weights=None if model is None else weights_fingerprint(model),
        data=data_digest(sequences),
        prompt_style=prompt_style,
        tokenizer=tokenizer_digest(tokenizer),
        k=k,
        max_length=max_length,
        vocab_width=vocab_width,
    )


# --------------------------------------------------------------------------------------------------------------------
# Records: the stored form of a sequence's teacher signal, and its (de)serialisation
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseRecord:
    """Teacher signal of n positions: ``log_probs`` and ``indices`` [n, k] (top-k at T = 1, descending), and
    ``log_normalizers`` [n, len(temperatures)] = logsumexp(logits / T) over the full vocabulary."""

    log_probs: np.ndarray
    indices: np.ndarray
    log_normalizers: np.ndarray


def index_dtype(vocab_width: int) -> type[np.integer[Any]]:
    return np.uint16 if vocab_width <= np.iinfo(np.uint16).max + 1 else np.int32


def normalised_temperatures(temperatures: Iterable[float]) -> list[float]:
    """T = 1 first (its normaliser turns stored log-probs back into logits), then the others sorted, deduplicated."""
    temps = {float(t) for t in temperatures}
    if any(not t > 0 for t in temps):
        raise InputError(f"temperatures must all be > 0, got {sorted(temps)}")
    return [1.0, *sorted(temps - {1.0})]


def sparsify(logits: Tensor, k: int, temperatures: Sequence[float], value_dtype: str = "float16") -> SparseRecord:
    """The stored form of dense teacher ``logits`` [n, vocab] (float32 arithmetic); ``temperatures`` as returned by
    :func:`normalised_temperatures` (T = 1 first)."""
    if temperatures[0] != 1.0:
        raise ValueError(f"temperatures must start with 1.0, got {list(temperatures)}")
    dense = logits.float()
    values, indices = dense.topk(min(k, dense.shape[-1]), dim=-1)
    normalizers = torch.stack([torch.logsumexp(dense / t, dim=-1) for t in temperatures], dim=-1)
    log_probs = values - normalizers[:, :1]
    return SparseRecord(
        log_probs=log_probs.cpu().numpy().astype(VALUE_DTYPES[value_dtype]),
        indices=indices.cpu().numpy().astype(index_dtype(dense.shape[-1])),
        log_normalizers=normalizers.cpu().numpy().astype(np.float32),
    )


def _byte_planes(array: np.ndarray) -> bytes:
    """All first bytes, then all second bytes, ...: exponents and high id bytes vary slowly, so they form runs."""
    return np.ascontiguousarray(array.view(np.uint8).reshape(-1, array.itemsize).T).tobytes()


def _from_byte_planes(buffer: memoryview | bytes, dtype: np.dtype[Any], shape: tuple[int, int]) -> np.ndarray:
    planes = np.frombuffer(buffer, dtype=np.uint8).reshape(dtype.itemsize, -1)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(shape)


@dataclass(frozen=True)
class RecordFormat:
    """How records of one cache are laid out: k columns, one normaliser per temperature, dtypes, codec."""

    k: int
    n_temperatures: int
    value_dtype: np.dtype[Any]
    index_dtype: np.dtype[Any]
    codec: str

    def _parts(self, n: int) -> list[tuple[np.dtype[Any], tuple[int, int]]]:
        return [(self.value_dtype, (n, self.k)), (self.index_dtype, (n, self.k)),
                (np.dtype(np.float32), (n, self.n_temperatures))]

    def encode(self, record: SparseRecord) -> bytes:
        arrays = (record.log_probs, record.indices, record.log_normalizers)
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


def record_tensors(record: SparseRecord, temperature_column: int) -> tuple[Tensor, Tensor, Tensor]:
    """(raw top-k logits float32 [n, k], ids int64 [n, k], logsumexp(logits / T) float32 [n]) of a record."""
    # np.array copies: records of codec "none" are read-only views of the memory map
    log_normalizers = torch.from_numpy(np.array(record.log_normalizers, dtype=np.float32))
    unit = torch.from_numpy(np.array(record.log_probs, dtype=np.float32))
    values = unit + log_normalizers[:, :1]  # column 0 is T = 1
    return values, torch.from_numpy(record.indices.astype(np.int64)), log_normalizers[:, temperature_column]


# --------------------------------------------------------------------------------------------------------------------
# The cache on disk
# --------------------------------------------------------------------------------------------------------------------
def _shard_files(root: Path, shard: int) -> tuple[Path, Path]:
    return root / f"shard-{shard:05d}.bin", root / f"shard-{shard:05d}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    # a per-process temporary name: two jobs building the same cache at once write identical files, never one file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _unique_in_order(sequences: Sequence[Sequence[int]]) -> list[tuple[str, list[int]]]:
    """(hash, ids) of each distinct sequence, first occurrence order: duplicates are stored once."""
    seen: dict[str, list[int]] = {}
    for ids in sequences:
        seen.setdefault(sequence_hash(ids), list(ids))
    return list(seen.items())


def _right_padded(batch: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
    return input_ids, attention


class TeacherCache:
    """A built teacher-signal cache (read side). Create with :meth:`build`, open with :meth:`open`."""

    def __init__(self, root: Path, manifest: dict[str, Any], index: dict[str, tuple[int, int, int, int]]) -> None:
        self.root = root
        self.manifest = manifest
        self.index = index  # sequence hash -> (shard, byte offset, byte length, positions)
        self.key = CacheKey(**manifest["key"])
        self.temperatures: list[float] = manifest["temperatures"]
        self.k: int = manifest["k"]
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
    ) -> "TeacherCache":
        """Run ``model`` once over the distinct ``sequences`` and store its top-``key.k`` signal under ``root``.

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
            _build_shard(out, shard, members, teacher, record_format, temps, pad_id, batch_size, value_dtype, on_batch)
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
    _write_atomic(path, json.dumps(manifest, indent=1).encode())


def _build_shard(out: Path, shard: int, members: list[tuple[str, list[int]]], teacher: OnlineTeacher,
                 record_format: RecordFormat, temperatures: list[float], pad_id: int, batch_size: int,
                 value_dtype: str, on_batch: Callable[[int], None] | None) -> None:
    """Teacher pass over one shard's sequences (sorted by length within the shard, so batches pad little)."""
    ordered = sorted(members, key=lambda member: len(member[1]))
    blobs: list[bytes] = []
    shard_index: dict[str, list[int]] = {}
    offset = 0
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        input_ids, attention = _right_padded([ids for _, ids in batch], pad_id)
        device = teacher.device
        logits = teacher.teacher_logits(input_ids.to(device), attention.to(device))
        for row, (seq_hash, ids) in enumerate(batch):
            blob = record_format.encode(sparsify(logits[row, : len(ids)], record_format.k, temperatures, value_dtype))
            shard_index[seq_hash] = [offset, len(blob), len(ids)]
            blobs.append(blob)
            offset += len(blob)
        if on_batch is not None:
            on_batch(len(batch))
    data_path, index_path = _shard_files(out, shard)
    _write_atomic(data_path, b"".join(blobs))
    _write_atomic(index_path, json.dumps(shard_index).encode())


# --------------------------------------------------------------------------------------------------------------------
# The cache as a teacher signal
# --------------------------------------------------------------------------------------------------------------------
def _sequence_lengths(attention_mask: Tensor) -> Tensor:
    """Row lengths of a right-padded mask; InputError on any other padding (the hash needs the unpadded ids)."""
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.to(torch.bool), positions.unsqueeze(0) < lengths.unsqueeze(1)):
        raise InputError("CachedTeacher needs right-padded batches (as kdscope.train.collate builds them)")
    return lengths


def _keep_tail_mass(clean: Tensor, noisy: Tensor, log_normalizer: Tensor, temperature: float) -> Tensor:
    """logsumexp at T after replacing the top-k logits ``clean`` by ``noisy``, the tail left as it was.

    float64: the tail is exp(normaliser) - sum(exp(top-k)), a difference of nearly equal numbers when the top-k hold
    almost all the mass; a tail that rounds to <= 0 is taken as empty.
    """
    top = torch.logsumexp(clean.double() / temperature, dim=-1)
    gap = (top - log_normalizer.double()).clamp(max=0.0)
    log_tail = log_normalizer.double() + torch.log1p(-torch.exp(gap))
    return torch.logaddexp(log_tail, torch.logsumexp(noisy.double() / temperature, dim=-1)).float()


class CachedTeacher:
    """The ``TeacherSignal`` of a :class:`TeacherCache`: no teacher model in memory, no teacher forward pass.

    Rows are looked up by the hash of their unpadded ids (batches right-padded, the attention mask gives the lengths),
    so any subset or order of the cached sequences works (training and validation sets alike). The output is the
    top-k form of :class:`kdscope.teacher.TeacherOutput` at ``temperature``, which must be one the cache was built
    for. Padding positions hold zeros (they are masked out of every loss).

    Noise ablation: Gaussian noise of scale ``noise_sigma`` (seeded CPU generator; ``state_dict``/``load_state_dict``
    carry it across a resume, like ``OnlineTeacher``) is added to the cached top-k logits only, not to the full
    vocabulary as ``OnlineTeacher(noise_sigma=...)`` does; the tail's mass is kept as it was and the log-normaliser
    recomputed to match, so ``tail_bucket`` stays a distribution.

    Sequences not in the cache go to ``fallback``, an ``OnlineTeacher`` with the same top-k, temperature and noise
    scale; a batch with any such row is sent to it whole (one teacher pass). GKD: its off-policy batches are the
    training sequences and read the cache; its on-policy batches are the student's fresh samples, which no cache can
    hold, so GKD needs the teacher online as the fallback (about lambda of its steps). Without a fallback a missing
    sequence raises InputError.
    """

    def __init__(self, cache: TeacherCache, temperature: float = 1.0, noise_sigma: float = 0.0, seed: int = 0,
                 fallback: OnlineTeacher | None = None) -> None:
        if noise_sigma < 0:
            raise InputError(f"teacher noise sigma must be >= 0, got {noise_sigma}")
        self.column = cache.temperature_column(temperature)
        if fallback is not None:
            wanted = (cache.key.k, temperature, noise_sigma)
            given = (fallback.topk, fallback.temperature, fallback.noise_sigma)
            if given != wanted:
                raise InputError(f"the fallback teacher must match the cache: (top-k, temperature, noise sigma) "
                                 f"{given} != {wanted}")
        self.cache = cache
        self.temperature = temperature
        self.noise_sigma = noise_sigma
        self.fallback = fallback
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0
        self.fallback_calls = 0

    def state_dict(self) -> dict[str, Any]:
        """Noise generator state and call counts (and the fallback's), so a resumed run draws the same noise."""
        return {"generator": self.generator.get_state(), "calls": self.calls, "fallback_calls": self.fallback_calls,
                "fallback": None if self.fallback is None else self.fallback.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
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
        for row, (seq_hash, n) in enumerate(zip(hashes, lengths)):
            values[row, :n], indices[row, :n], normalizers[row, :n] = record_tensors(
                self.cache.record(seq_hash), self.column)
        if self.noise_sigma > 0:
            noisy = values + self.noise_sigma * torch.randn(values.shape, generator=self.generator)
            normalizers = _keep_tail_mass(values, noisy, normalizers, self.temperature)
            values = noisy
        self.calls += 1
        device = input_ids.device
        return TeacherOutput(topk_values=values.to(device), topk_indices=indices.to(device),
                             topk_log_normalizer=normalizers.to(device), temperature=self.temperature)


# --------------------------------------------------------------------------------------------------------------------
# Accuracy: the KD loss from the cached signal vs from the dense teacher
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheError:
    """Per-token KD loss from the cached top-k signal vs from the dense teacher, over ``tokens`` positions."""

    k: int
    loss: str
    temperature: float
    tail: str
    tokens: int
    dense_mean: float
    mean_abs_error: float
    relative_error: float  # sum |cached - dense| / sum dense
    max_abs_error: float


def _per_token_losses(student: Tensor, teacher: Tensor, k: int, loss: str, temperature: float, tail: TailMode,
                      value_dtype: str) -> tuple[Tensor, Tensor]:
    """(dense, cached) per-token divergences times T^2 of rows [n, vocab], the cached side through the cache's own
    stored form (``sparsify`` -> ``record_tensors``) and the sparse loss's own rows (``sparse_log_probs``)."""
    temps = normalised_temperatures([temperature])
    record = sparsify(teacher, k, temps, value_dtype)
    values, indices, normalizer = record_tensors(record, temps.index(temperature))
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    dense = divergence_rows(log_p, log_q, loss, 0.5, 0.1)
    effective_tail: TailMode = "renormalise" if values.shape[-1] >= teacher.shape[-1] else tail
    sparse_p, sparse_q = sparse_log_probs(student.float(), values, indices, normalizer, temperature, effective_tail)
    cached = divergence_rows(sparse_p, sparse_q, loss, 0.5, 0.1)
    return dense * temperature**2, cached * temperature**2


@torch.no_grad()
def cache_divergence_error(
    student_logits: Tensor,
    teacher_logits: Tensor,
    ks: Sequence[int] = (8, 32, 64, 256),
    losses: Sequence[str] = ("forward_kl", "reverse_kl"),
    temperatures: Sequence[float] = (1.0, 2.0),
    tails: Sequence[TailMode] = ("tail_bucket", "renormalise"),
    value_dtype: str = "float16",
    chunk_rows: int = 64,
) -> list[CacheError]:
    """How far the per-token KD loss from a cache of top-k is from the dense teacher's, for each k, loss,
    temperature and tail mode. ``student_logits`` and ``teacher_logits`` are [tokens, vocab] (masked positions only)."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise InputError(f"need [tokens, vocab] logits of one shape, got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    results = []
    for k in ks:
        for loss in losses:
            for temperature in temperatures:
                for tail in tails:
                    pairs = [_per_token_losses(student_logits[i : i + chunk_rows], teacher_logits[i : i + chunk_rows],
                                               k, loss, temperature, tail, value_dtype)
                             for i in range(0, student_logits.shape[0], chunk_rows)]
                    dense = torch.cat([d for d, _ in pairs]).double()
                    error = (torch.cat([c for _, c in pairs]).double() - dense).abs()
                    results.append(CacheError(
                        k=k, loss=loss, temperature=temperature, tail=tail, tokens=int(dense.numel()),
                        dense_mean=float(dense.mean()), mean_abs_error=float(error.mean()),
                        relative_error=float(error.sum() / dense.sum().clamp(min=1e-30)),
                        max_abs_error=float(error.max())))
    return results
