"""The Serve app over real HTTP: two apps deployed with `llada-ray serve` on the test Ray head, one
open (model from a local directory), one behind an API key (model from the S3 server). Answers
are checked against the same engine run in this process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError
from schemathesis import Case, GenerationMode

from llada_ray.config import ServeConfig, TinyModelConfig
from llada_ray.model import build_tiny_model, save_model
from llada_ray.serve.engine import RequestError, TextEngine, trained_block_size
from llada_ray.serve.loop import DecodeError, EngineLoop, LoopStats
from llada_ray.serve.process import EngineProcess
from tests import stack

MODEL = "tiny-bd"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer, s3) -> Path:
    hf = build_tiny_model(TinyModelConfig(hidden_size=64, num_layers=2, intermediate_size=128),
                          tiny_tokenizer, seed=5)  # fmt: skip
    directory = tmp_path_factory.mktemp("served") / "model"
    save_model(hf, tiny_tokenizer, directory)
    client = s3.client()
    for f in directory.iterdir():
        client.upload_file(str(f), s3.bucket, f"serve-test/model/{f.name}")
    return directory


def _settings(**extra: object) -> dict:
    return {"model_name": MODEL, "block_size": 8, "threshold": 0.9, "max_tokens_limit": 1024,
            "default_max_tokens": 24, "max_batch_size": 8, "max_ongoing_requests": 16,
            "num_cpus": 0.5, **extra}  # fmt: skip


@contextlib.contextmanager
def _serve(
    tmp: Path, head: stack.RayHead, model: str, name: str, port: int, settings: dict
) -> Iterator[str]:
    """`llada-ray serve` as its own process group, until its app answers /health."""
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump(settings))
    cmd = [str(stack.BIN / "llada-ray"), "serve", model, "--config", str(config),
           "--address", head.address, "--name", name, "--port", str(port)]  # fmt: skip
    log = tmp / f"{name}-logs" / "serve.log"
    log.parent.mkdir()
    base = f"http://127.0.0.1:{port}{settings.get('route_prefix', '/').rstrip('/')}"
    with stack.process_group(cmd, log, {}) as proc:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llada-ray serve did not come up:\n{log.read_text()}")
            time.sleep(0.5)
        yield base


@pytest.fixture(scope="module")
def servers(ray_cluster, s3, model_dir, tmp_path_factory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("serve")
    port = stack.free_port()  # one HTTP proxy per cluster: both apps share it
    secure = _settings(
        api_key_env="LLADA_RAY_TEST_API_KEY",
        route_prefix="/secure",
        storage={"endpoint_url": s3.endpoint_url},
    )
    with (
        _serve(tmp, ray_cluster, str(model_dir), "open", port, _settings()) as open_url,
        _serve(tmp, ray_cluster, f"s3://{s3.bucket}/serve-test/model", "secure", port,
               secure) as secure_url,
    ):  # fmt: skip
        yield open_url, secure_url


@pytest.fixture(scope="module")
def engine(model_dir) -> TextEngine:
    """The same model and settings, in this process: what the server must answer."""
    return TextEngine.load(ServeConfig.model_validate(_settings(model=str(model_dir))))


def _post(url: str, body: dict | str, headers: dict | None = None) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(url, data=data, headers=JSON | (headers or {}), timeout=60)


def _expected(engine: TextEngine, prompt_ids: list[int], **kw) -> tuple[str, str, int]:
    """The request decoded alone, in this process, with no loop and no server."""
    job = engine.job(prompt_ids, **kw)
    progress = engine.start(job)
    run = engine.decoder.open()
    run.add(progress.request)
    text = ""
    while run:
        run.step()
        last = engine.update(job, progress)
        text += last.text
    return text, last.finish_reason, last.completion_tokens


def test_the_loop_frees_the_row_of_a_request_nobody_reads(model_dir):
    """A caller that stops reading (what a disconnect does) cancels its request: it leaves the
    batch at the next step, and the one running beside it finishes as it would alone."""
    settings = _settings(model=str(model_dir), threshold=1.0, max_tokens_limit=2000)
    engine = TextEngine.load(ServeConfig.model_validate(settings))
    loop = EngineLoop(engine)
    prompt = engine.encode_text("def f(x):")

    async def scenario() -> str:
        gone = loop.submit(engine.job(prompt, max_tokens=2000)).updates()
        await anext(gone)  # one block, then the caller goes away
        await gone.aclose()
        text = ""
        async for update in loop.submit(engine.job(prompt, max_tokens=24)).updates():
            text += update.text
        return text  # after 3 blocks: the cancelled request left at the first

    text = asyncio.run(scenario())
    assert loop.stats.cancelled == 1 and loop.state["running"] == loop.state["waiting"] == 0
    assert loop.stats.finished == 1 and loop.stats.tokens == 24
    assert text == _expected(engine, prompt, max_tokens=24)[0]


def test_models_and_health(servers):
    open_url, _ = servers
    assert requests.get(f"{open_url}/health", timeout=10).json() == {"status": "ok"}
    models = requests.get(f"{open_url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL] and models["object"] == "list"


def test_completion_is_the_decoders_answer(servers, engine):
    open_url, _ = servers
    prompt = "def parse(self, text):"
    r = _post(f"{open_url}/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 30})
    assert r.status_code == 200, r.text
    body = r.json()
    text, reason, completion = _expected(engine, engine.encode_text(prompt), max_tokens=30)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == text and body["choices"][0]["finish_reason"] == reason
    n_prompt = len(engine.encode_text(prompt))
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        n_prompt, completion, n_prompt + completion)  # fmt: skip
    assert body["decoding"]["forwards"] > 0

    stop = text[6:9]  # a stop string the greedy answer is known to contain
    r = _post(f"{open_url}/v1/completions",
              {"model": MODEL, "prompt": prompt, "max_tokens": 30, "stop": [stop]})  # fmt: skip
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["text"] == text[: text.index(stop)] and choice["finish_reason"] == "stop"
    # Only the tokens returned count, and the prompt's whole blocks came from the prefix cache.
    assert usage["completion_tokens"] == len(engine.encode_text(choice["text"])) < completion
    assert usage["prompt_tokens_details"]["cached_tokens"] == n_prompt // 8 * 8 > 0


def test_chat_streams_block_by_block(servers, engine):
    open_url, _ = servers
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 40}
    whole = _post(f"{open_url}/v1/chat/completions", body).json()
    ids = engine.encode_chat(messages)
    text, reason, completion = _expected(engine, ids, max_tokens=40)
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": text}

    stream = body | {"stream": True, "stream_options": {"include_usage": True}}
    with requests.post(f"{open_url}/v1/chat/completions", data=json.dumps(stream),
                       headers=JSON, stream=True, timeout=60) as r:  # fmt: skip
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0] for c in chunks[1:-1]]
    assert len(deltas) >= 2  # the 40 tokens arrive as blocks of 8, not all at the end
    assert "".join(d["delta"]["content"] for d in deltas) == text
    assert deltas[-1]["finish_reason"] == reason
    assert chunks[-1]["usage"]["completion_tokens"] == completion
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == len(ids) // 8 * 8


def test_the_decode_process_answers_as_the_engine_and_its_death_fails_requests_cleanly(
    model_dir, engine
):
    """The replica's decode process (no Ray): concurrent jobs get their answers alone, and when
    the process dies, a job in flight ends with a DecodeError (never a hang)."""
    cfg = ServeConfig.model_validate(_settings(model=str(model_dir)))
    worker = EngineProcess(cfg, LoopStats(cfg.max_batch_size))
    prompts = [engine.encode_text(p) for p in ("import os", "class A:", "x = [")]

    async def answer(ids: list[int], max_tokens: int) -> str:
        parts = [u.text async for u in worker.submit(engine.job(ids, max_tokens=max_tokens))
                 .updates()]  # fmt: skip
        return "".join(parts)

    async def scenario() -> tuple[list[str], Exception | None]:
        texts = await asyncio.gather(*(answer(p, 16 + 4 * i) for i, p in enumerate(prompts)))
        doomed = worker.submit(engine.job(prompts[0], max_tokens=1000, threshold=1.0))
        updates = doomed.updates()
        await anext(updates)
        worker.process.kill()
        try:
            async for _ in updates:
                pass
        except DecodeError as err:
            return list(texts), err
        return list(texts), None

    texts, error = asyncio.run(asyncio.wait_for(scenario(), 120))
    expected = [_expected(engine, p, max_tokens=16 + 4 * i)[0] for i, p in enumerate(prompts)]
    assert texts == expected
    assert error is not None and "exited" in str(error)
    assert worker.stats.finished == 3 and worker.state["prefix_cache"] is not None


def _stats(url: str) -> dict:
    return requests.get(f"{url}/stats", timeout=10).json()


def test_token_editing_thresholds_come_from_the_mode_and_the_request(engine):
    ids = engine.encode_text("x = 1")
    speed, quality = engine.cfg.modes["speed"], engine.cfg.modes["quality"]
    plain = engine.job(ids).sampling
    assert (plain.threshold, plain.edit_threshold) == (0.9, None)  # the server's τ, no editing
    s = engine.job(ids, mode="speed").sampling
    assert (s.threshold, s.edit_threshold, s.max_post_edit_steps) == (
        speed.threshold, speed.edit_threshold, speed.max_post_edit_steps)  # fmt: skip
    s = engine.job(ids, mode="quality", edit_threshold=0.2, max_post_edit_steps=3).sampling
    assert (s.threshold, s.edit_threshold, s.max_post_edit_steps) == (quality.threshold, 0.2, 3)
    assert engine.job(ids, edit_threshold=0.4).sampling.edit_threshold == 0.4
    with pytest.raises(RequestError, match="'turbo' is not one of"):
        engine.job(ids, mode="turbo")
    # A server that edits by default: a request turns it off with mode "none".
    editing = TextEngine(engine.tokenizer, engine.cfg.model_copy(update={"mode": "speed"}),
                         engine.limit, engine.decoder)  # fmt: skip
    assert editing.job(ids).sampling.edit_threshold == speed.edit_threshold
    off = editing.job(ids, mode="none").sampling
    assert (off.threshold, off.edit_threshold) == (0.9, None)
    with pytest.raises(ValidationError, match="'none' is taken"):
        ServeConfig.model_validate(_settings(model="m", modes={"none": {"threshold": 0.5}}))


def test_an_edited_stream_is_the_decoders_answer_and_stats_show_repetition(servers, engine):
    open_url, _ = servers
    prompt = "def parse(self, text):"
    ids = engine.encode_text(prompt)
    for extra in ({"mode": "speed"}, {"mode": "quality", "edit_threshold": 0.2,
                                      "max_post_edit_steps": 3}):  # fmt: skip
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "stream": True} | extra
        with requests.post(f"{open_url}/v1/completions", data=json.dumps(body), headers=JSON,
                           stream=True, timeout=60) as r:  # fmt: skip
            events = [line[6:] for line in r.iter_lines(decode_unicode=True) if line]
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        text, reason, _ = _expected(engine, ids, max_tokens=24, **extra)
        assert "".join(c["text"] for c in chunks) == text and chunks[-1]["finish_reason"] == reason
        whole = _post(f"{open_url}/v1/completions", body | {"stream": False}).json()
        assert whole["choices"][0]["text"] == text
        assert 0 <= whole["decoding"]["repeated_3gram_share"] <= 1
        assert whole["decoding"]["edits"] >= 0
    loop = _stats(open_url)["loop"]
    assert loop["finished"] >= 4 and loop["tokens_per_forward"] > 0
    assert 0 <= loop["repeated_3gram_share"] <= 1


def test_a_client_that_disconnects_frees_its_row(servers):
    """A stream of 1000 tokens, one per forward, dropped after its first event: the replica
    cancels the request and frees its row (the loop counts it cancelled, not finished)."""
    open_url, _ = servers
    before = _stats(open_url)["loop"]
    body = {"model": MODEL, "prompt": "import os", "max_tokens": 1000, "threshold": 1.0,
            "stream": True}  # fmt: skip
    with requests.post(f"{open_url}/v1/completions", data=json.dumps(body), headers=JSON,
                       stream=True, timeout=60) as r:  # fmt: skip
        next(r.iter_lines())
    deadline = time.monotonic() + 30
    while (after := _stats(open_url)["loop"])["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, after
        time.sleep(0.2)
    assert after["cancelled"] == before["cancelled"] + 1 and after["running"] == 0
    assert after["finished"] == before["finished"]
    assert after["batch_size_histogram"] and after["mean_time_to_first_block_s"] > 0


def test_concurrent_requests_each_get_their_own_answer(servers, engine):
    """Requests of different lengths and settings batch together, with bad ones in between; each
    good one gets exactly its single-request answer, each bad one a 400."""
    open_url, _ = servers
    prompts = ["import os", "class A:", "for i in range(10):\n    print(i)", "x", "return"] * 2
    good = [{"model": MODEL, "prompt": p, "max_tokens": 8 + 5 * i, "threshold": 0.5 + 0.04 * i}
            for i, p in enumerate(prompts)]  # fmt: skip
    bad = [{"model": MODEL, "prompt": p, "max_tokens": -1} for p in prompts[:4]]
    with ThreadPoolExecutor(len(good) + len(bad)) as pool:
        responses = list(pool.map(lambda b: _post(f"{open_url}/v1/completions", b), good + bad))
    for body, r in zip(good, responses, strict=False):
        ids = engine.encode_text(body["prompt"])
        text, _, _ = _expected(engine, ids, max_tokens=body["max_tokens"],
                               threshold=body["threshold"])  # fmt: skip
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == text
    assert [r.status_code for r in responses[len(good) :]] == [400] * len(bad)


BAD = [
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": 17}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "temperature": 9}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "mode": "turbo"}, 400, "mode"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "mode": 1}, 400, "mode"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "edit_threshold": 0}, 400,
     "edit_threshold"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "edit_threshold": 1.5}, 400,
     "edit_threshold"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_post_edit_steps": -1}, 400,
     "max_post_edit_steps"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_post_edit_steps": 65}, 400,
     "max_post_edit_steps"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
     400, "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, 400,
     "messages.0.content"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_requests_get_a_4xx_naming_the_problem(servers, path, body, status, param):
    open_url, _ = servers
    r = _post(f"{open_url}{path}", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error


def test_prompt_longer_than_the_context(servers, engine):
    open_url, _ = servers
    prompt = "x = 1\n" * (engine.context_length // 2)
    r = _post(f"{open_url}/v1/completions", {"model": MODEL, "prompt": prompt})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_api_key_is_required_when_set(servers):
    _, secure_url = servers
    key = stack.SERVE_ENV["LLADA_RAY_TEST_API_KEY"]
    body = {"model": MODEL, "prompt": "import os", "max_tokens": 8}
    assert requests.get(f"{secure_url}/health", timeout=10).ok  # probes need no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
        # The key is checked first: a malformed body without it is a 401, not a 400.
        for sent in (body, "{not json", {"model": MODEL, "max_tokens": -1}):
            r = _post(f"{secure_url}/v1/completions", sent, headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (
            requests.get(f"{secure_url}/v1/models", headers=headers, timeout=10).status_code == 401
        )
    ok = _post(f"{secure_url}/v1/completions", body, {"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200 and ok.json()["model"] == MODEL


# --- hard knocks: load, fuzz, a killed replica ------------------------------------------------


def _load_request(rng: random.Random, url: str) -> tuple[str, str | dict, bool]:
    """(url, body, valid) drawn from completions, chats and the malformed requests of BAD."""
    kind = rng.random()
    if kind < 0.4:
        body = {"model": MODEL, "prompt": rng.choice(["import os", "def f(x):", "class A:"]),
                "max_tokens": rng.randint(4, 16)}  # fmt: skip
        return f"{url}/v1/completions", body, True
    if kind < 0.7:
        message = {"role": "user", "content": rng.choice(["hi", "sort 3 1 2"])}
        body = {"model": MODEL, "max_tokens": rng.randint(4, 16), "stream": rng.random() < 0.3,
                "messages": [message]}  # fmt: skip
        return f"{url}/v1/chat/completions", body, True
    path, body, _, _ = rng.choice(BAD)
    return f"{url}{path}", body, False


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_32_clients_for_60_s_with_malformed_requests_get_no_5xx(servers, capsys):
    open_url, _ = servers
    stop = time.monotonic() + 60
    results: list[tuple[bool, int, float]] = []  # (valid, status, seconds)

    def client(seed: int) -> None:
        rng, session = random.Random(seed), requests.Session()
        while time.monotonic() < stop:
            url, body, valid = _load_request(rng, open_url)
            data = body if isinstance(body, str) else json.dumps(body)
            started = time.monotonic()
            r = session.post(url, data=data, headers=JSON, timeout=120)
            r.content  # a stream counts once it has ended  # noqa: B018
            results.append((valid, r.status_code, time.monotonic() - started))

    with ThreadPoolExecutor(32) as pool:
        for future in [pool.submit(client, seed) for seed in range(32)]:
            future.result()  # a client error (timeout, reset) fails the test here
    statuses = [s for _, s, _ in results]
    assert not [s for s in statuses if s >= 500]
    assert all(s == 200 for v, s, _ in results if v)
    assert all(400 <= s < 500 for v, s, _ in results if not v)
    latency = [t for v, _, t in results if v]
    with capsys.disabled():
        print(f"\n  serve load: {len(results)} requests in 60 s from 32 clients "
              f"({len(latency)} valid), 0 × 5xx, latency p50 {_percentile(latency, 0.5):.2f} s "
              f"p99 {_percentile(latency, 0.99):.2f} s")  # fmt: skip


def _cheap(case: Case) -> Case:
    """Fuzzed bodies stay cheap to decode: at most 2 choices × 2 prompts × 8 tokens."""
    if isinstance(case.body, dict):
        body = dict(case.body)
        for key, cap in (("max_tokens", 8), ("max_completion_tokens", 8), ("n", 2)):
            if isinstance(body.get(key), int) and body[key] > cap:
                body[key] = cap
        if isinstance(body.get("prompt"), list):
            body["prompt"] = body["prompt"][:2]
        case.body = body
    return case


def test_fuzzed_requests_from_the_openapi_document_get_no_5xx(servers):
    """schemathesis draws requests from the app's own OpenAPI document, valid and invalid, for
    every operation; none may get a 5xx (bounded: 30 examples per operation and mode)."""
    open_url, _ = servers
    schema = schemathesis.openapi.from_url(f"{open_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    session = requests.Session()
    seen: list[int] = []
    for op in operations:
        # An operation without parameters or body (GET /health) has no invalid request.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.body else [])
        for mode in modes:

            @settings(max_examples=30, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=op.as_strategy(generation_mode=mode).map(_cheap))
            def call(case: Case) -> None:
                r = case.call(base_url=open_url, session=session, timeout=60)
                seen.append(r.status_code)
                assert r.status_code < 500, (case.method, case.path, case.body, r.text)

            call()
    assert len(seen) > 4 * 30 and any(s == 200 for s in seen) and any(s == 400 for s in seen)


def _replica_pids(head: stack.RayHead, app: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=head.dashboard_url, filters=[("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.class_name == f"ServeReplica:{app}:LLaDAServer"]


def test_killed_replica_under_load_fails_in_flight_requests_cleanly_and_comes_back(
    servers, ray_cluster, capsys
):
    """SIGKILL the replica while 8 clients keep it busy: every request ends (no hung client),
    those in flight with a 5xx at worst, and the controller brings a replica back that answers."""
    open_url, _ = servers
    (victim,) = _replica_pids(ray_cluster, "open")
    killed_at: list[float] = []
    results: list[tuple[float, float, int]] = []  # (sent, ended, status)
    body = json.dumps({"model": MODEL, "prompt": "def f(x):", "max_tokens": 16})

    def client() -> None:
        session = requests.Session()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            sent = time.monotonic()
            r = session.post(f"{open_url}/v1/completions", data=body, headers=JSON, timeout=90)
            results.append((sent, time.monotonic(), r.status_code))
            recovered = [s for t, _, s in results if killed_at and t > killed_at[0] + 1]
            if recovered.count(200) >= 3:
                return

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client) for _ in range(8)]
        while len(results) < 8:
            time.sleep(0.1)
        killed_at.append(time.monotonic())
        os.kill(victim, signal.SIGKILL)
        for future in futures:
            future.result()  # a timeout or reset would fail the test here: none may hang
    (replica,) = _replica_pids(ray_cluster, "open")
    assert replica != victim
    failed = [(t, s) for t, _, s in results if s != 200]
    assert all(
        s >= 500 for _, s in failed
    )  # a dead replica is the server's fault, not the client's
    # Only requests sent before the kill or while no replica was up may fail.
    back = min(end for sent, end, s in results if s == 200 and sent > killed_at[0])
    assert all(t < back for t, _ in failed)
    assert _post(f"{open_url}/v1/completions", json.loads(body)).status_code == 200
    with capsys.disabled():
        print(f"\n  replica killed under load: {len(results)} requests, failed "
              f"{sorted(s for _, s in failed)}, answering again {back - killed_at[0]:.1f} s "
              "after the kill")  # fmt: skip


def test_the_block_size_is_the_exports_unless_configured(tmp_path) -> None:
    """A model decodes well only at the block size it last trained at: the export says which
    (lineage.json); a configured one wins; a model with neither decodes at LLaDA2's 32."""
    cfg = ServeConfig(model=str(tmp_path))
    assert trained_block_size(cfg, tmp_path) == 32
    (tmp_path / "lineage.json").write_text(json.dumps({"block_size": 8}))
    assert trained_block_size(cfg, tmp_path) == 8
    assert trained_block_size(cfg.model_copy(update={"block_size": 16}), tmp_path) == 16
