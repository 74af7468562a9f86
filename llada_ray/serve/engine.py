"""Text in, text out: a decoder plus its tokenizer, with the limits a server must enforce.

No Ray here: the Serve deployment, the benchmarks and the demo all drive this one engine.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pyarrow.fs as pafs
import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from llada_ray.config import LLADA2_BLOCK_SIZE, ServeConfig, decode_mode
from llada_ray.data.chat import prompt_ids
from llada_ray.decoding import ARDecoder, BlockDecoder, Decoder, EngineOptions, Sampling
from llada_ray.decoding.batch import ContextLimit, Request
from llada_ray.decoding.prefix import PrefixStats
from llada_ray.decoding.sampling import repeated_ngrams
from llada_ray.model import DiffusionLM, load_model
from llada_ray.model.io import MODEL_FILES, load_tokenizer
from llada_ray.storage import filesystem_for

GREEDY_BELOW = 1e-4  # temperatures under this decode greedily


class RequestError(ValueError):
    """A request the server refuses; `status` and `code` go into the OpenAI-style error body."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass(frozen=True)
class Job:
    """One validated request, ready to decode."""

    prompt_ids: list[int]
    sampling: Sampling
    seed: int | None = None
    stops: tuple[str, ...] = ()


@dataclass
class Update:
    """A job's progress after one decoder step: the text since the previous update."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int  # of the text returned so far (a stop string cuts them too)
    cached_tokens: int  # prompt tokens the prefix cache held
    forwards: int
    seconds: float
    repeated_3grams: int = 0  # of the answer so far (EOS left out)
    trigrams: int = 0
    edits: int = 0  # token editing: decided tokens replaced


@dataclass
class Progress:
    """A job as it decodes: its decoder request and what has been given out."""

    request: Request
    sent: int = 0  # characters of the decoded text already given out
    updates: int = 0


def fetch_model(uri: str, cfg: ServeConfig, weights: bool = True) -> Path:
    """A local directory holding the model: the URI itself, or a copy of its files from S3
    (without the weights when `weights` is False: config and tokenizer only)."""
    fs, path = filesystem_for(uri, cfg.storage)
    if isinstance(fs, pafs.LocalFileSystem):
        if not Path(path, "config.json").is_file():
            raise FileNotFoundError(f"{uri}: no config.json (not a model directory)")
        return Path(path)
    local = Path(tempfile.mkdtemp(prefix="llada-model-"))
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    names = [
        i.base_name
        for i in infos
        if i.is_file
        and i.base_name.endswith(MODEL_FILES)
        and i.base_name != "manifest.json"
        and (weights or not i.base_name.endswith(".safetensors"))
    ]
    if "config.json" not in names:
        raise FileNotFoundError(f"{uri}: no config.json (not a model directory)")
    for name in names:
        pafs.copy_files(f"{path}/{name}", str(local / name), source_filesystem=fs)
    return local


def trained_block_size(cfg: ServeConfig, local: Path) -> int:
    """The configured block size, else the one the export records (lineage.json), else
    LLaDA2's: a model decodes well only at the block size it last trained at."""
    lineage = local / "lineage.json"
    if cfg.block_size is None and lineage.is_file():
        return json.loads(lineage.read_text()).get("block_size") or LLADA2_BLOCK_SIZE
    return cfg.block_size or LLADA2_BLOCK_SIZE


class TextEngine:
    """Text to jobs (tokenizer, limits), and, with a decoder, jobs to text updates. A server's
    HTTP side loads it without a decoder (`decode=False`: no weights); its decode process with
    one."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        cfg: ServeConfig,
        limit: ContextLimit,
        decoder: Decoder | None = None,
    ) -> None:
        self.tokenizer, self.cfg, self.limit, self._decoder = tokenizer, cfg, limit, decoder

    @classmethod
    def load(cls, cfg: ServeConfig, decode: bool = True) -> TextEngine:
        local = fetch_model(cfg.model, cfg, weights=decode)
        block_size = trained_block_size(cfg, local)
        if not decode:
            context = AutoConfig.from_pretrained(local).max_position_embeddings
            block = block_size if cfg.decoder == "block" else 1
            limit = ContextLimit(min(cfg.max_length, context), block)
            return cls(load_tokenizer(local), cfg, limit)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        hf, tokenizer = load_model(local, dtype=cfg.dtype)
        device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        dlm = DiffusionLM(hf.to(device), attention=cfg.attention)
        eos = tokenizer.eos_token_id
        engine = EngineOptions(
            cfg.max_batch_size,
            cfg.decoding.length_bucket,
            cfg.decoding.compile,
            cfg.decoding.prefix_cache_mb,
            block_size,
        )
        length = min(cfg.max_length, dlm.hf.config.max_position_embeddings)
        decoder: Decoder = (
            BlockDecoder(
                dlm, eos, block_size, cfg.use_cache, length, engine, cfg.decoding.multi_block_edit
            )
            if cfg.decoder == "block"
            else ARDecoder(dlm, eos, cfg.use_cache, length, engine)
        )
        decoder.warm_up()  # compiled: every bucket now, not on a client's request
        return cls(tokenizer, cfg, decoder.limit, decoder)

    @property
    def decoder(self) -> Decoder:
        if self._decoder is None:
            raise RuntimeError("this TextEngine was loaded without a decoder (decode=False)")
        return self._decoder

    @property
    def context_length(self) -> int:
        return self.limit.max_length

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise RequestError("this model has no chat template: use /v1/completions", "messages")
        try:
            return prompt_ids(self.tokenizer, messages)
        except (jinja2.TemplateError, ValueError) as err:  # templates may refuse an order
            message = f"the chat template refused these messages: {err}"
            raise RequestError(message, "messages") from err

    def job(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
        mode: str | None = None,
        edit_threshold: float | None = None,
        max_post_edit_steps: int | None = None,
        min_accept: int | None = None,
        seed: int | None = None,
        stop: tuple[str, ...] = (),
        ignore_eos: bool = False,
    ) -> Job:
        """A Job, or a RequestError naming the parameter that is out of bounds.

        Thresholds: the request's `mode` (else the server's) gives τ_mask, τ_edit and the
        post-edit cap, and `threshold`, `edit_threshold`, `max_post_edit_steps` override each;
        with no mode (or "none"), `threshold` or the server's, no editing unless
        `edit_threshold`."""
        cfg = self.cfg
        try:
            preset = decode_mode(cfg.modes, mode or cfg.mode, cfg.threshold)
        except ValueError as err:
            raise RequestError(str(err), "mode") from err
        given = {"threshold": threshold, "edit_threshold": edit_threshold,
                 "max_post_edit_steps": max_post_edit_steps}  # fmt: skip
        thresholds = preset.model_dump() | {k: v for k, v in given.items() if v is not None}
        max_tokens = cfg.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > cfg.max_tokens_limit:
            raise RequestError(
                f"max_tokens {max_tokens} exceeds this server's limit of {cfg.max_tokens_limit}",
                "max_tokens",
            )
        if not prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        try:
            self.limit.check(len(prompt_ids), max_tokens)
        except ValueError as err:
            raise RequestError(str(err), "max_tokens", code="context_length_exceeded") from err
        if top_k is not None and top_k > len(self.tokenizer):
            raise RequestError(f"top_k {top_k} exceeds the vocabulary", "top_k")
        temperature = cfg.temperature if temperature is None else temperature
        sampling = Sampling(
            **thresholds,
            min_accept=cfg.min_accept if min_accept is None else min_accept,
            max_new_tokens=max_tokens,
            # Below this, logits / T overflows to inf: such a request means greedy.
            temperature=0.0 if temperature < GREEDY_BELOW else temperature,
            top_k=top_k,
            top_p=top_p,
            ignore_eos=ignore_eos,
        )
        return Job(prompt_ids, sampling, seed, stop)

    def start(self, job: Job) -> Progress:
        """The job as a decoder request, ready to join a running batch."""
        stop = None
        if job.stops:

            def stop(tokens: list[int]) -> bool:
                return _stop_at(self._text(tokens), job.stops) is not None

        return Progress(self.decoder.request(job.prompt_ids, job.sampling, job.seed, stop))

    def update(self, job: Job, p: Progress) -> Update:
        """What is new since the last update (text that may still turn into a stop string, or
        half of a multi-byte character, is held back until it cannot)."""
        g = p.request.out
        text = self._text(g.tokens)
        cut = _stop_at(text, job.stops)
        tokens = len(g.tokens)
        if cut is not None:
            text = text[:cut]
            tokens = self._tokens_for(g.tokens, cut)
        if g.done:
            end = len(text)
        else:
            end = len(text) - max((len(s) - 1 for s in job.stops), default=0)
            while end > 0 and text[end - 1] == "\ufffd":
                end -= 1
        end = max(end, p.sent)
        delta, p.sent = text[p.sent : end], end
        p.updates += 1
        # The answer's repetition, once it is whole (/stats and the `decoding` object).
        eos = self.tokenizer.eos_token_id
        repeated, trigrams = repeated_ngrams(g.tokens[:tokens], 3, eos) if g.done else (0, 0)
        return Update(
            delta,
            g.finish_reason,
            len(job.prompt_ids),
            tokens,
            g.cached_tokens,
            g.forwards,
            g.seconds,
            repeated,
            trigrams,
            g.edits,
        )

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _tokens_for(self, tokens: list[int], chars: int) -> int:
        """The fewest leading tokens whose text holds the first `chars` characters."""
        low, high = 0, len(tokens)
        while low < high:
            mid = (low + high) // 2
            if len(self._text(tokens[:mid])) >= chars:
                high = mid
            else:
                low = mid + 1
        return low

    @property
    def prefix_stats(self) -> PrefixStats | None:
        engine = self.decoder.engine
        return None if engine is None or engine.prefix is None else engine.prefix.stats


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in the text, if any."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
