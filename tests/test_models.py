"""Model loading: built-in tiny models, HF save/load round trip, LoRA attach/save/load, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdscope.errors import InputError
from kdscope.models import (BUILTIN_MODELS, LoraSettings, attach_lora, build_tiny_model, count_parameters,
                            load_model, resolve_dtype, save_model, tiny_tokenizer, train_tiny_tokenizer_json)


def test_builtin_models_are_seeded_and_share_one_tokenizer() -> None:
    sizes = {name: count_parameters(build_tiny_model(name)[0]) for name in BUILTIN_MODELS}
    assert sizes["tiny-qwen-xs"] < sizes["tiny-qwen-s"] < sizes["tiny-qwen-m"] < sizes["tiny-qwen-l"]
    a, tok = build_tiny_model("tiny-qwen-s", seed=3)
    b, _ = build_tiny_model("tiny-qwen-s", seed=3)
    c, _ = build_tiny_model("tiny-qwen-s", seed=4)
    ids = torch.tensor([tok("The answer is 4.")["input_ids"]])
    torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits)
    assert not torch.allclose(a(input_ids=ids).logits, c(input_ids=ids).logits)
    assert type(a).__name__ == "Qwen2ForCausalLM"
    assert type(build_tiny_model("tiny-llama-s")[0]).__name__ == "LlamaForCausalLM"


def test_tiny_tokenizer_is_identical_across_processes() -> None:
    """Teacher and student jobs run in different processes; they must encode text the same way."""
    code = "from kdscope.models import tiny_tokenizer; print(tiny_tokenizer()('Tom has 3 apples.')['input_ids'])"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(outs) == 1
    tok = tiny_tokenizer()
    assert len(tok) == 512 and tok.decode(tok("any text, ünïcode 123")["input_ids"]) == "any text, ünïcode 123"
    assert '"type": "BPE"' in train_tiny_tokenizer_json(vocab_size=300).replace('":"', '": "')


def test_hf_round_trip_and_lora(tmp_path: Path) -> None:
    model, tok = build_tiny_model("tiny-qwen-xs", seed=1)
    save_model(model, tok, tmp_path / "base")
    loaded, tok2 = load_model(str(tmp_path / "base"), device="cpu")
    ids = torch.tensor([tok("What is 2 plus 2?")["input_ids"]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tok2("What is 2 plus 2?")["input_ids"] == ids[0].tolist() and tok2.padding_side == "left"
    peft_model = attach_lora(loaded, LoraSettings())
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    reloaded, _ = load_model(str(tmp_path / "base"), adapter=tmp_path / "adapter", device="cpu")
    peft_model.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, peft_model(input_ids=ids).logits)


def test_model_errors_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown built-in model"):
        load_model("builtin:tiny-gpt")
    with pytest.raises(InputError, match="no such file or folder"):
        load_model(str(tmp_path / "nothing"))
    with pytest.raises(InputError, match="adapter_config.json"):
        load_model("builtin:tiny-qwen-xs", adapter=tmp_path)
    with pytest.raises(InputError, match="target_modules"):
        attach_lora(build_tiny_model("tiny-qwen-xs")[0], LoraSettings(target_modules=["c_attn"]))
    with pytest.raises(InputError, match="unknown dtype"):
        resolve_dtype("fp8")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
