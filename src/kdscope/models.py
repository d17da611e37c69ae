"""Loading causal LMs and tokenizers (hub id, local folder, GGUF file, built-in tiny models) and LoRA adapters.

References accepted by `load_model`:
- ``builtin:<name>``: a tiny Qwen2/Llama-architecture model built locally (no download), see `BUILTIN_MODELS`;
- a local folder in HF format (optionally holding a saved LoRA adapter, see `load_model(adapter=...)`);
- a ``.gguf`` file (dequantized by transformers at load);
- a hub id such as ``Qwen/Qwen2.5-0.5B`` (needs network or a populated HF cache).
"""

from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import BaseModel, Field

from .errors import InputError
from .synthetic import corpus

# transformers, tokenizers and peft are imported inside the functions that use them: they take seconds to import,
# and the command line, stats and report never load a model.

BUILTIN_PREFIX = "builtin:"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TINY_VOCAB_SIZE = 512


class LoraSettings(BaseModel):
    """LoRA adapter settings; the defaults are the study's (study.md section 2)."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])


@dataclass(frozen=True)
class TinySpec:
    """A built-in tiny architecture (a Qwen2 or Llama config scaled down); its size label comes from its parameter
    count (`kdscope.labels`)."""

    arch: str  # "qwen2" or "llama"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


BUILTIN_MODELS: dict[str, TinySpec] = {
    "tiny-qwen-xs": TinySpec("qwen2", 32, 2, 4, 2, 64),
    "tiny-qwen-s": TinySpec("qwen2", 48, 2, 4, 2, 96),
    "tiny-qwen-m": TinySpec("qwen2", 64, 3, 4, 2, 128),
    "tiny-qwen-l": TinySpec("qwen2", 128, 4, 4, 2, 256),
    "tiny-llama-s": TinySpec("llama", 48, 2, 4, 2, 96),
    "tiny-llama-l": TinySpec("llama", 128, 4, 4, 2, 256),
}


# --------------------------------------------------------------------------------------------------------------------
# Devices and dtypes
# --------------------------------------------------------------------------------------------------------------------
def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU (half precision is slow there)."""
    if dtype == "auto":
        if device is not None and device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


# --------------------------------------------------------------------------------------------------------------------
# Built-in tiny models
# --------------------------------------------------------------------------------------------------------------------
TINY_TOKENIZER_FILE = Path(__file__).parent / "assets" / "tiny_tokenizer.json"


def train_tiny_tokenizer_json(vocab_size: int = TINY_VOCAB_SIZE) -> str:
    """Train the built-in byte-level BPE on the demo corpus (how ``assets/tiny_tokenizer.json`` was made).

    The `tokenizers` trainer breaks ties between equally frequent pairs in hash order, which varies between
    processes, so the shipped file, not a fresh training, is what every process uses: teacher and student must
    share one tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok.to_str()


def tiny_tokenizer() -> Any:
    """The built-in byte-level BPE tokenizer (512 entries), trained locally on the demo corpus: any text encodes."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(TINY_TOKENIZER_FILE)), eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    tok.padding_side = "left"
    return tok


def tiny_config(name: str, vocab_size: int = TINY_VOCAB_SIZE, eos_token_id: int = 0, pad_token_id: int = 1) -> Any:
    """The transformers config of a built-in tiny model."""
    from transformers import LlamaConfig, Qwen2Config

    if name not in BUILTIN_MODELS:
        raise InputError(f"unknown built-in model {name!r}; choose from {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    cls = Qwen2Config if spec.arch == "qwen2" else LlamaConfig
    return cls(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=1024,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=eos_token_id,
        tie_word_embeddings=True,
    )


def build_tiny_model(name: str, seed: int = 0, tokenizer: Any = None) -> tuple[Any, Any]:
    """A randomly initialised built-in model (seeded) and the built-in tokenizer, or the given ``tokenizer`` (a variant
    of the built-in one; the model's vocabulary is sized to it)."""
    from transformers import AutoModelForCausalLM

    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = tiny_config(name, len(tok), tok.eos_token_id, tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def _looks_like_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~"))


def _plain_tokenizers_folder(path: Path) -> bool:
    """A folder whose tokenizer is a plain `tokenizers` file (the built-in one, saved with a model).

    AutoTokenizer would pick the tokenizer class from the model type (Qwen2Tokenizer for a qwen2 config), whose
    pre-tokenizer splits text differently from the file's own: the model would see other tokens than it was trained
    on. Loading the file as it is avoids that.
    """
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text()).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(ref: str, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer of a model reference; left padding, pad token set (EOS when the model has none)."""
    from transformers import AutoTokenizer

    if ref.startswith(BUILTIN_PREFIX):
        return tiny_tokenizer()
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        with reading_gguf(path):
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                                trust_remote_code=trust_remote_code)
    elif _plain_tokenizers_folder(path):
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else ref, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _quiet_transformers() -> None:
    """Progress bars for loading/saving a few tensors only clutter kdscope's own progress output."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_model(
    ref: str,
    *,
    adapter: str | Path | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    seed: int = 0,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a built-in name, a local folder, a GGUF file or a hub id.

    ``adapter`` is a folder with a saved LoRA adapter (peft) applied on top. ``trust_remote_code`` stays off unless
    asked for, because it runs code shipped with the checkpoint.
    """
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if ref.startswith(BUILTIN_PREFIX):
        model, tok = build_tiny_model(ref.removeprefix(BUILTIN_PREFIX), seed=seed)
        model = model.to(torch_dtype)
    else:
        path = Path(ref).expanduser()
        if not path.exists() and not _looks_like_hub_id(ref):
            raise InputError(f"model {ref!r}: no such file or folder; give a local path, a .gguf file, a hub id or builtin:<name>")
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if path.suffix == ".gguf":
            model, tok = _load_gguf(path, kwargs)
        else:
            try:
                tok = load_tokenizer(ref, trust_remote_code)
                model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else ref, **kwargs)
            except (OSError, ValueError, TypeError, KeyError) as e:  # no model folder, a garbled one, offline hub id
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise InputError(f"model {ref}: cannot load it ({first}); give a folder in the HF format (config.json, "
                                 "weights, tokenizer files), a .gguf file, a cached hub id or builtin:<name>") from None
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tok.pad_token_id
    if adapter is not None:
        model = load_adapter(model, adapter)
    return model.to(dev), tok


def config_logit_width(ref: str, trust_remote_code: bool = False) -> int:
    """A model reference's logit width (its LM head's rows, ``vocab_size`` in its config) without loading weights:
    enough to size a teacher cache for the students that will read it before any of them is loaded."""
    from transformers import AutoConfig

    if ref.startswith(BUILTIN_PREFIX):
        return len(tiny_tokenizer())  # every built-in model's head has the built-in tokenizer's width
    path = Path(ref).expanduser()
    try:
        if path.suffix == ".gguf":
            with reading_gguf(path):
                config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    trust_remote_code=trust_remote_code)
        else:
            config = AutoConfig.from_pretrained(str(path) if path.exists() else ref,
                                                trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # no config, a garbled one, an uncached hub id offline
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise InputError(f"model {ref}: cannot read its config ({first}); give a folder in the HF format, a .gguf "
                         "file, a cached hub id or builtin:<name>") from None
    return int(config.get_text_config().vocab_size)


GGUF_MAGIC = b"GGUF"
# What the gguf reader and transformers' converter raise on a cut-short or garbled file: a short read (struct.error,
# an empty mmap), a tensor whose bytes run past the end (a reshape ValueError), metadata of the wrong type or missing.
_BROKEN_GGUF = (ValueError, struct.error, IndexError, KeyError, TypeError, EOFError)


@contextmanager
def reading_gguf(path: Path) -> Iterator[None]:
    """Check that ``path`` starts like a GGUF file, and turn what a broken one raises inside into one InputError."""
    def broken(why: str) -> InputError:
        return InputError(f"model {path}: not a valid GGUF file ({why}); the file may be cut short or corrupted: "
                          "convert or download it again")

    if not path.is_file():
        raise InputError(f"model {path}: a .gguf model must be a file")
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise broken(f"it starts with {magic!r}, not {GGUF_MAGIC!r}")
    try:
        yield
    except _BROKEN_GGUF as e:
        first = str(e).splitlines()[0][:200] if str(e) else "truncated or garbled"
        raise broken(f"{type(e).__name__}: {first}") from None


def _load_gguf(path: Path, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """A GGUF file's model (dequantized by transformers) and tokenizer; a broken file is one InputError."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(path), kwargs.get("trust_remote_code", False))
    with reading_gguf(path):
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
    return drop_gguf_quantizer(model), tok


def drop_gguf_quantizer(model: Any) -> Any:
    """Drop the "quantized with gguf" marks transformers leaves on a GGUF-loaded model.

    The weights are plain tensors after dequantization at load, but the marks make ``save_pretrained`` refuse:
    full fine-tuning of a GGUF model failed when saving its weights. Without them the model saves like any other.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_trained(base_ref: str, trained_dir: str | Path, **load_kwargs: Any) -> tuple[Any, Any]:
    """Load a model written by `kdscope.train.train`: a LoRA adapter on ``base_ref``, or full weights in ``trained_dir``."""
    trained = Path(trained_dir)
    if (trained / "adapter_config.json").is_file():
        return load_model(base_ref, adapter=trained, **load_kwargs)
    return load_model(str(trained), **load_kwargs)


def save_model(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save in the HF format (safetensors). A peft model saves only its adapter."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def dequantized_copy(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Cache a GGUF-loaded (dequantized) model as safetensors so it reloads in about a second."""
    return save_model(drop_gguf_quantizer(model), tokenizer, out_dir)


# --------------------------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------------------------
def attach_lora(model: Any, settings: LoraSettings | None = None) -> Any:
    """Wrap ``model`` with fresh, trainable LoRA adapters (peft)."""
    from peft import LoraConfig, get_peft_model

    s = settings or LoraSettings()
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in s.target_modules if m not in names]
    if missing:
        raise InputError(f"lora.target_modules: {missing} not found in the model; available linear layers include "
                         f"{sorted(n for n in names if n.endswith('proj'))}")
    config = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=s.target_modules,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_adapter(model: Any, adapter: str | Path, trainable: bool = False) -> Any:
    """Apply a saved LoRA adapter (a folder with ``adapter_config.json``)."""
    from peft import PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"adapter {path}: no adapter_config.json; give a folder written by `kdscope train` or peft")
    return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
