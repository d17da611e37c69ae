"""Bad input at the edges (issue 13): every case is refused with one line on stderr naming the culprit, exit code 2,
never a traceback; and a GGUF-loaded model can be fully fine-tuned.

A tiny GGUF file is written here from the built-in tiny-llama-s (F32 tensors, its byte-level BPE as a gpt2
tokenizer), so the GGUF paths run in seconds without the 98 MB SmolLM2 file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from kdscope.cli import app
from kdscope.errors import InputError

NON_UTF8 = b'[{"instruction": "caf\xe9", "answer": "1", "output": "1"}]'  # Latin-1 e-acute: not UTF-8


def refused(result: Result, *names: str) -> str:
    """Assert a one-line error on stderr with exit code 2, naming each of ``names``; return the line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert "Traceback" not in result.output
    return lines[0]


def invoke(args: list[str]) -> Result:
    return CliRunner().invoke(app, args)


def write_tiny_gguf(path: Path) -> Path:
    """The built-in tiny-llama-s as a GGUF file (what a llama.cpp conversion of it would hold)."""
    import gguf

    from kdscope.models import build_tiny_model

    model, tok = build_tiny_model("tiny-llama-s")
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-s")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tok.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    special = {tok.eos_token_id, tok.pad_token_id}
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tok.eos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":  # tied to the embedding
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


# --------------------------------------------------------------------------------------------------------------------
# Tracebacks that must be one line, exit 2
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train sft", "eval", "score"])
def test_non_utf8_data_file_is_one_line(tmp_path: Path, command: str) -> None:
    data = tmp_path / "latin1.json"
    data.write_bytes(NON_UTF8)
    args = {
        "train sft": ["train", "sft", "--model", "builtin:tiny-qwen-xs", "--data", str(data), "--out", str(tmp_path / "o")],
        "eval": ["eval", "--model", "builtin:tiny-qwen-xs", "--tasks", "boolq", "--data", str(data), "--out", str(tmp_path / "o")],
        "score": ["score", "--task", "boolq", "--predictions", str(data)],
    }[command]
    line = refused(invoke(args), str(data), "UTF-8")
    assert "line 1, column 22" in line  # where the bad byte sits, so the user can find it


@pytest.mark.parametrize("damage", ["truncated header", "truncated tensors", "random bytes", "empty", "text"])
def test_broken_gguf_is_one_line(tmp_path: Path, tiny_gguf: Path, damage: str) -> None:
    from kdscope.models import load_model

    good = tiny_gguf.read_bytes()
    bad = tmp_path / "broken.gguf"
    bad.write_bytes({
        "truncated header": good[:200],
        "truncated tensors": good[: len(good) - 5000],
        "random bytes": os.urandom(4096),
        "empty": b"",
        "text": b"GGUF? no, a README\n" * 10,
    }[damage])
    with pytest.raises(InputError, match="not a valid GGUF") as info:
        load_model(str(bad), device="cpu")
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_broken_gguf_on_the_command_line(tmp_path: Path, tiny_gguf: Path) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:100_000])
    refused(invoke(["train", "sft", "--model", str(bad), "--data", "synthetic:math:4", "--out", str(tmp_path / "o")]),
            str(bad), "not a valid GGUF")


@pytest.mark.parametrize("content", [{}, {"config.json": "{oops"}, {"config.json": "{}", "tokenizer.json": "[]"}])
def test_a_folder_that_is_no_model(tmp_path: Path, content: dict[str, str]) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for name, text in content.items():
        (folder / name).write_text(text)
    refused(invoke(["train", "sft", "--model", str(folder), "--data", "synthetic:math:4", "--out", str(tmp_path / "o")]),
            str(folder), "cannot load")


@pytest.mark.parametrize("command", ["run", "train sft", "train kd", "eval"])
def test_out_naming_an_existing_file(tmp_path: Path, command: str) -> None:
    from kdscope.study import builtin_study

    taken = tmp_path / "results.txt"
    taken.write_text("keep me\n")
    data = tmp_path / "boolq.json"
    data.write_text(json.dumps([{"instruction": "q", "answer": "true", "output": "true"}]))
    args = {
        "run": ["run", str(builtin_study("demo")), "--out", str(taken), "--quiet"],
        "train sft": ["train", "sft", "--model", "builtin:tiny-qwen-xs", "--data", "synthetic:math:4", "--out", str(taken)],
        "train kd": ["train", "kd", "--student", "builtin:tiny-qwen-xs", "--teacher", "builtin:tiny-qwen-s",
                     "--data", "synthetic:math:4", "--out", str(taken)],
        "eval": ["eval", "--model", "builtin:tiny-qwen-xs", "--tasks", "boolq", "--data", str(data), "--out", str(taken)],
    }[command]
    refused(invoke(args), "--out", str(taken), "is a file")
    assert taken.read_text() == "keep me\n"


def test_out_inside_a_file(tmp_path: Path) -> None:
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me\n")
    refused(invoke(["train", "sft", "--model", "builtin:tiny-qwen-xs", "--data", "synthetic:math:4",
                    "--out", str(taken / "run")]), "--out", str(taken), "is a file")


def test_full_finetuning_of_a_gguf_model(tmp_path: Path, tiny_gguf: Path) -> None:
    """transformers marks a GGUF-loaded model as quantized, so saving the fully trained weights failed (and left
    ``final.tmp`` behind). The weights are dequantized at load: the model saves and reloads as a plain folder."""
    import torch

    from kdscope.models import load_model

    out = tmp_path / "full"
    result = invoke(["train", "sft", "--model", str(tiny_gguf), "--data", "synthetic:math:8", "--out", str(out),
                     "--full", "--max-steps", "2", "--val-size", "0", "--micro-batch-size", "2", "--grad-accum", "1",
                     "--max-length", "48", "--device", "cpu"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert (out / "final" / "model.safetensors").is_file()
    trained, _ = load_model(str(out / "final"), device="cpu", dtype="float32")
    base, _ = load_model(str(tiny_gguf), device="cpu", dtype="float32")
    emb = "model.embed_tokens.weight"
    assert not torch.equal(trained.state_dict()[emb], base.state_dict()[emb])  # trained all weights, and kept them


def test_study_with_lora_null_fully_finetunes_a_gguf_model(tmp_path: Path, tiny_gguf: Path) -> None:
    """The same through a study (``training.lora: null``): its SFT job saves full weights, no ``best.tmp`` left."""
    from kdscope.study import StudyStore, expand, load_study
    from kdscope.study.jobs import run_job

    spec = tmp_path / "study.yaml"
    spec.write_text(json.dumps({  # JSON is YAML
        "name": "gguf-full", "device": "cpu", "methods": ["SeqKD"], "temperatures": [1.0],
        "families": [{"name": "tiny", "teachers": [{"name": "T-100K", "model": str(tiny_gguf)}],
                      "students": [{"name": "S-100K", "model": str(tiny_gguf)}]}],
        "domains": [{"name": "math", "train": "synthetic:math:8", "tasks": [{"task": "toy_add"}]}],
        "training": {"lora": None, "common": {"max_steps": 2, "val_size": 4, "eval_every": 1, "micro_batch_size": 2,
                                              "grad_accum": 1, "max_length": 48, "warmup_steps": 0}},
    }))
    root = tmp_path / "run"
    sft = next(job for job in expand(load_study(spec)) if job.kind == "sft")
    run_job(sft, root, StudyStore(root / "study.sqlite"), progress=False)
    written = list(root.rglob("*"))
    assert not [p for p in written if p.name.endswith(".tmp")], written
    assert [p for p in written if p.name == "model.safetensors" and p.parent.name == "final"]


# --------------------------------------------------------------------------------------------------------------------
# Accepted silently before
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content", [("preds.json", "[]"), ("preds.json", " \n"), ("preds.jsonl", ""),
                                           ("preds.jsonl", "\n\n")])
def test_score_on_no_records(tmp_path: Path, name: str, content: str) -> None:
    preds = tmp_path / name
    preds.write_text(content)
    refused(invoke(["score", "--task", "boolq", "--predictions", str(preds)]), str(preds), "no rows")


# --------------------------------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, position", [
    (b"name: x\nfamilies: [\n  {name: a\ndomains: []\n", "line 4, column 8"),  # an unclosed flow mapping
    (b"name: x\nfamilies:\n\t- a\n", "line 3, column 1"),  # a tab
    ("name: é\nfoo: a\x01b\n".encode(), "line 2, column 7"),  # a control character after a 2-byte character
    (b"name: x\nfoo: caf\xe9\n", "line 2, column 9"),  # Latin-1, not UTF-8
])
def test_yaml_errors_name_line_and_column(tmp_path: Path, content: bytes, position: str) -> None:
    study = tmp_path / "study.yaml"
    study.write_bytes(content)
    refused(invoke(["run", str(study), "--plan"]), str(study), position)


def test_study_nested_setting_error_names_the_key(tmp_path: Path) -> None:
    from kdscope.study import load_study

    study = tmp_path / "study.yaml"
    study.write_text("name: x\nfamilies: []\ndomains: []\ntraining:\n  kd: {max_stpes: 5}\n")
    with pytest.raises(InputError) as info:
        load_study(study)
    message = str(info.value)
    assert "training.kd.max_stpes" in message and "check the spelling" in message
    assert "Value error" not in message and "(top level)" not in message


@pytest.mark.parametrize("option, value, named", [("--weight", "2", "--weight"), ("--loss", "nosuchloss", "--loss"),
                                                  ("--lambda", "7", "--lambda"), ("--temperature", "-1", "--temperature")])
def test_kd_options_are_named_as_typed(tmp_path: Path, option: str, value: str, named: str) -> None:
    line = refused(invoke(["train", "kd", "--student", "builtin:tiny-qwen-xs", "--teacher", "builtin:tiny-qwen-s",
                           "--data", "synthetic:math:4", "--out", str(tmp_path / "o"), option, value]), named)
    assert "--kd-weight" not in line and "--:" not in line and "--lmbda" not in line


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--max-new-tokens", "0")])
def test_eval_generation_options_are_checked(tmp_path: Path, option: str, value: str) -> None:
    data = tmp_path / "boolq.json"
    data.write_text(json.dumps([{"instruction": "q", "answer": "true", "output": "true"}]))
    refused(invoke(["eval", "--model", "builtin:tiny-qwen-xs", "--tasks", "boolq", "--data", str(data),
                    "--out", str(tmp_path / "o"), option, value]), option, "greater than or equal to 1")


@pytest.mark.parametrize("content", ["[]", ""])
def test_empty_training_file_says_no_rows(tmp_path: Path, content: str) -> None:
    data = tmp_path / "train.json"
    data.write_text(content)
    line = refused(invoke(["train", "sft", "--model", "builtin:tiny-qwen-xs", "--data", str(data),
                           "--out", str(tmp_path / "o")]), str(data), "no rows")
    assert "output" not in line


def test_score_missing_answer_says_records_lack_it(tmp_path: Path) -> None:
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{"output": "true"}]))
    line = refused(invoke(["score", "--task", "boolq", "--predictions", str(preds)]), str(preds), "'answer'")
    assert "--field" not in line
    preds.write_text(json.dumps([{"answer": "true", "text": "true"}]))
    refused(invoke(["score", "--task", "boolq", "--predictions", str(preds)]), "'output'", "--field")


def test_rows_are_numbered_from_one_everywhere(tmp_path: Path) -> None:
    from kdscope.data import load_examples, load_task

    good = {"instruction": "q", "answer": "true", "output": "true"}
    data = tmp_path / "data.json"
    data.write_text(json.dumps([good, {"instruction": "q"}]))
    with pytest.raises(InputError, match=r"row 2 \(1-based\) field 'answer'"):
        load_examples(data)
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(InputError, match=r"line 2"):
        load_examples(lines)
    data.write_text(json.dumps([good, {**good, "answer": "maybe"}]))
    with pytest.raises(InputError, match=r"row 2 \(1-based\) field 'answer'"):
        load_task("boolq", data)
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([good, {"answer": "true"}]))
    refused(invoke(["score", "--task", "boolq", "--predictions", str(preds)]), "row 2 (1-based)")


def test_a_folder_where_a_file_goes(tmp_path: Path) -> None:
    """`stats --json` naming a folder: the OS error of writing there becomes one line naming the path."""
    table = tmp_path / "math_results.csv"
    table.write_text("Teacher,Student,Method,gsm8k,Average\n"
                     "T-1B,S-0.5B,SFT,10,10\nT-1B,S-0.5B,student_KD_temp_1.0,12,12\n"
                     "T-1B,S-1B,SFT,20,20\nT-1B,S-1B,student_KD_temp_1.0,21,21\n")
    folder = tmp_path / "stats.json"
    folder.mkdir()
    refused(invoke(["stats", str(table), "--json", str(folder)]), str(folder))


def test_one_line_translates_pydantic_errors() -> None:
    """The one translator: key path, message without pydantic's prefixes, the bad value (cut short), a hint for a
    misspelled key, how many more problems there are; always one line."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

    from kdscope.errors import one_line

    class Inner(BaseModel):
        model_config = ConfigDict(extra="forbid")
        steps: int = Field(1, ge=1)

        @field_validator("steps")
        @classmethod
        def _small(cls, v: int) -> int:
            if v > 100:
                raise ValueError(f"{v} steps is\nmore than 100")
            return v

    class Outer(BaseModel):
        model_config = ConfigDict(extra="forbid")
        inner: Inner
        name: str = "x"

    def error(data: dict) -> str:
        with pytest.raises(ValidationError) as info:
            Outer.model_validate(data)
        return str(one_line(info.value, "study.yaml"))

    assert error({"inner": {"stpes": 3}}) == ("study.yaml: inner.stpes: Extra inputs are not permitted (got 3) - "
                                              "remove it or check the spelling")
    assert error({"inner": {"steps": 0}}) == "study.yaml: inner.steps: Input should be greater than or equal to 1 (got 0)"
    assert error({"inner": {"steps": 500}}) == "study.yaml: inner.steps: 500 steps is more than 100"
    assert error({"inner": {"steps": 0}, "name": 5}).endswith("(got 0) [and 1 more problem]")
    long = error({"inner": {"steps": "n" * 500}})
    assert "(got 'nnn" in long and "n" * 61 not in long and long.endswith("...)")
    assert error({"inner": {"": 1}}).startswith("study.yaml: inner.'': Extra inputs")
    with pytest.raises(ValidationError) as info:
        Outer.model_validate({"inner": {"steps": 0}})
    assert str(one_line(info.value, name=lambda loc: "--" + str(loc[-1]))).startswith("--steps: Input should be")


def test_a_folder_that_is_no_saved_dataset(tmp_path: Path) -> None:
    from kdscope.data import load_task

    folder = tmp_path / "boolq_hf"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")  # looks like a save_to_disk folder, holds no data
    with pytest.raises(InputError, match="cannot load the dataset") as info:
        load_task("boolq", folder)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)
