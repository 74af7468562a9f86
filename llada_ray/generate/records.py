"""A prompt's generated candidates → its output record: an SFT chat or a ranked DPO pair, in the
shape the SFT / DPO readers take; or the reason it has none, which the report counts."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator

from llada_ray.data import tasks
from llada_ray.generate.config import GenerateConfig


def by_prompt(rows: Iterable[dict]) -> Iterator[list[dict]]:
    """Consecutive rows of one key as a group; keys must rise (the dataset kept its order)."""
    group: list[dict] = []
    for row in rows:
        if group and row["key"] != group[0]["key"]:
            if row["key"] < group[0]["key"]:
                raise RuntimeError("generated rows arrived out of order: cannot group candidates")
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def _is_correct(row: dict, text: str) -> bool:
    """The verifiable task's own grading (exact match after trimming) against `answer`."""
    ex = tasks.Example(row["task"] or "answer", "", row["answer"], "")
    return tasks.score([ex], [text])["accuracy"] == 1.0


def _logprob(candidate: dict) -> float:
    return -math.inf if candidate["mean_logprob"] is None else candidate["mean_logprob"]


def choose_pair(candidates: list[dict], scorer: str) -> tuple[dict, dict] | str:
    """(chosen, rejected) among one prompt's candidates, or the reason there is no pair.

    Candidates with the same text count once and empty ones not at all. With correctness (the
    row has an `answer`, or scorer: correctness) a pair is a right and a wrong answer; the
    teacher's mean log-probability breaks ties: the likeliest right one against the least likely
    wrong one. With logprob: the likeliest against the least likely.
    """
    first = candidates[0]
    by_correctness = scorer == "correctness" or (scorer == "auto" and first["answer"] is not None)
    if by_correctness and first["answer"] is None:
        return "no_answer"
    distinct: dict[str, dict] = {}
    for c in candidates:
        if c["text"].strip():
            distinct.setdefault(c["text"], c)
    if len(distinct) < 2:
        return "too_few_distinct"

    if by_correctness:
        right = {text: _is_correct(first, text) for text in distinct}
        ranked = sorted(distinct.values(), key=lambda c: (right[c["text"]], _logprob(c)))
        best, worst = ranked[-1], ranked[0]
        if right[best["text"]] == right[worst["text"]]:
            return "all_correct" if right[best["text"]] else "none_correct"
        return best, worst
    if any(c["mean_logprob"] is None for c in distinct.values()):
        return "no_logprob"
    ranked = sorted(distinct.values(), key=_logprob)  # stable: candidate order breaks ties
    if _logprob(ranked[-1]) == _logprob(ranked[0]):
        return "tied_scores"
    return ranked[-1], ranked[0]


def output_record(candidates: list[dict], cfg: GenerateConfig) -> dict | str:
    """The JSONL record of one prompt (the SFT / DPO readers' shape), or why it has none."""
    chat = json.loads(candidates[0]["chat"])
    if cfg.kind == "sft":
        text = candidates[0]["text"]
        if not text.strip():
            return "empty_response"
        return {"messages": [*chat, {"role": "assistant", "content": text}]}
    pair = choose_pair(candidates, cfg.scorer)
    if isinstance(pair, str):
        return pair
    return {"prompt": chat, "chosen": pair[0]["text"], "rejected": pair[1]["text"]}
