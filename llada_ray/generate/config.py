"""The teacher-generation configuration: one validated `GenerateConfig` describes a whole job.

Like the pipeline's config (llada_ray/config.py) it is data in YAML, strict (unknown keys are
errors) and validated once on the driver, before Ray is touched; errors name the field path,
e.g. `sampling.n`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from llada_ray.config import PositiveFloat, PositiveInt, Rate, StorageConfig, Strict, read_yaml


class GenerateError(ValueError):
    """A job that cannot start (its input or output); the message names the config field."""


class SamplingConfig(Strict):
    max_new_tokens: PositiveInt = 256
    temperature: Annotated[float, Field(ge=0, le=2)] = Field(0.0, description="0: greedy")
    top_p: Rate = 1.0
    n: PositiveInt = Field(1, description="candidates per prompt: 1 for sft, ≥ 2 for dpo")
    seed: int = Field(0, description="with the row's key and candidate, seeds each sample")


class GenerateConfig(Strict):
    """Teacher generation: prompts (JSONL) → SFT chats or DPO pairs (JSONL) from an AR model."""

    teacher: str = Field(description="the AR teacher: a Hugging Face model id or a local directory")
    tokenizer: str | None = Field(None, description="default: the teacher's own")
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: the dtype the checkpoint was saved in"
    )
    input: str = Field(
        description="prompt JSONL: local file, directory or glob, or s3://bucket/prefix; each row "
        "has `prompt` (a string or messages) or `messages`, optionally `answer` and `task`"
    )
    output: str = Field(
        description="a directory of JSONL files, usable as a data.sft / data.dpo files source"
    )
    overwrite: bool = Field(False, description="replace an existing output directory")
    kind: Literal["sft", "dpo"]
    backend: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="auto: vllm when it is installed and the cluster has GPUs"
    )
    sampling: SamplingConfig = SamplingConfig()
    scorer: Literal["auto", "correctness", "logprob"] = Field(
        "auto",
        description="dpo ranking: exact match with the row's `answer` (auto: where it has one), "
        "else the teacher's mean log-probability per generated token",
    )
    stop_tokens: list[str] = Field(
        [], description="tokens that also end a response besides EOS, e.g. <|im_end|>"
    )
    batch_size: PositiveInt = Field(16, description="prompts per generate call / vLLM batch")
    concurrency: PositiveInt = Field(1, description="teacher replicas (actors / vLLM engines)")
    num_gpus: Annotated[float, Field(ge=0)] = Field(
        0.0, description="per replica; vllm: its tensor-parallel size (0 counts as 1)"
    )
    num_cpus: PositiveFloat = Field(1.0, description="per transformers replica")
    engine_kwargs: dict[str, Any] = Field({}, description="extra vLLM engine arguments")
    storage: StorageConfig = Field(
        StorageConfig(), description="endpoint and region for s3:// input and output"
    )

    @property
    def tokenizer_source(self) -> str:
        """Where the tokenizer (and its chat template) comes from."""
        return self.tokenizer or self.teacher

    @model_validator(mode="after")
    def _combinations(self) -> GenerateConfig:
        s = self.sampling
        if self.kind == "sft" and s.n != 1:
            raise ValueError(f"sampling.n: sft writes one response per prompt; got n = {s.n}")
        if self.kind == "dpo" and s.n < 2:
            raise ValueError("sampling.n: dpo ranks n ≥ 2 candidates per prompt")
        if self.kind == "dpo" and s.temperature == 0:
            raise ValueError(
                "sampling.temperature: greedy candidates are all alike; dpo needs temperature > 0"
            )
        if self.num_gpus > 1 and not self.num_gpus.is_integer():
            raise ValueError("num_gpus: more than one GPU per replica must be a whole number")
        if self.backend == "transformers" and self.engine_kwargs:
            raise ValueError("engine_kwargs: vLLM engine arguments; the backend is transformers")
        same = self.input.rstrip("/") == self.output.rstrip("/")
        if same or (not self.output.startswith("s3://") and Path(self.output).is_file()):
            raise ValueError("output: must be a directory other than the input")
        return self


def load_generate_config(path: str | Path) -> GenerateConfig:
    """The YAML at `path`, validated: a ConfigError or a pydantic ValidationError otherwise."""
    return GenerateConfig.model_validate(read_yaml(path))
