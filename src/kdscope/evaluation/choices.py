"""Multiple-choice items from the study's instruction text, and the (context, continuation) requests that score them
in the study's prompt or in lm-evaluation-harness's per-task prompts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Sequence

from ..errors import InputError
from ..prompts import Example, build_prompt
from ..tasks import get_task


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice item: the question, each choice's text, the study's answer word for each, the gold index."""

    question: str
    choices: tuple[str, ...]
    labels: tuple[str, ...]
    gold: int


LOGLIK_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "aqua")
_LEAD_RE = re.compile(r"^Please [^:]*: ")
_FORMAT_MARK = "Answer format:"
_STEMS = {"piqa": "Solution", "hellaswag": "Ending", "winogrande": "Option"}


def _drop_separator(text: str) -> str:
    """A field as it was written into the instruction: the one separator that follows it (a blank line or a space)
    removed, any whitespace of its own kept (lm-eval keeps it in the continuation it scores)."""
    if text.endswith("\n\n"):
        return text[:-2]
    return text[:-1] if text.endswith(" ") else text


def _strip_lead(text: str) -> str:
    return _drop_separator(_LEAD_RE.sub("", text, count=1))


def _split_marked(body: str, markers: Sequence[str], source: str, exact: bool = False) -> tuple[str, list[str]]:
    """Split ``body`` at the given markers, searched from the end so a marker-like phrase in the question is harmless.
    ``exact`` keeps each choice's own whitespace (only the separator after it goes); otherwise choices are stripped."""
    positions: list[int] = []
    end = len(body)
    for marker in reversed(markers):
        pos = body.rfind(marker, 0, end)
        if pos == -1:
            raise InputError(f"{source}: cannot find choice marker {marker.strip()!r} in the instruction")
        positions.insert(0, pos)
        end = pos
    bounds = positions + [len(body)]
    texts = [body[bounds[k] + len(markers[k]) : bounds[k + 1]] for k in range(len(markers))]
    choices = [_drop_separator(t) if exact else t.strip() for t in texts]
    return body[: positions[0]], choices


def parse_choice_item(task_name: str, ex: Example, source: str = "item") -> ChoiceItem:
    """Recover (question, choice texts, gold) from a study-format multiple-choice instruction."""
    task = get_task(task_name)
    text = ex.instruction
    if task.name == "aqua":
        head, _, tail = text.rpartition("Answer Choices:")
        if not head:
            raise InputError(f"{source}: no 'Answer Choices:' in the AQuA instruction")
        letters = task.choices
        _, choices = _split_marked(" " + tail, [f" ({letter}) " for letter in letters], source)
        return ChoiceItem(head.strip(), tuple(choices), letters, letters.index(task.gold(ex.answer)))
    if task.name == "boolq":
        question = text.split("question:", 1)[-1].split(_FORMAT_MARK, 1)[0].strip()
        return ChoiceItem(question, ("true", "false"), task.labels, task.labels.index(task.gold(ex.answer)))
    if task.name not in LOGLIK_TASKS:
        raise InputError(f"task {task.name} has no multiple-choice form; likelihood tasks: {', '.join(LOGLIK_TASKS)}")
    body, _, fmt = text.rpartition(_FORMAT_MARK)
    labels = tuple(fmt.strip().split("/"))
    if not body or len(labels) < 2 or any(label not in task.labels for label in labels):
        raise InputError(f"{source}: instruction lacks a valid 'Answer format: ...' line for {task.name}")
    stem = _STEMS.get(task.name, "Answer")
    head, choices = _split_marked(body, [f"{stem}{k}: " for k in range(1, len(labels) + 1)], source, exact=True)
    gold = task.gold(ex.answer)
    if gold not in labels:
        raise InputError(f"{source}: gold {gold!r} is not among the item's {len(labels)} choices")
    return ChoiceItem(_strip_lead(head), tuple(choices), labels, labels.index(gold))


# --------------------------------------------------------------------------------------------------------------------
# Likelihood requests: (context, continuation) pairs per choice, in the study's prompt or lm-eval's per-task prompt
# --------------------------------------------------------------------------------------------------------------------
LoglikPrompt = Literal["study", "lm_eval"]


@dataclass(frozen=True)
class ChoiceRequest:
    """One choice to score: log P(continuation | context); ``norm_chars`` is lm-eval's acc_norm length."""

    context: str
    continuation: str
    norm_chars: int


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's hellaswag preprocessing (WikiHow bracket artifacts removed)
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


_SENTENCE_ENDS = (".", "!", "?", '"', ")")


def _hellaswag_query(question: str) -> str:
    """lm-eval's HellaSwag query, ``activity: ctx_a + " " + ctx_b.capitalize()``, rebuilt from the study's
    ``activity: ctx``: the study format no longer marks where ``ctx_b`` starts, so an unfinished last sentence is
    taken as ``ctx_b`` (the text after the last sentence end) and a finished context as having none. This equals
    lm-eval's query on 10,041 of the 10,042 validation items (the other has a quote ending its ``ctx_b``)."""
    label, _, ctx = question.partition(": ")
    if not ctx.rstrip().endswith(_SENTENCE_ENDS):
        cut = max(ctx.rfind(end + " ") for end in ".!?")
        head, tail = (ctx[: cut + 1], ctx[cut + 2 :]) if cut != -1 else ("", ctx)
        ctx = f"{head} {tail.capitalize()}"
    return _hellaswag_preprocess(f"{label}: {ctx}")


def _lm_eval_requests(task_name: str, item: ChoiceItem) -> list[ChoiceRequest]:
    """lm-evaluation-harness's prompts for each task (target delimiter " ", acc_norm over the choice string).

    Deviations forced by the study's data: BoolQ items carry no passage (the study dropped it), so the context is
    lm-eval's template rendered with an empty passage (``"\nQuestion: ...?\nAnswer:"``, what lm-eval builds for
    such a document); HellaSwag's ``ctx_b`` boundary is rebuilt (`_hellaswag_query`); AQuA has no HF-backend multiple-choice task in lm-eval and uses the ARC template.
    """
    q, choices = item.question, item.choices
    if task_name == "winogrande":  # partial evaluation: the option fills the blank, the rest of the sentence is scored
        blank = q.index("_")
        target = " " + q[blank + 1 :].strip()
        return [ChoiceRequest(q[:blank] + opt, target, len(q[:blank] + opt)) for opt in choices]
    if task_name == "boolq":
        context = f"\nQuestion: {q if q.endswith('?') else q + '?'}\nAnswer:"  # lm-eval's "{{passage}}\n..." (no passage)
        words = ["yes" if c == "true" else "no" for c in choices]
        return [ChoiceRequest(context, " " + w, len(w)) for w in words]
    if task_name == "hellaswag":
        context = _hellaswag_query(q)
        choices = tuple(_hellaswag_preprocess(c) for c in choices)
    elif task_name == "siqa":
        context = f"Q: {q}\nA:"
    elif task_name == "openbookqa":
        context = q
    else:  # arc_easy, arc_challenge, piqa, aqua
        context = f"Question: {q}\nAnswer:"
    return [ChoiceRequest(context, " " + c, len(c)) for c in choices]


def _study_requests(task_name: str, ex: Example, item: ChoiceItem) -> list[ChoiceRequest]:
    """The study's prompt followed by the start of its gold response; each choice is the study's answer word.

    Commonsense gold responses read ``the correct answer is answer2``, so the context ends with ``the correct answer
    is`` and the continuation is `` answer2``; AQuA scores `` (D)`` after ``The answer is``. The shared words sit in
    the context: they add the same log-probability to every choice, and keeping them out of the continuation keeps
    acc_norm a comparison of the answer words alone.
    """
    prompt = build_prompt(ex, "study")
    if task_name == "aqua":
        return [ChoiceRequest(prompt + "The answer is", f" ({label})", len(f"({label})")) for label in item.labels]
    return [ChoiceRequest(prompt + "the correct answer is", " " + label, len(label)) for label in item.labels]


def choice_requests(task_name: str, ex: Example, prompt: LoglikPrompt = "study", source: str = "item") -> tuple[list[ChoiceRequest], int]:
    """The item's per-choice requests and the gold choice index."""
    task = get_task(task_name)
    item = parse_choice_item(task.name, ex, source)
    if prompt == "study":
        return _study_requests(task.name, ex, item), item.gold
    if prompt == "lm_eval":
        return _lm_eval_requests(task.name, item), item.gold
    raise InputError(f"unknown likelihood prompt {prompt!r}; use study or lm_eval")

