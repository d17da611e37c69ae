"""The study's 14 zero-shot tasks: names, aliases, domains and the exact answer parsing / correctness rules.

The rules restate study.md section 3 (the released `evaluate.py` / `commonsense_evaluate.py`):
- math (gsm8k, svamp, multiarith, singleeq, addsub): commas removed, the *last* match of `-?\\d+\\.?\\d*` is the
  prediction (``inf`` when there is none), correct when ``abs(gold - pred) <= 0.001``;
- aqua: the *first* capital letter matched by `A|B|C|D|E` in the stripped output, compared with the gold letter;
- commonsense: the *first* match of the task's answer words (case-sensitive), compared with the gold label.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

Domain = Literal["math", "commonsense"]
AnswerType = Literal["number", "letter", "label"]

MATH_TOLERANCE = 0.001
_NUMBER_RE = re.compile(r"-?\d+\.?\d*")
_LETTER_RE = re.compile(r"A|B|C|D|E")

Prediction = float | str


@dataclass(frozen=True)
class Task:
    """One evaluation task and its scoring rule."""

    name: str
    domain: Domain
    answer_type: AnswerType
    study_folder: str
    labels: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    test_size: int = 0

    @property
    def choices(self) -> tuple[str, ...]:
        """Answer options of a multiple-choice task (labels or letters); empty for numeric tasks."""
        if self.answer_type == "letter":
            return ("A", "B", "C", "D", "E")
        return self.labels

    def parse(self, text: str) -> Prediction:
        """Extract the predicted answer from a generated response, exactly as the study does."""
        if self.answer_type == "number":
            matches = _NUMBER_RE.findall(text.replace(",", ""))
            return float(matches[-1]) if matches else math.inf
        if self.answer_type == "letter":
            letters = _LETTER_RE.findall(text.strip())
            return letters[0] if letters else ""
        found = self._label_re.findall(text.strip())
        return found[0] if found else ""

    def gold(self, answer: str) -> Prediction:
        """Normalise a gold answer; raises ValueError when it cannot be one of this task's answers."""
        if self.answer_type == "number":
            return float(str(answer).replace(",", ""))
        answer = str(answer).strip()
        if answer not in self.choices:
            raise ValueError(f"gold answer {answer!r} is not one of {'/'.join(self.choices)}")
        return answer

    def is_correct(self, prediction: Prediction, gold: Prediction) -> bool:
        if self.answer_type == "number":
            return abs(float(gold) - float(prediction)) <= MATH_TOLERANCE
        return prediction == gold

    def score(self, text: str, answer: str) -> bool:
        """Parse ``text`` and compare it with the gold ``answer``."""
        return self.is_correct(self.parse(text), self.gold(answer))

    @property
    def _label_re(self) -> re.Pattern[str]:
        return re.compile("|".join(re.escape(label) for label in self.labels))


def _labels(stem: str, n: int) -> tuple[str, ...]:
    return tuple(f"{stem}{i}" for i in range(1, n + 1))


_ANSWER5 = _labels("answer", 5)

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("gsm8k", "math", "number", "gsm8k", aliases=("GSM8K",), test_size=1319),
        Task("svamp", "math", "number", "SVAMP", test_size=1000),
        Task("multiarith", "math", "number", "MultiArith", test_size=600),
        Task("singleeq", "math", "number", "SingleEq", test_size=508),
        Task("addsub", "math", "number", "AddSub", test_size=395),
        Task("aqua", "math", "letter", "AQuA", test_size=254),
        Task("boolq", "commonsense", "label", "boolq", ("true", "false"), test_size=3270),
        Task("piqa", "commonsense", "label", "piqa", _labels("solution", 2), test_size=1838),
        Task("siqa", "commonsense", "label", "social_i_qa", _ANSWER5, ("social_iqa",), test_size=1954),
        Task("hellaswag", "commonsense", "label", "hellaswag", _labels("ending", 4), test_size=10042),
        Task("winogrande", "commonsense", "label", "winogrande", _labels("option", 2), test_size=1267),
        Task("arc_easy", "commonsense", "label", "ARC-Easy", _ANSWER5, ("arc-e", "arc_e"), test_size=2376),
        Task("arc_challenge", "commonsense", "label", "ARC-Challenge", _ANSWER5, ("arc-c", "arc_c"), test_size=1172),
        Task("openbookqa", "commonsense", "label", "openbookqa", _ANSWER5, ("obqa",), test_size=500),
    ]
}

MATH_TASKS = tuple(n for n, t in TASKS.items() if t.domain == "math")
COMMONSENSE_TASKS = tuple(n for n, t in TASKS.items() if t.domain == "commonsense")

# Procedurally generated tasks of the built-in demo (kdscope.synthetic), in the study's answer formats.
DEMO_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("toy_add", "math", "number", "toy_add"),
        Task("toy_mult", "math", "number", "toy_mult"),
        Task("toy_letter", "math", "letter", "toy_letter"),
        Task("toy_compare", "commonsense", "label", "toy_compare", _ANSWER5),
        Task("toy_truefalse", "commonsense", "label", "toy_truefalse", ("true", "false")),
    ]
}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


_ALIASES: dict[str, str] = {}
for _task in (*TASKS.values(), *DEMO_TASKS.values()):
    for _alias in (_task.name, _task.study_folder, *_task.aliases):
        _ALIASES[_key(_alias)] = _task.name


def canonical_name(name: str) -> str:
    """Map a task name or any of its aliases (e.g. ``ARC-Easy``, ``social_i_qa``) to its canonical name."""
    try:
        return _ALIASES[_key(name)]
    except KeyError:
        known = ", ".join((*TASKS, *DEMO_TASKS))
        raise KeyError(f"unknown task {name!r}; known tasks: {known}") from None


def get_task(name: str) -> Task:
    """Look a task up by canonical name or alias."""
    key = canonical_name(name)
    return TASKS[key] if key in TASKS else DEMO_TASKS[key]


def tasks_for_domain(domain: str) -> tuple[str, ...]:
    """The study's tasks of a domain."""
    if domain == "math":
        return MATH_TASKS
    if domain == "commonsense":
        return COMMONSENSE_TASKS
    raise KeyError(f"unknown domain {domain!r}; use 'math' or 'commonsense'")
