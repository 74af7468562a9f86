"""The built-in verifiable task family: generated instructions whose answers can be graded exactly.

Used by the embedded default, the tests and the benchmarks as pre-training text, SFT chats and
DPO pairs (chosen = correct, rejected = a plausible wrong answer). Example i of a seed is a pure
function of (seed, i), so any worker can generate any slice of the data set.
"""

from __future__ import annotations

import difflib
import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str
    wrong: str  # plausible but incorrect: the rejected side of a DPO pair


def _addition(rng: random.Random) -> Example:
    digits = rng.randint(2, 4)
    a, b = (rng.randint(10 ** (digits - 1), 10**digits - 1) for _ in range(2))
    total = a + b
    wrong = total + rng.choice([-10, -1, 1, 10])  # a carry slip
    return Example("add", f"Add: {a} + {b} =", str(total), str(wrong))


def _sort(rng: random.Random) -> Example:
    values = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    ordered = sorted(values)
    wrong = list(ordered)
    i = rng.randrange(len(wrong) - 1)
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
    if wrong == ordered:  # equal neighbours: swapping changes nothing
        wrong = ordered[::-1] if ordered != ordered[::-1] else [*ordered[:-1], ordered[-1] + 1]
    show = " ".join
    return Example(
        "sort",
        f"Sort ascending: {show(map(str, values))}",
        show(map(str, ordered)),
        show(map(str, wrong)),
    )


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8)))


def _reverse(rng: random.Random) -> Example:
    word = _word(rng)
    while word == word[::-1]:
        word = _word(rng)
    # Reversing all but the first letter: a typical near miss.
    wrong = word[0] + word[:0:-1]
    if wrong == word[::-1]:
        wrong = word
    return Example("reverse", f"Reverse: {word}", word[::-1], wrong)


def _upper(rng: random.Random) -> Example:
    words = [_word(rng) for _ in range(rng.randint(1, 3))]
    text = " ".join(words)
    wrong = " ".join([words[0].upper(), *words[1:]]) if len(words) > 1 else text.capitalize()
    return Example("upper", f"Copy in upper case: {text}", text.upper(), wrong)


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "add": _addition,
    "sort": _sort,
    "reverse": _reverse,
    "upper": _upper,
}


def example(seed: int, index: int) -> Example:
    rng = random.Random(f"{seed}:{index}")
    return TASKS[rng.choice(sorted(TASKS))](rng)


def examples(seed: int, start: int, stop: int) -> list[Example]:
    return [example(seed, i) for i in range(start, stop)]


def pretraining_text(ex: Example) -> str:
    return f"{ex.prompt} {ex.answer}"


def chat(ex: Example) -> dict:
    """An SFT sample in OpenAI message format."""
    return {
        "messages": [
            {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": ex.answer},
        ]
    }


def preference(ex: Example) -> dict:
    """A DPO sample: chosen = correct, rejected = the plausible wrong answer."""
    return {"prompt": ex.prompt, "chosen": ex.answer, "rejected": ex.wrong}


def score(items: Iterable[Example], answers: Iterable[str]) -> dict[str, float]:
    """Exact-match accuracy (after trimming whitespace), overall and per task, and `similarity`:
    the mean character-level match ratio (difflib) with the answer, a graded signal for models
    too small or too early to be exactly right."""
    hits: dict[str, list[bool]] = {}
    ratios: list[float] = []
    for ex, given in zip(items, answers, strict=True):
        hits.setdefault(ex.task, []).append(given.strip() == ex.answer)
        ratios.append(difflib.SequenceMatcher(None, given.strip(), ex.answer).ratio())
    total = [h for task in hits.values() for h in task]
    out = {"accuracy": sum(total) / max(len(total), 1)}
    out |= {f"accuracy/{task}": sum(h) / len(h) for task, h in sorted(hits.items())}
    out["similarity"] = sum(ratios) / max(len(ratios), 1)
    return out
