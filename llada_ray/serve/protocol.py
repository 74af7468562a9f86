"""The OpenAI request shapes we accept, validated strictly: a wrong type is an error, not a cast.

Unknown fields are ignored (clients send many); `threshold`, `min_accept`, `top_k` and
`ignore_eos` (as in vLLM: decode max_tokens whatever comes, for benchmarks) are our extensions,
and so are token editing's (LLaDA2.1): `mode` (a preset of the server's, e.g. "speed" or
"quality"), `edit_threshold` (τ_edit) and `max_post_edit_steps`.
Bounds that depend on the deployment (context, max_tokens limit) are checked by the engine.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Stop = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generate(_Strict):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    threshold: Annotated[float, Field(gt=0, le=1)] | None = None
    mode: Annotated[str, Field(min_length=1)] | None = None
    edit_threshold: Annotated[float, Field(gt=0, le=1)] | None = None
    max_post_edit_steps: Annotated[int, Field(ge=0, le=64)] | None = None
    min_accept: Annotated[int, Field(ge=1)] | None = None
    ignore_eos: bool = False
    n: Annotated[int, Field(ge=1, le=16)] = 1
    seed: Annotated[int, Field(ge=0, lt=2**62)] | None = None  # + choice index: fits int64
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Generate):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=16)]

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict:
        """The message as chat templates take it: developer is system, parts joined."""
        content = self.content
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Generate):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    @field_validator("messages")
    @classmethod
    def _ends_with_a_prompt(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role == "assistant":
            raise ValueError("the last message must not be the assistant's")
        return messages

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
