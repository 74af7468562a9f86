"""The vLLM backend: `ray.data.llm`'s vLLM processor (`vLLMEngineProcessorConfig` +
`build_processor`), one request per candidate row with the row's seed in its sampling params."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import pyarrow as pa
import ray.data

from llada_ray.generate.config import GenerateConfig
from llada_ray.generate.prompts import CANDIDATE_SCHEMA
from llada_ray.generate.teachers import GENERATED_SCHEMA, load_tokenizer, stop_token_ids


def vllm_request(row: dict, *, sampling: dict) -> dict:
    """Preprocess of the vLLM processor: the chat stage's `messages` and the row's own sampling
    params (vllm.SamplingParams fields); ray.data.llm carries the row's other columns along."""
    return {
        "messages": json.loads(row["chat"]),
        "sampling_params": {**sampling, "seed": int(row["sample_seed"])},
    }


def _token_logprob(entry: Any, token: int) -> float | None:
    """One position of ray.data.llm's `logprobs` ({token_id: {logprob, rank, …}}), whose keys
    may come back as ints or strings after the Arrow round trip."""
    if not isinstance(entry, dict):
        return None
    found = entry.get(token, entry.get(str(token)))
    if found is None and len(entry) == 1:  # logprobs=0: only the sampled token is there
        found = next(iter(entry.values()))
    return None if found is None else float(found["logprob"])


def vllm_result(row: dict, *, max_new_tokens: int) -> dict:
    """Postprocess of the vLLM processor: the row in GENERATED_SCHEMA's columns."""
    tokens = [int(t) for t in row.get("generated_tokens") or []]
    values = [_token_logprob(e, t) for e, t in zip(row.get("logprobs") or [], tokens, strict=False)]
    known = [v for v in values if v is not None]
    num = int(row.get("num_generated_tokens") or len(tokens))
    return {
        **{name: row[name] for name in CANDIDATE_SCHEMA.names},
        "text": row["generated_text"],
        "num_tokens": num,
        "mean_logprob": sum(known) / len(known) if tokens and len(known) == len(tokens) else None,
        "finished": num < max_new_tokens,  # vLLM stopped before the budget: EOS or a stop token
    }


def vllm_processor_config(cfg: GenerateConfig) -> Any:
    """The `vLLMEngineProcessorConfig` of a job: one engine per replica (`concurrency`), each
    tensor-parallel over `num_gpus` GPUs; the tokenizer stages follow `tokenizer`."""
    from ray.data.llm import (
        ChatTemplateStageConfig,
        DetokenizeStageConfig,
        TokenizerStageConfig,
        vLLMEngineProcessorConfig,
    )

    tokenizer = cfg.tokenizer_source
    engine_kwargs = {
        "tensor_parallel_size": max(1, int(cfg.num_gpus)),
        "dtype": cfg.dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "tokenizer": tokenizer,
        "load_format": "safetensors",  # as the transformers backend: no pickled weights
        "seed": cfg.sampling.seed,
        **cfg.engine_kwargs,
    }
    return vLLMEngineProcessorConfig(
        model_source=cfg.teacher,
        engine_kwargs=engine_kwargs,
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        chat_template_stage=ChatTemplateStageConfig(model_source=tokenizer),
        tokenize_stage=TokenizerStageConfig(model_source=tokenizer),
        detokenize_stage=DetokenizeStageConfig(model_source=tokenizer),
    )


def vllm_sampling(cfg: GenerateConfig) -> dict:
    """The vllm.SamplingParams every request shares (each adds its own seed)."""
    s = cfg.sampling
    params: dict[str, Any] = {
        "temperature": s.temperature,  # 0: greedy in vLLM too
        "top_p": s.top_p,
        "max_tokens": s.max_new_tokens,
        "logprobs": 0,  # the sampled token's log-probability only: the logprob scorer's input
    }
    if cfg.stop_tokens:
        # As ids, not vLLM's `stop` strings: those match the detokenized text, from which
        # special tokens such as <|im_end|> are already gone.
        params["stop_token_ids"] = stop_token_ids(load_tokenizer(cfg), cfg.stop_tokens)
    return params


def _conform(batch: pa.Table) -> pa.Table:
    """The rows as exactly GENERATED_SCHEMA: vLLM's come back with inferred types."""
    return pa.Table.from_pylist(batch.to_pylist(), schema=GENERATED_SCHEMA)


def generate_with_vllm(ds: ray.data.Dataset, cfg: GenerateConfig) -> ray.data.Dataset:
    """Candidate rows → GENERATED_SCHEMA rows, by `concurrency` vLLM engines."""
    from ray.data.llm import build_processor

    processor = build_processor(
        vllm_processor_config(cfg),
        preprocess=partial(vllm_request, sampling=vllm_sampling(cfg)),
        postprocess=partial(vllm_result, max_new_tokens=cfg.sampling.max_new_tokens),
    )
    return processor(ds).map_batches(_conform, batch_format="pyarrow")
