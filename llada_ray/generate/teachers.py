"""The teacher backends' shared contract and the choice between them, and the transformers
backend: an actor pool of `TransformersTeacher`. The vLLM backend is in vllm_teacher.py."""

from __future__ import annotations

import importlib.util
import json
from typing import TYPE_CHECKING, Literal

import pyarrow as pa
import ray
import ray.data

from llada_ray.data.chat import prompt_ids
from llada_ray.decoding.sampling import Sampling, filtered
from llada_ray.generate.config import GenerateConfig
from llada_ray.generate.prompts import CANDIDATE_SCHEMA

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

Backend = Literal["vllm", "transformers"]

# What both backends return: the candidate rows, in their order, with what the teacher made.
GENERATED_SCHEMA = pa.schema(
    [
        *CANDIDATE_SCHEMA,
        ("text", pa.string()),
        ("num_tokens", pa.int32()),
        ("mean_logprob", pa.float64()),  # the teacher's, per generated token (EOS included)
        ("finished", pa.bool_()),  # False: cut at max_new_tokens
    ]
)


def resolve_backend(cfg: GenerateConfig) -> Backend:
    """auto: vLLM when it is installed here and the cluster has GPUs, else transformers."""
    if cfg.backend != "auto":
        return cfg.backend
    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if has_vllm and ray.cluster_resources().get("GPU", 0) > 0 else "transformers"


def load_tokenizer(cfg: GenerateConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        cfg.tokenizer_source, trust_remote_code=cfg.trust_remote_code
    )


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> list[int]:
    """The ids of `stop_tokens`, each of which must be one token of the tokenizer."""
    ids = []
    for token in tokens:
        tid = tokenizer.convert_tokens_to_ids(token)
        if not isinstance(tid, int) or tokenizer.convert_ids_to_tokens(tid) != token:
            raise ValueError(f"stop_tokens: {token!r} is not one token of the tokenizer")
        ids.append(tid)
    return ids


class StepSampler:
    """A logits processor seeing every step's raw logits: it keeps the teacher's log-probability
    of each chosen token, and when sampling picks the next token of each row with that row's own
    generator (HF's sampling draws from one global RNG, so a row's sample would depend on its
    batch). It returns a one-hot score row, which generate's greedy step then takes."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        self.seeds = seeds
        self.sampling = Sampling(temperature=temperature, top_p=top_p)
        self.generators: list[torch.Generator] | None = None
        self.last: torch.Tensor | None = None  # log-softmax of the previous step
        self.logprobs: list[torch.Tensor] = []  # [step] (batch,)

    def take(self, tokens: torch.Tensor) -> None:
        """Record the log-probability of `tokens`, the ones chosen at the previous step."""
        if self.last is not None:
            self.logprobs.append(self.last.gather(1, tokens[:, None].to(self.last.device))[:, 0])
            self.last = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        self.take(input_ids[:, -1])
        self.last = torch.log_softmax(scores.float(), dim=-1)
        if self.sampling.temperature == 0:
            return scores
        probs = filtered(scores.float(), self.sampling).softmax(-1)  # the decoder's own filter
        if self.generators is None:
            self.generators = [
                torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds
            ]
        pairs = zip(probs, self.generators, strict=True)
        chosen = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in pairs])
        onehot = torch.full_like(scores, float("-inf"))
        onehot[torch.arange(len(chosen)), chosen] = 0.0
        return onehot


class TransformersTeacher:
    """Actor: the teacher loaded once (safetensors only); batches of candidate rows → generations.

    Prompts are rendered with the tokenizer's chat template and left-padded into one `generate`
    call. The teacher's own generation defaults (temperature, top_k, repetition penalty, …) are
    replaced: the config's sampling is the whole of what shapes a sample.
    """

    def __init__(self, cfg: dict) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.cfg = c = GenerateConfig.model_validate(cfg)
        torch.manual_seed(c.sampling.seed)
        self.tokenizer = load_tokenizer(c)
        if not self.tokenizer.chat_template:
            raise ValueError(f"tokenizer of {c.tokenizer_source} has no chat template")
        self.device = torch.device("cuda" if c.num_gpus > 0 else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            c.teacher,
            dtype="auto" if c.dtype == "auto" else getattr(torch, c.dtype),
            trust_remote_code=c.trust_remote_code,
            use_safetensors=True,  # no pickle of untrusted weights
            device_map="auto" if c.num_gpus > 1 else None,  # spread over the replica's GPUs
        ).eval()
        if c.num_gpus <= 1:
            self.model.to(self.device)
        self.eos = self._stop_ids()
        pad = self.tokenizer.pad_token_id
        self.pad = min(self.eos) if pad is None else pad
        self.model.generation_config = GenerationConfig(
            eos_token_id=sorted(self.eos),
            pad_token_id=self.pad,
            bos_token_id=self.model.generation_config.bos_token_id,
        )

    def _stop_ids(self) -> set[int]:
        """EOS of the tokenizer and of the teacher's generation config, plus stop_tokens."""
        ids: set[int] = set(stop_token_ids(self.tokenizer, self.cfg.stop_tokens))
        for value in (self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id):
            ids |= set(value if isinstance(value, list) else [] if value is None else [value])
        if not ids:
            raise ValueError("the teacher's tokenizer has no EOS token and stop_tokens is empty")
        return ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch
        from transformers import LogitsProcessorList

        rows = batch.to_pylist()
        prompts = [prompt_ids(self.tokenizer, json.loads(r["chat"])) for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        s = self.cfg.sampling
        sampler = StepSampler([r["sample_seed"] for r in rows], s.temperature, s.top_p)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=s.max_new_tokens,
                do_sample=False,  # StepSampler samples; generate takes its one-hot choice
                logits_processor=LogitsProcessorList([sampler]),
            )
        new = out[:, width:].cpu()
        sampler.take(new[:, -1])  # the last step's choice has no step after it to record it
        logprobs = torch.stack(sampler.logprobs, dim=1).cpu()
        for i, row in enumerate(rows):
            tokens = new[i].tolist()
            end = next((j for j, t in enumerate(tokens) if t in self.eos), None)
            length = len(tokens) if end is None else end + 1
            # The text stops before the stop token (a stop token need not be a special token).
            text_ids = tokens if end is None else tokens[:end]
            row["text"] = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            row["num_tokens"] = length
            row["mean_logprob"] = float(logprobs[i, :length].mean())
            row["finished"] = end is not None
        return pa.Table.from_pylist(rows, schema=GENERATED_SCHEMA)


def generate_with_transformers(ds: ray.data.Dataset, cfg: GenerateConfig) -> ray.data.Dataset:
    """Candidate rows → GENERATED_SCHEMA rows, by a pool of `concurrency` teacher actors."""
    return ds.map_batches(
        TransformersTeacher,
        fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json")},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
    )
