"""SFT and DPO rows from chat data, with the tokenizer's chat template. No Ray here.

SFT (RECIPE.md §4): the prompt is every message before the last assistant turn, rendered with
the generation prompt; the response is the last assistant turn. Only the response and the EOS
padding after it are maskable; the length is padded with EOS up to a multiple of the block size so
samples align to block boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def rows_name(kind: str, block_size: int, max_len: int) -> str:
    """Where a stage's SFT / DPO rows live under `<run>/data/` (they depend on both)."""
    return f"{kind}-b{block_size}-n{max_len}"


class ChatError(ValueError):
    """A sample that cannot become a row; `reason` is its counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class SftRow:
    input_ids: list[int]
    prompt_len: int  # tokens [0, prompt_len) are never masked; the rest are maskable

    def to_dict(self) -> dict:
        return {"input_ids": self.input_ids, "prompt_len": self.prompt_len}


def _messages(value: object, role: str, what: str) -> list[dict]:
    """A string becomes one message of `role`; a message list is checked and kept."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise ChatError("wrong_type", f"{what} must be a string or a non-empty message list")
    for m in value:
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise ChatError("wrong_type", f"{what}: each message needs string role and content")
    return value


def _encode_turn(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict], response: list[dict]
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with generation header) and of the response after it."""
    prompt_ids = _ids(
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    )
    full_ids = _ids(tokenizer.apply_chat_template(prompt + response, tokenize=True))
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ChatError("template", "the chat template does not render the prompt as a prefix")
    return prompt_ids, full_ids[len(prompt_ids) :]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The chat rendered by the tokenizer's template, ending with the assistant's header."""
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def _ids(encoded: object) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def pad_to_block(ids: list[int], block_size: int, eos_id: int) -> list[int]:
    """Append EOS so the length is a positive multiple of the block size (at least one EOS)."""
    length = len(ids) + 1
    target = -(-length // block_size) * block_size
    return ids + [eos_id] * (target - len(ids))


def sft_row(
    sample: dict, tokenizer: PreTrainedTokenizerBase, block_size: int, max_len: int
) -> SftRow:
    if not isinstance(sample, dict) or "messages" not in sample:
        raise ChatError("missing_field", "a sample needs 'messages'")
    messages = _messages(sample["messages"], "user", "messages")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise ChatError("no_response", "no assistant turn after a prompt")
    prompt_ids, response_ids = _encode_turn(tokenizer, messages[:last], [messages[last]])
    ids = pad_to_block(prompt_ids + response_ids, block_size, tokenizer.eos_token_id)
    if len(ids) > max_len:
        raise ChatError("too_long", f"{len(ids)} tokens > max_len {max_len}")
    return SftRow(ids, len(prompt_ids))


@dataclass(frozen=True)
class DpoRow:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response + EOS padding; prompt + response is a multiple of block
    rejected_ids: list[int]

    def to_dict(self) -> dict:
        return {
            "prompt_ids": self.prompt_ids,
            "chosen_ids": self.chosen_ids,
            "rejected_ids": self.rejected_ids,
        }


def dpo_row(
    sample: dict, tokenizer: PreTrainedTokenizerBase, block_size: int, max_len: int
) -> DpoRow:
    if not isinstance(sample, dict) or not {"prompt", "chosen", "rejected"} <= sample.keys():
        raise ChatError("missing_field", "a sample needs 'prompt', 'chosen' and 'rejected'")
    prompt = _messages(sample["prompt"], "user", "prompt")
    sides = []
    for side in ("chosen", "rejected"):
        response = _messages(sample[side], "assistant", side)
        prompt_ids, response_ids = _encode_turn(tokenizer, prompt, response)
        ids = pad_to_block(prompt_ids + response_ids, block_size, tokenizer.eos_token_id)
        if len(ids) > max_len:
            raise ChatError("too_long", f"{side}: {len(ids)} tokens > max_len {max_len}")
        sides.append(ids[len(prompt_ids) :])
    return DpoRow(prompt_ids, sides[0], sides[1])
