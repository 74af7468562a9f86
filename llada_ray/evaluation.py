"""Task evaluation: held-out verifiable-task examples decoded as served and graded exactly.

The one loop behind the pipeline's task metrics (MLflow), the decode benchmark and the demo.
Pure torch: the caller brings the decoder (block diffusion or the AR baseline) and the model's
tokenizer; prompts are the chat template's (served models) or the raw task text (a pre-trained
AR parent, which never saw a chat).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from llada_ray.data import tasks
from llada_ray.data.chat import prompt_ids
from llada_ray.decoding import Decoder, Sampling
from llada_ray.decoding.sampling import repeated_ngrams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TaskEval:
    accuracy: float
    per_task: dict[str, float]
    similarity: float
    tokens: int  # generated, EOS included
    forwards: int  # summed over requests: the forwards each one needed
    discarded: int  # tokens decided past an answer's end (block decoding)
    seconds: float
    batch_size: int
    errors: dict[str, int]  # questions per error class (tasks.error_class), "ok" included
    repeated_3grams: int  # 3-grams of an answer seen earlier in it (EOS left out)
    trigrams: int
    edits: int  # token editing: decided tokens replaced
    post_edit_forwards_mean: float  # token editing: edit-only forwards per block
    post_edit_forwards_p99: float
    answers: list[str] = field(repr=False)
    questions: list[dict] = field(repr=False)  # per question: prompt, expected, answer, class

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.forwards, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def repeated_3gram_share(self) -> float:
        return self.repeated_3grams / max(self.trigrams, 1)

    def summary(self) -> dict:
        """Every figure but the answers, as plain data (JSON, MLflow)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("answers", "questions")}
        return out | {
            "tokens_per_forward": self.tokens_per_forward,
            "repeated_3gram_share": self.repeated_3gram_share,
            "tokens_per_s": self.tokens_per_s,
        }


def task_prompts(
    tokenizer: PreTrainedTokenizerBase, examples: list[tasks.Example], chat: bool = True
) -> list[list[int]]:
    if chat:
        return [prompt_ids(tokenizer, [{"role": "user", "content": ex.prompt}]) for ex in examples]
    return [tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] for ex in examples]


def evaluate(
    decoder: Decoder,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[tasks.Example],
    sampling: Sampling,
    chat: bool = True,
) -> TaskEval:
    """Decode the examples, continuously batched (up to the decoder's max_batch at a time), and
    grade the answers."""
    prompts = task_prompts(tokenizer, examples, chat)
    started = time.perf_counter()
    generated = decoder.generate(prompts, sampling)
    seconds = time.perf_counter() - started
    answers = [tokenizer.decode(g.tokens, skip_special_tokens=True).strip() for g in generated]
    questions = [
        {
            "task": ex.task,
            "prompt": ex.prompt,
            "expected": ex.answer,
            "answer": answer,
            "error": tasks.error_class(ex.answer, answer),
            "tokens": len(g.tokens),
            "forwards": g.forwards,
            "discarded": g.discarded,
            "edits": g.edits,
        }
        for ex, answer, g in zip(examples, answers, generated, strict=True)
    ]
    scores = tasks.score(examples, answers)
    repeats = [repeated_ngrams(g.tokens, 3, tokenizer.eos_token_id) for g in generated]
    post = sorted(n for g in generated for n in g.post_edit_forwards)
    return TaskEval(
        accuracy=scores["accuracy"],
        per_task={k.split("/")[1]: v for k, v in scores.items() if k.startswith("accuracy/")},
        similarity=scores["similarity"],
        tokens=sum(q["tokens"] for q in questions),
        forwards=sum(q["forwards"] for q in questions),
        discarded=sum(q["discarded"] for q in questions),
        seconds=seconds,
        batch_size=decoder.options.max_batch,
        errors=tasks.error_counts(q["error"] for q in questions),
        repeated_3grams=sum(r for r, _ in repeats),
        trigrams=sum(n for _, n in repeats),
        edits=sum(g.edits for g in generated),
        post_edit_forwards_mean=sum(post) / max(len(post), 1),
        post_edit_forwards_p99=float(post[int(0.99 * (len(post) - 1))] if post else 0),
        answers=answers,
        questions=questions,
    )
