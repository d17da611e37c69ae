"""Procedurally generated tasks for the built-in demo, in the study's instruction and answer formats.

Math tasks carry rationales ending in "The answer is N." (parsed by the last-number rule); commonsense tasks use
the study's "Answer format: answer1/answer2" and "true/false" styles with "the correct answer is ..." targets.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import random
from typing import Callable

from .prompts import Example, build_prompt

NAMES = ("Tom", "Ann", "Sam", "Mia", "Leo", "Zoe", "Ben", "Eva", "Max", "Ivy")
ITEMS = ("apples", "books", "coins", "pens", "cards", "shells", "stamps", "cups")
# A tiny world for the commonsense tasks: which category each object belongs to.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "an animal": ("a cat", "a dog", "a horse", "an elephant"),
    "a vehicle": ("a car", "a truck", "a bike", "a bus"),
    "a food": ("an apple", "some bread", "a cake", "some rice"),
    "a tool": ("a hammer", "a saw", "a drill", "a spoon"),
}


def _add_sub(rng: random.Random) -> Example:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, 9), rng.randint(1, 5)
    if rng.random() < 0.5:
        q = f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?"
        r = f"{a} + {b} = {a + b}. The answer is {a + b}."
        return Example(q, str(a + b), output=f"\nA: {r}")
    a = a + b
    q = f"{name} has {a} {item}. {name} gives away {b}. How many {item} are left?"
    r = f"{a} - {b} = {a - b}. The answer is {a - b}."
    return Example(q, str(a - b), output=f"\nA: {r}")


def _mult(rng: random.Random) -> Example:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 5), rng.randint(2, 5)
    q = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} does {name} buy?"
    r = f"{a} * {b} = {a * b}. The answer is {a * b}."
    return Example(q, str(a * b), output=f"\nA: {r}")


def _letter(rng: random.Random) -> Example:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    total = a + b
    options = rng.sample([x for x in range(total - 6, total + 7) if x != total and x > 0], 4)
    slot = rng.randrange(5)
    options.insert(slot, total)
    letters = "ABCDE"
    choices = " ".join(f"({letters[i]}) {v}" for i, v in enumerate(options))
    q = f"What is {a} plus {b}? Answer Choices: {choices}"
    r = f"\nRationale: {a} + {b} = {total}. The answer is ({letters[slot]})."
    return Example(q, letters[slot], output=r)


def _compare(rng: random.Random) -> Example:
    category = rng.choice(list(CATEGORIES))
    k = rng.randint(2, 4)
    others = [o for c, objs in CATEGORIES.items() if c != category for o in objs]
    options = rng.sample(others, k - 1)
    best = rng.randrange(k)
    options.insert(best, rng.choice(CATEGORIES[category]))
    listed = " ".join(f"Answer{i + 1}: {o}" for i, o in enumerate(options))
    fmt = "/".join(f"answer{i + 1}" for i in range(k))
    q = f"Please choose the correct answer to the question: Which one is {category}?\n\n{listed}\n\nAnswer format: {fmt}"
    return Example(q, f"answer{best + 1}", output=f"the correct answer is answer{best + 1}")


def _truefalse(rng: random.Random) -> Example:
    category = rng.choice(list(CATEGORIES))
    holds = rng.random() < 0.5
    pool = CATEGORIES[category] if holds else [o for c, objs in CATEGORIES.items() if c != category for o in objs]
    answer = "true" if holds else "false"
    q = (f"Please answer the following question with true or false, question: is {rng.choice(pool)} {category}?"
         "\n\nAnswer format: true/false")
    return Example(q, answer, output=f"the correct answer is {answer}")


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "toy_add": _add_sub,
    "toy_mult": _mult,
    "toy_letter": _letter,
    "toy_compare": _compare,
    "toy_truefalse": _truefalse,
}
DOMAIN_TASKS = {"math": ("toy_add", "toy_mult", "toy_letter"), "commonsense": ("toy_compare", "toy_truefalse")}


def generate(task: str, n: int, seed: int) -> list[Example]:
    """``n`` examples of a generated task; the same (task, n, seed) always gives the same list."""
    rng = random.Random(f"{task}:{seed}")
    return [GENERATORS[task](rng) for _ in range(n)]


def generate_domain(domain: str, n_per_task: int, seed: int) -> list[Example]:
    """A mixed training set for a domain, interleaved deterministically."""
    out: list[Example] = []
    for task in DOMAIN_TASKS[domain]:
        out.extend(generate(task, n_per_task, seed))
    random.Random(seed).shuffle(out)
    return out


def corpus(n_per_task: int = 200, seed: int = 0) -> list[str]:
    """Text for training the built-in tokenizer: every generated task, all prompt styles."""
    texts = []
    for task in GENERATORS:
        for ex in generate(task, n_per_task, seed):
            for style in ("study", "alpaca"):
                texts.append(build_prompt(ex, style, train=True) + ex.output)
                texts.append(build_prompt(ex, style, train=False))
    return texts
