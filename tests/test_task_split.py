"""The honest task split: no held-out question reaches any training source, the settings
describe the task family the evaluation uses, and too small a question space is refused."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from llada_ray.config import TaskConfig, TaskSource, load_config
from llada_ray.data import tasks
from llada_ray.data.corpus import task_examples
from llada_ray.evaluation import task_prompts
from llada_ray.model import train_tokenizer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Every evaluation set the project draws: the pipeline's (evaluation.seed), the demo's
# (evaluation.seed + 1) and bench/decode.py's and bench/serve.py's (99), with room to spare.
EVAL_SEEDS, EVAL_QUESTIONS = (99, 100), 512


def test_no_evaluation_question_occurs_in_any_training_source() -> None:
    """Every task source the embedded default trains on (pre-training, SFT, DPO), generated
    whole through the packer's own path, against every evaluation set."""
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert cfg.evaluation.seed in EVAL_SEEDS and cfg.evaluation.seed + 1 in EVAL_SEEDS
    sources = [s for s in (*cfg.data.pretrain, *cfg.data.sft, *cfg.data.dpo)]
    assert sources and all(isinstance(s, TaskSource) for s in sources)
    trained = {ex.prompt for s in sources for ex in task_examples(s, cfg.data.task)}
    assert len(trained) > 10_000
    for seed in EVAL_SEEDS:
        heldout = tasks.examples(seed, 0, EVAL_QUESTIONS, "heldout", cfg.data.task)
        assert {ex.task for ex in heldout} == set(cfg.data.task.kinds)
        assert not trained & {ex.prompt for ex in heldout}


def test_the_split_is_a_property_of_the_question() -> None:
    """About the configured share of distinct questions is held out (the split depends on the
    prompt's text alone: no seed, no index)."""
    cfg = TaskConfig(heldout_fraction=0.25)
    rng = random.Random(0)
    any_prompts = {tasks.TASKS[rng.choice(cfg.kinds)](rng, cfg).prompt for _ in range(4000)}
    share = sum(tasks.split_of(p, cfg) == "heldout" for p in any_prompts) / len(any_prompts)
    assert 0.22 < share < 0.28


@pytest.mark.parametrize(
    "settings",
    [
        {"kinds": ["add"], "add_digits": (1, 1)},
        {"sort_count": (2, 3), "sort_max": 4},
        {"word_length": (2, 2), "upper_words": (1, 1)},
    ],
)
def test_distinct_question_counts_match_the_generators(settings: dict) -> None:
    """The count that validation refuses on, against the generators enumerated (small spaces:
    draw until nothing new appears in many tries)."""
    cfg = TaskConfig(**settings, heldout_fraction=0.5, min_heldout_questions=1)
    counted = [k for k in cfg.kinds if cfg.distinct_questions(k) <= 5000]
    assert counted  # each case enumerates some kind
    for kind in counted:
        expected = cfg.distinct_questions(kind)
        rng = random.Random(kind)
        seen = {tasks.TASKS[kind](rng, cfg).prompt for _ in range(60 * expected)}
        assert len(seen) == expected, kind


def test_too_few_distinct_questions_are_refused_by_name() -> None:
    with pytest.raises(ValidationError, match=r"task kind 'add'.*100 distinct questions"):
        TaskConfig(kinds=["add", "upper"], add_digits=(1, 1))
    with pytest.raises(ValidationError, match="task kind 'sort'"):
        TaskConfig(sort_count=(2, 2), min_heldout_questions=20)
    TaskConfig(kinds=["reverse", "upper"], add_digits=(1, 1))  # a kind not asked for is no limit


def test_answers_are_long_enough_to_span_blocks() -> None:
    """The embedded default's held-out answers average at least 8 tokens (one per character)
    and most span two or more of the served blocks, counted from the chat prompt's length."""
    cfg = load_config(CONFIGS / "tiny.yaml")
    block = next(s.block_size for s in cfg.stages if s.stage == "sft")
    heldout = tasks.examples(99, 0, 256, "heldout", cfg.data.task)
    texts = map(tasks.pretraining_text, tasks.examples(0, 0, 2000, "train", cfg.data.task))
    tok = train_tokenizer(texts, cfg.tokenizer.vocab_size)  # the run's: a character tokenizer
    answers = [tok(ex.answer, add_special_tokens=False)["input_ids"] for ex in heldout]
    assert sum(map(len, answers)) / len(answers) >= 8
    starts = map(len, task_prompts(tok, heldout))
    spans = [(s + len(a) - 1) // block - s // block for s, a in zip(starts, answers, strict=True)]
    assert sum(n >= 1 for n in spans) / len(spans) >= 0.5


def test_error_classes() -> None:
    assert tasks.error_class("OLLEH", "OLLEH ") == "ok"
    assert tasks.error_class("1 2 3", "1 2") == "early_eos"
    assert tasks.error_class("1 2 3", "1 2 3 3") == "too_long"
    assert tasks.error_class("abc", "abd") == "wrong_characters"
