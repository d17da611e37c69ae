"""Evaluation: generative (HF or vLLM backends, resumable records) and lm-eval-compatible likelihood scoring.

- `generate`: decoding presets, generation backends, the resumable generative loop;
- `records`: per-item JSONL records, resume, summaries, the study's result-table row;
- `choices`: multiple-choice items parsed from the study's instructions, and their likelihood requests;
- `loglik`: the packed likelihood engine (lm-eval's tokenisation and scores).
"""

from .choices import LOGLIK_TASKS, ChoiceItem, ChoiceRequest, LoglikPrompt, choice_requests, parse_choice_item
from .generate import (
    INSTRUCTION_STOP,
    PRESETS,
    GenerationBackend,
    GenerationSettings,
    Generator,
    HFGenerator,
    VLLMGenerator,
    answer_text,
    clean_answer_text,
    cut_at_stop,
    evaluate_generate,
    evaluate_generate_with,
    generate_responses,
    generation_preset,
    make_generator,
    plan_batches,
    run_generation,
    study_answer_text,
    vllm_available,
)
from .loglik import choose, encode_pair, evaluate_loglik, score_choice_requests
from .records import read_done, score_records, summarize, summary_row, write_summary_csv

__all__ = [
    "INSTRUCTION_STOP",
    "LOGLIK_TASKS",
    "PRESETS",
    "ChoiceItem",
    "ChoiceRequest",
    "GenerationBackend",
    "GenerationSettings",
    "Generator",
    "HFGenerator",
    "LoglikPrompt",
    "VLLMGenerator",
    "answer_text",
    "choice_requests",
    "choose",
    "clean_answer_text",
    "cut_at_stop",
    "encode_pair",
    "evaluate_generate",
    "evaluate_generate_with",
    "evaluate_loglik",
    "generate_responses",
    "generation_preset",
    "make_generator",
    "parse_choice_item",
    "plan_batches",
    "read_done",
    "run_generation",
    "score_choice_requests",
    "score_records",
    "study_answer_text",
    "summarize",
    "summary_row",
    "vllm_available",
    "write_summary_csv",
]
