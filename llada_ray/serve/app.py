"""The Ray Serve app: one deployment that answers the OpenAI API from a continuously batched
decode loop (serve/loop.py) in a process of its own (serve/process.py).

`build(args)` is the app builder for `serve run` / `serve deploy` (serve/config.yaml) and for
`llada-ray serve`. The API key is checked first, then the request is validated, so a bad
request is answered with a 4xx at once and never touches the others; requests that pass join
the replica's running batch at the next block boundary and leave it when they finish (or when
their client goes away).
"""

import asyncio
import hmac
import json
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from llada_ray.config import ServeConfig
from llada_ray.serve.engine import Job, RequestError, TextEngine, Update
from llada_ray.serve.loop import DecodeError
from llada_ray.serve.metrics import ServeMetrics
from llada_ray.serve.process import EngineProcess
from llada_ray.serve.protocol import ChatRequest, CompletionRequest

api = FastAPI(title="llada-ray", description="Block-diffusion LM behind the OpenAI API")
api.state.api_key = None  # bytes when the deployment has a key (set by the replica)
OPEN_PATHS = ("/health",)  # answered without the key (load balancers probe it)


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    if status >= 500:
        kind = "server_error"
    else:
        kind = "authentication_error" if status == 401 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


@api.middleware("http")
async def _authorize(request: Request, call_next):
    """The key is checked before anything reads the body: an unknown client learns nothing
    about what a valid request looks like (401, not 400)."""
    key = request.app.state.api_key
    if key is not None and not request.url.path.endswith(OPEN_PATHS):
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Bytes: compare_digest refuses non-ASCII str, and headers arrive latin-1 decoded.
        token_bytes = token.encode("latin-1", errors="replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_bytes, key):
            message = "missing or wrong API key (Authorization: Bearer …)"
            return _error(401, message, code="invalid_api_key")
    return await call_next(request)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error')}")
    # Union members add their type to the location ("prompt", "str"): keep field names only.
    path = [p for p in first.get("loc", ())[1:] if isinstance(p, int) or _is_field(p)]
    where = ".".join(map(str, path)) or None
    return _error(400, f"{where or 'body'}: {first.get('msg')}", where)


def _is_field(part: str) -> bool:
    return part.isidentifier() and part not in {"str", "int", "float", "bool", "list", "dict"}


@api.exception_handler(RequestError)
async def _refused(request: Request, err: RequestError) -> JSONResponse:
    return _error(err.status, err.message, err.param, err.code)


@api.exception_handler(HTTPException)
async def _http(request: Request, err: HTTPException) -> JSONResponse:
    return _error(err.status_code, str(err.detail))


@api.exception_handler(DecodeError)
async def _decode_failed(request: Request, err: DecodeError) -> JSONResponse:
    return _error(500, str(err), code="decode_failed")


def _usage(finals: list[Update]) -> dict:
    prompt = sum(u.prompt_tokens for u in finals)
    completion = sum(u.completion_tokens for u in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in finals)},
    }


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _decoding(finals: list[Update]) -> dict:
    """Our extension to `usage`: how the tokens were decoded."""
    tokens, forwards = sum(u.completion_tokens for u in finals), sum(u.forwards for u in finals)
    repeated, trigrams = sum(u.repeated_3grams for u in finals), sum(u.trigrams for u in finals)
    return {
        "forwards": forwards,
        "tokens_per_forward": round(tokens / max(forwards, 1), 3),
        "repeated_3grams": repeated,  # 3-grams of an answer seen earlier in it, of trigrams
        "trigrams": trigrams,
        "repeated_3gram_share": round(repeated / max(trigrams, 1), 4),
        "edits": sum(u.edits for u in finals),
        "seconds": round(max((u.seconds for u in finals), default=0.0), 4),
    }


@serve.deployment(name="LLaDAServer")
@serve.ingress(api)
class LLaDAServer:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.engine = TextEngine.load(cfg, decode=False)  # tokenizer and limits: no weights
        self.loop = EngineProcess(cfg, ServeMetrics(cfg.max_batch_size))
        key = os.environ.get(cfg.api_key_env)
        api.state.api_key = key.encode() if key else None
        self.created = int(time.time())

    def _check_model(self, name: str) -> None:
        if name != self.cfg.model_name:
            raise RequestError(
                f"model {name!r} does not exist; this server has {self.cfg.model_name!r}",
                "model",
                404,
                "model_not_found",
            )

    def _jobs(self, body: CompletionRequest | ChatRequest, prompts: list[list[int]]) -> list[Job]:
        limit = body.token_limit if isinstance(body, ChatRequest) else body.max_tokens
        jobs = []
        for ids in prompts:
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i
                jobs.append(
                    self.engine.job(
                        ids,
                        max_tokens=limit,
                        temperature=body.temperature,
                        top_p=body.top_p,
                        top_k=body.top_k,
                        threshold=body.threshold,
                        mode=body.mode,
                        edit_threshold=body.edit_threshold,
                        max_post_edit_steps=body.max_post_edit_steps,
                        min_accept=body.min_accept,
                        seed=seed,
                        stop=body.stops,
                        ignore_eos=body.ignore_eos,
                    )
                )
        return jobs

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/stats")
    async def stats(self) -> dict:
        """The decode loop (batch sizes formed, queue wait, time to first block) and the prefix
        cache (hit rate, memory); the same figures go to Ray's metrics."""
        state = self.loop.state
        return {
            "loop": self.loop.stats.summary() | {k: state[k] for k in ("running", "waiting")},
            "prefix_cache": state["prefix_cache"],
        }

    @api.get("/v1/models")
    async def models(self) -> dict:
        card = {
            "id": self.cfg.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "llada-ray",
        }
        return {"object": "list", "data": [card]}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        self._check_model(body.model)
        jobs = self._jobs(body, [self.engine.encode_text(p) for p in body.prompts])
        return await self._respond(body, jobs, "text_completion", "cmpl")

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest):
        self._check_model(body.model)
        ids = self.engine.encode_chat([m.plain() for m in body.messages])
        jobs = self._jobs(body, [ids])
        return await self._respond(body, jobs, "chat.completion", "chatcmpl")

    async def _respond(self, body, jobs: list[Job], kind: str, prefix: str):
        head = {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.cfg.model_name,
        }
        chat = kind == "chat.completion"
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            # OpenAI names chat chunks "chat.completion.chunk"; completion chunks keep their name.
            chunk = f"{kind}.chunk" if chat else kind
            events = self._stream(jobs, head | {"object": chunk}, chat, usage)
            return StreamingResponse(events, media_type="text/event-stream")
        finals = await asyncio.gather(*(self._collect(job) for job in jobs))
        choices = []
        for i, (text, last) in enumerate(finals):
            content = (
                {"message": {"role": "assistant", "content": text}}
                if chat
                else {"text": text, "logprobs": None}
            )
            choices.append({"index": i, **content, "finish_reason": last.finish_reason})
        return head | {
            "object": kind,
            "choices": choices,
            "usage": _usage([last for _, last in finals]),
            "decoding": _decoding([last for _, last in finals]),
        }

    async def _collect(self, job: Job) -> tuple[str, Update]:
        parts, last = [], None
        async for update in self.loop.submit(job).updates():
            parts.append(update.text)
            last = update
        return "".join(parts), last

    async def _stream(self, jobs: list[Job], head: dict, chat: bool, usage: bool):
        """SSE: a chunk per finished block of each choice, the finish reason, then [DONE].
        Events ready together go out as one message (the role with the first block, the last
        block with the usage and [DONE]): each message is a hop through Serve's proxy."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: Job) -> None:
            try:
                async for update in self.loop.submit(job).updates():
                    await queue.put((i, update))
            except Exception as err:  # the stream ends with an error event, never hangs
                await queue.put((i, err))
            finally:
                await queue.put((i, None))

        def event(i: int, update: Update | Exception) -> str:
            if isinstance(update, Exception):
                error = {"message": str(update), "type": "server_error", "param": None,
                         "code": None}  # fmt: skip
                return _sse({"error": error})
            piece = (
                {"delta": {"content": update.text}}
                if chat
                else {"text": update.text, "logprobs": None}
            )
            choice = {"index": i, **piece, "finish_reason": update.finish_reason}
            return _sse(head | {"choices": [choice]})

        tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
        finals: list[Update] = []
        ready: list[str] = []
        if chat:
            role = {"role": "assistant", "content": ""}
            first = [{"index": i, "delta": role, "finish_reason": None} for i in range(len(jobs))]
            ready.append(_sse(head | {"choices": first}))
        try:
            running = len(jobs)
            while running:
                i, update = await queue.get()
                while True:
                    if update is None:
                        running -= 1
                    else:
                        ready.append(event(i, update))
                        if isinstance(update, Update) and update.finish_reason is not None:
                            finals.append(update)
                    if queue.empty():
                        break
                    i, update = queue.get_nowait()
                if running:
                    yield "".join(ready)
                    ready = []
            if usage:
                totals = _usage(finals)
                ready.append(_sse(head | {"choices": [], "usage": totals,
                                          "decoding": _decoding(finals)}))  # fmt: skip
            yield "".join([*ready, _sse("[DONE]")])
        finally:
            for task in tasks:
                task.cancel()


def build(args: dict) -> Application:
    """App builder: `args` are a ServeConfig (validated here, before anything is deployed)."""
    try:
        cfg = ServeConfig.model_validate(args)
    except ValidationError as err:
        raise ValueError(f"invalid serve config:\n{err}") from err
    return LLaDAServer.options(
        max_ongoing_requests=cfg.max_ongoing_requests,
        autoscaling_config=cfg.autoscaling.model_dump(),
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    ).bind(cfg)
