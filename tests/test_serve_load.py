"""Load levels L0-L4 of shared/RELIABILITY.md on the tiny model (bounded in count and time)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from fmforge.api import load
from fmforge.generate.engine import generate_tokens
from fmforge.generate.scheduler import Request
from fmforge.serve.engine import BatchEngine
from polling import wait_until
from test_serve_support import (  # noqa: F401
    MODEL_NAME,
    ThreadServer,
    make_app,
    serve_model_dir,
    start_server,
)

PROMPTS = [
    "def alpha_1(beta):",
    "return",
    "gamma delta value count index total item and more words here",
    "x",
    "def count_3(index):\n    return index + 4",
    "# total",
]


def _chat(content: str, max_tokens: int = 12, **extra) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}]}
    return {**body, "max_tokens": max_tokens, "temperature": 0, **extra}


def test_l0_sequential_requests_of_every_kind_are_reproducible(serve_model_dir):  # noqa: F811
    app, _ = make_app(serve_model_dir)
    kinds = [
        ("/v1/chat/completions", _chat("hello")),
        ("/v1/chat/completions", _chat("hello", stream=True)),
        (
            "/v1/completions",
            {"model": MODEL_NAME, "prompt": "def", "max_tokens": 8, "temperature": 0},
        ),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "def", "max_tokens": 8, "seed": 7}),
        (
            "/v1/completions",
            {"model": MODEL_NAME, "prompt": "def", "max_tokens": 8, "stream": True},
        ),
        ("/v1/embeddings", {"model": MODEL_NAME, "input": "x"}),
    ]
    seen: dict[int, set] = {i: set() for i in range(len(kinds))}
    with TestClient(app) as client:
        for round_ in range(20):
            index = round_ % len(kinds)
            path, body = kinds[index]
            response = client.post(path, json=body)
            assert response.status_code in (200, 400)
            if body.get("stream"):
                lines = [x for x in response.text.split("\n\n") if x]
                assert lines[-1] == "data: [DONE]"
                if body.get("temperature") == 0:
                    text = "".join(
                        (c["choices"][0].get("delta", {}).get("content") or "")
                        for c in map(lambda x: json.loads(x[6:]), lines[:-1])
                        if c["choices"]
                    )
                    seen[index].add(text)
            elif response.status_code == 200:
                choice = response.json()["choices"][0]
                seen[index].add(choice.get("text") or choice.get("message", {}).get("content"))
            else:
                seen[index].add(response.json()["error"]["code"])
    for index, (_, body) in enumerate(kinds):
        if body.get("temperature") == 0 or "seed" in body or index == 5:
            assert len(seen[index]) == 1, kinds[index]


@pytest.mark.parametrize("slots,requests", [(1, 3), (2, 2), (2, 4), (4, 6)])
def test_l1_concurrent_greedy_outputs_equal_solo(serve_model_dir, slots, requests):  # noqa: F811
    loaded = load(serve_model_dir)
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(requests)]
    budgets = [10 + 3 * i for i in range(requests)]
    solo = [
        generate_tokens(loaded.model, [p], n, stop_token_ids=[tokenizer.eos_id])[0].tokens
        for p, n in zip(prompts, budgets)
    ]
    engine = BatchEngine(loaded.model, tokenizer, slots=slots, max_queue=requests)
    engine.start()
    try:
        outputs = [[] for _ in prompts]
        done = threading.Semaphore(0)

        def on_event(index, event):
            if event.token is not None:
                outputs[index].append(event.token)
            if event.finish_reason:
                done.release()

        reqs = [Request(p, n, stop_ids=[tokenizer.eos_id]) for p, n in zip(prompts, budgets)]
        # Staggered arrivals: later requests join while earlier ones are mid-decode.
        for i, request in enumerate(reqs):
            engine.submit(request, lambda e, i=i: on_event(i, e))
            time.sleep(0.005 * (i % 3))
        for _ in reqs:
            assert done.acquire(timeout=60)
        assert outputs == solo
        assert engine.idle()
    finally:
        engine.shutdown()


def test_l1_http_concurrent_greedy_equals_solo(serve_model_dir):  # noqa: F811
    app, _ = make_app(serve_model_dir, max_concurrency=4)
    with ThreadServer(app) as server:

        def ask(content):
            body = _chat(content, max_tokens=16)
            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
            return r.json()["choices"][0]["message"]["content"]

        solo = [ask(p) for p in PROMPTS]
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(ask, PROMPTS))
        assert together == solo


async def _overload(url: str, seconds: float, concurrency: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60) as client:

        async def worker():
            while time.monotonic() < deadline:
                body = _chat("def alpha", max_tokens=24, stream=True)
                async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    if r.status_code == 200:
                        raw = (await r.aread()).decode()
                        assert raw.endswith("data: [DONE]\n\n")
                    else:
                        await r.aread()
                        assert r.json()["error"]["type"]
                        if r.status_code in (429, 503):
                            assert int(r.headers["retry-after"]) >= 1
                            await asyncio.sleep(0.05)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def test_l2_overload_is_answered_429_never_5xx(serve_model_dir):  # noqa: F811
    app, _ = make_app(serve_model_dir, max_concurrency=2, max_queue=2)
    with ThreadServer(app) as server:
        statuses = asyncio.run(_overload(server.url, seconds=3, concurrency=8))
    assert statuses.get(200, 0) > 0 and statuses.get(429, 0) > 0
    assert not any(status >= 500 for status in statuses), statuses


@pytest.mark.slow
def test_l2_twice_capacity_for_30_seconds(serve_model_dir):  # noqa: F811
    app, _ = make_app(serve_model_dir, max_concurrency=2, max_queue=2)
    with ThreadServer(app) as server:
        statuses = asyncio.run(_overload(server.url, seconds=30, concurrency=8))
    assert statuses.get(200, 0) > 0 and statuses.get(429, 0) > 0
    assert not any(status >= 500 for status in statuses), statuses


def test_l3_abandoned_streams_free_their_slots(serve_model_dir):  # noqa: F811
    app, _ = make_app(serve_model_dir, max_concurrency=4, max_queue=128)
    engine = app.state.server.engine

    async def abandon(url: str, count: int) -> None:
        async with httpx.AsyncClient(timeout=30) as client:

            async def one():
                body = _chat("def alpha", max_tokens=200, stream=True)
                try:
                    async with client.stream("POST", url + "/v1/chat/completions", json=body):
                        await asyncio.sleep(0.5)  # leave without reading to the end
                except httpx.HTTPError:
                    pass

            await asyncio.gather(*(one() for _ in range(count)))

    with ThreadServer(app) as server:
        asyncio.run(abandon(server.url, 100))
        assert wait_until(engine.idle, timeout=5), engine.load()
        start = time.monotonic()
        fresh = httpx.post(server.url + "/v1/chat/completions", json=_chat("hi"), timeout=10)
        assert fresh.status_code == 200
        assert time.monotonic() - start < 5
    # Nothing ran to 200 tokens: every abandoned sequence was dropped early.
    assert engine.tokens_generated < 100 * 200


def test_l4_sigterm_drains_in_flight_streams_and_exits_cleanly(serve_model_dir):  # noqa: F811
    server = start_server(serve_model_dir, None, "--max-concurrency", "4")
    results: list[str] = []
    started = threading.Semaphore(0)

    def stream(i):
        body = _chat(PROMPTS[i], max_tokens=200, stream=True)
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            parts = []
            for part in r.iter_text():
                if not parts:
                    started.release()
                parts.append(part)
            results.append("".join(parts))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=30)  # every stream is decoding
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    code = server.proc.wait(timeout=60)
    assert code == 0, server.output()
    assert len(results) == 4
    for raw in results:
        assert raw.endswith("data: [DONE]\n\n")
        chunks = [json.loads(e[6:]) for e in raw.split("\n\n")[:-2]]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finish[-1] in ("stop", "length")
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)
