"""The built-in verifiable task family: generated instructions whose answers can be graded exactly.

Used by the embedded default, the tests and the benchmarks as pre-training text, SFT chats and
DPO pairs (chosen = correct, rejected = a plausible wrong answer). Its difficulty is config
(`data.task`). Example i of a seed and split is a pure function of (seed, i, split, settings),
so any worker can generate any slice of the data set.

The split is a property of a question's content, not of a seed: a hash of the prompt puts every
question in exactly one of `train` and `heldout`, so no evaluation question can occur in any
training source, whatever seeds the sources and evaluations use. Every caller names its split.
"""

from __future__ import annotations

import difflib
import hashlib
import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from llada_ray.config import DataConfig, TaskConfig, TaskSource

Split = Literal["train", "heldout"]


DEFAULT = TaskConfig()


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str
    wrong: str  # plausible but incorrect: the rejected side of a DPO pair


def _between(rng: random.Random, bounds: tuple[int, int]) -> int:
    return rng.randint(*bounds)


def _addition(rng: random.Random, cfg: TaskConfig) -> Example:
    def number() -> int:
        digits = _between(rng, cfg.add_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    a, b = number(), number()
    total = a + b
    slip = rng.choice([d for d in (-10, -1, 1, 10) if total + d >= 0])  # a carry slip
    return Example("add", f"Add: {a} + {b} =", str(total), str(total + slip))


def _sort(rng: random.Random, cfg: TaskConfig) -> Example:
    values = [rng.randint(0, cfg.sort_max) for _ in range(_between(rng, cfg.sort_count))]
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


def _word(rng: random.Random, cfg: TaskConfig) -> str:
    length = _between(rng, cfg.word_length)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def _reverse(rng: random.Random, cfg: TaskConfig) -> Example:
    word = _word(rng, cfg)
    while word == word[::-1]:
        word = _word(rng, cfg)
    # Reversing all but the first letter: a typical near miss.
    wrong = word[0] + word[:0:-1]
    if wrong == word[::-1]:
        wrong = word
    return Example("reverse", f"Reverse: {word}", word[::-1], wrong)


def _upper(rng: random.Random, cfg: TaskConfig) -> Example:
    words = [_word(rng, cfg) for _ in range(_between(rng, cfg.upper_words))]
    text = " ".join(words)
    wrong = " ".join([words[0].upper(), *words[1:]]) if len(words) > 1 else text.capitalize()
    return Example("upper", f"Copy in upper case: {text}", text.upper(), wrong)


def _shift(rng: random.Random, cfg: TaskConfig) -> Example:
    word = _word(rng, cfg)

    def shifted(c: str, by: int) -> str:
        return chr((ord(c) - ord("a") + by) % 26 + ord("a"))

    answer = "".join(shifted(c, 1) for c in word)
    i = rng.randrange(len(word))  # one letter shifted twice: a near miss
    return Example("shift", f"Shift letters by one: {word}", answer,
                   answer[:i] + shifted(word[i], 2) + answer[i + 1 :])  # fmt: skip


TASKS: dict[str, Callable[[random.Random, TaskConfig], Example]] = {
    "add": _addition,
    "sort": _sort,
    "reverse": _reverse,
    "upper": _upper,
    "shift": _shift,
}


def split_of(prompt: str, cfg: TaskConfig = DEFAULT) -> Split:
    """The split a question belongs to, from its text alone (a stable hash, not Python's)."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest) / 2**64 < cfg.heldout_fraction else "train"


def example(seed: int, index: int, split: Split, cfg: TaskConfig = DEFAULT) -> Example:
    """Draws until the question falls in `split` (about 1 / fraction draws for held-out)."""
    rng = random.Random(f"{seed}:{index}")
    kinds = sorted(cfg.kinds)
    while True:
        ex = TASKS[rng.choice(kinds)](rng, cfg)
        if split_of(ex.prompt, cfg) == split:
            return ex


def examples(
    seed: int, start: int, stop: int, split: Split, cfg: TaskConfig = DEFAULT
) -> list[Example]:
    return [example(seed, i, split, cfg) for i in range(start, stop)]


def describe(cfg: TaskConfig) -> str:
    """The settings in one line, printed beside every accuracy."""

    def span(bounds: tuple[int, int]) -> str:
        return str(bounds[0]) if bounds[0] == bounds[1] else f"{bounds[0]}-{bounds[1]}"

    parts = {
        "add": f"add {span(cfg.add_digits)} digits",
        "sort": f"sort {span(cfg.sort_count)} numbers of 0-{cfg.sort_max}",
        "upper": f"upper {span(cfg.upper_words)} words",
    }
    words = f"words of {span(cfg.word_length)} letters"
    kinds = sorted(cfg.kinds)
    shown = [parts[k] for k in kinds if k in parts]
    if {"reverse", "shift", "upper"} & set(kinds):
        shown.append(words)
    return f"kinds {','.join(kinds)}; " + "; ".join(shown)


def counts(data: DataConfig, heldout: int) -> str:
    """The question counts in one line, printed beside every accuracy: what each training
    source draws (train split) and what the evaluation asks (held-out split)."""
    drawn = {
        kind: sum(s.examples for s in getattr(data, kind) if isinstance(s, TaskSource))
        for kind in ("pretrain", "sft", "dpo")
    }
    train = ", ".join(f"{kind} {n:,}" for kind, n in drawn.items() if n)
    return (
        f"{heldout:,} held-out questions (split by prompt hash, {data.task.heldout_fraction:.0%} "
        f"of all; none in any training source); training questions: {train or 'none'}"
    )


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


ERROR_CLASSES = ("ok", "early_eos", "too_long", "wrong_characters")


def error_counts(classes: Iterable[str]) -> dict[str, int]:
    """Questions per class, every class named (zeros included)."""
    found = list(classes)
    return {c: found.count(c) for c in ERROR_CLASSES}


def error_class(expected: str, given: str) -> str:
    """ok, early_eos (shorter: the decoder ended the answer before its content), too_long, or
    wrong_characters (the right length, another text)."""
    given = given.strip()
    if given == expected:
        return "ok"
    if len(given) < len(expected):
        return "early_eos"
    return "too_long" if len(given) > len(expected) else "wrong_characters"


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
