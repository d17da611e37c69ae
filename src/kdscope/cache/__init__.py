"""Teacher-signal cache: run the teacher once over a training set; every KD run distilling from it reads the cache.

What is stored, per position of each (deduplicated) training sequence:

- the teacher's top-k token ids (uint16 when the logit width fits, int32 otherwise);
- their log-probabilities at T = 1, ``logit - logsumexp(logits)``, in float16 (or float32). Log-probabilities rather
  than raw logits because float16 precision is relative: the entries that carry the mass sit near 0, where float16
  resolves ~5e-4, while raw logits of 20-30 would be rounded by 0.01-0.03 (1-3 % in probability);
- ``logsumexp(logits / T)`` over the full vocabulary, float32, for every temperature T named at build time (T = 1
  always included). The top-k logits do not determine this normaliser for T != 1 (it depends on every tail logit),
  and ``tail="tail_bucket"`` needs it at the loss temperature to know the teacher's tail mass. Storing it costs
  4 bytes per position and temperature and is exact; a cache refuses a temperature it was not built for;
- the log of the mass outside the top-k at each of those T, float32, summed over the tail ids at build time: 1 - sum
  of the stored (rounded) top-k probabilities would lose any tail below their rounding (format version 2).
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
``build_teacher_signal`` picks online or cached signal from a run's resolved settings (CLI and study alike).

Modules: ``key`` (key and digests), ``codec`` (records and their bytes), ``store`` (shards on disk: build, open),
``cached_teacher``, ``accuracy`` (cached vs dense KD loss), ``wiring`` (the teacher-signal builder).
"""

from __future__ import annotations

import hashlib

from .accuracy import CacheError, cache_divergence_error
from .cached_teacher import CachedTeacher
from .codec import CODECS, VALUE_DTYPES, Codec, RecordFormat, SparseRecord, normalised_temperatures, record_tensors, sparsify
from .key import (
    CacheKey,
    adapter_digest,
    cache_key,
    data_digest,
    encode_sequences,
    sequence_hash,
    tokenizer_digest,
    weights_fingerprint,
)
from .store import FORMAT_VERSION, MANIFEST, TeacherCache
from .wiring import SignalSettings, build_teacher_signal

__all__ = [
    "CODECS", "FORMAT_VERSION", "MANIFEST", "VALUE_DTYPES", "CacheError", "CacheKey", "CachedTeacher", "Codec",
    "RecordFormat", "SignalSettings", "SparseRecord", "TeacherCache", "adapter_digest", "build_teacher_signal", "cache_divergence_error", "cache_key",
    "data_digest", "encode_sequences", "normalised_temperatures", "record_tensors", "sequence_hash", "sparsify",
    "tokenizer_digest", "weights_fingerprint",
]
