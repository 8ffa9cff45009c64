"""The OpenAI API: the official client against a server subprocess, and every bad request of
shared/RELIABILITY.md answered with its 4xx in the OpenAI error shape (then a good request works).
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from fmforge.chat_template import template_for
from fmforge.tokenizer import Tokenizer
from test_serve_support import MODEL_NAME, make_app, serve_model_dir, start_server  # noqa: F401


@pytest.fixture(scope="module")
def server(serve_model_dir, tmp_path_factory):  # noqa: F811
    db = str(tmp_path_factory.mktemp("db") / "feedback.db")
    proc = start_server(serve_model_dir, db)
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def client(serve_model_dir):  # noqa: F811
    app, _ = make_app(serve_model_dir, max_concurrency=2, max_body_bytes=64 * 1024)
    with TestClient(app) as c:
        yield c


def test_openai_client_lists_completes_chats_and_streams(server, serve_model_dir):  # noqa: F811
    import openai

    tokenizer = Tokenizer.load(serve_model_dir)
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in api.models.list()] == [MODEL_NAME]

    completion = api.completions.create(
        model=MODEL_NAME, prompt="def alpha", max_tokens=7, temperature=0
    )
    choice = completion.choices[0]
    assert completion.object == "text_completion" and choice.finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens == len(tokenizer.encode("def alpha"))
    assert completion.usage.completion_tokens == (7 if choice.finish_reason == "length" else 7)
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 7

    messages = [{"role": "user", "content": "return beta"}]
    chat = api.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0
    )
    prompt = template_for(tokenizer).render(tokenizer, messages)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(prompt)
    assert chat.usage.completion_tokens <= 6
    assert chat.system_fingerprint.startswith("fp_")

    stream = api.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content  # greedy: streaming changes nothing
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert all(f is None for f in finals[:-1]) and finals[-1] == chat.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == chat.usage.model_dump()


def test_sse_framing_ends_with_done(server):
    import httpx

    body = {"model": MODEL_NAME, "prompt": "def", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    for event in events[:-2]:
        assert json.loads(event[len("data: ") :])["object"] == "text_completion"


GOOD_CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
GOOD_COMPLETION = {"model": MODEL_NAME, "prompt": "def", "max_tokens": 2}
USER = [{"role": "user", "content": "hi"}]


def _chat(**changes):
    body = dict(GOOD_CHAT, **changes)
    return {k: v for k, v in body.items() if v is not _DROP}


def _completion(**changes):
    body = dict(GOOD_COMPLETION, **changes)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()

JSON = {"content-type": "application/json"}
CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"

# (path, raw body bytes or a JSON-able body, headers, expected status)
BAD_REQUESTS = [
    (CHAT, b"{not json", JSON, 400),
    (CHAT, b'"a string"', JSON, 400),
    (CHAT, b"[1, 2]", JSON, 400),
    (CHAT, b"42", JSON, 400),
    (CHAT, b"null", JSON, 400),
    (CHAT, json.dumps(GOOD_CHAT).encode(), {"content-type": "text/plain"}, 400),
    (CHAT, b"", JSON, 400),
    (CHAT, b'{"model": "' + b"x" * 70_000 + b'"}', JSON, 413),
    (CHAT, _chat(model=_DROP), None, 404),
    (CHAT, _chat(model="no-such-model"), None, 404),
    (CHAT, _chat(model="../../etc/passwd"), None, 404),
    (CHAT, _chat(model="..%2F..%2Fetc%2Fpasswd"), None, 404),
    (CHAT, _chat(messages=_DROP), None, 400),
    (CHAT, _chat(messages=[]), None, 400),
    (CHAT, _chat(messages="hi"), None, 400),
    (CHAT, _chat(messages=[123]), None, 400),
    (CHAT, _chat(messages=[{}]), None, 400),
    (CHAT, _chat(messages=[{"role": "wizard", "content": "hi"}]), None, 400),
    (CHAT, _chat(messages=[{"role": "user", "content": 5}]), None, 400),
    (CHAT, _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), None, 400),
    (COMPLETIONS, _completion(prompt=""), None, 400),
    (COMPLETIONS, _completion(prompt=[[]]), None, 400),
    (COMPLETIONS, _completion(prompt=[-1]), None, 400),
    (COMPLETIONS, _completion(prompt=[10**6]), None, 400),
    (CHAT, _chat(max_tokens=0), None, 400),
    (CHAT, _chat(max_tokens=-1), None, 400),
    (CHAT, _chat(max_tokens=1.5), None, 400),
    (CHAT, _chat(max_tokens="10"), None, 400),
    (CHAT, _chat(max_tokens=True), None, 400),
    (CHAT, _chat(max_tokens=2**63), None, 400),
    (CHAT, _chat(temperature=-0.01), None, 400),
    (CHAT, _chat(temperature=2.01), None, 400),
    (
        CHAT,
        b'{"model": "tiny-serve", "messages": [{"role": "user", "content": "hi"}], '
        b'"temperature": NaN}',
        JSON,
        400,
    ),
    (CHAT, _chat(top_p=0), None, 400),
    (CHAT, _chat(top_p=1.01), None, 400),
    (CHAT, _chat(n=0), None, 400),
    (CHAT, _chat(n=9), None, 400),
    (CHAT, _chat(stop=["a", "b", "c", "d", "e"]), None, 400),
    (CHAT, _chat(stop=""), None, 400),
    (CHAT, _chat(logit_bias={"x": 1}), None, 400),
    (CHAT, _chat(logit_bias={"999999": 1}), None, 400),
    (CHAT, _chat(logit_bias={"1": 101}), None, 400),
    (CHAT, _chat(top_logprobs=21, logprobs=True), None, 400),
    (CHAT, _chat(top_logprobs=2), None, 400),
    (CHAT, _chat(stream_options={"include_usage": True}), None, 400),
    (
        CHAT,
        b'{"model": "tiny-serve", "messages": [{"role": "user", "content": "\\ud800"}]}',
        JSON,
        400,
    ),
    (CHAT, _chat(messages=[{"role": "user", "content": "a\u0000b"}]), None, 400),
    (COMPLETIONS, _completion(logprobs=6), None, 400),
    (COMPLETIONS, _completion(presence_penalty=2.5), None, 400),
    (EMBEDDINGS, {"model": MODEL_NAME, "input": ""}, None, 400),
    (EMBEDDINGS, {"model": MODEL_NAME, "input": []}, None, 400),
    (EMBEDDINGS, {"model": MODEL_NAME, "input": ["x"] * 300}, None, 400),
    (EMBEDDINGS, {"model": MODEL_NAME, "input": "fine"}, None, 400),  # decoder: no embeddings
    ("/v1/models/..%2F..%2Fetc%2Fpasswd", None, None, 404),
    ("/v1/no-such-route", {}, None, 404),
    ("/playground/../../../etc/passwd", None, None, 404),
]


def _send(client, path, body, headers):
    if body is None:
        return client.get(path)
    if isinstance(body, bytes):
        return client.post(path, content=body, headers=headers)
    return client.post(path, json=body)


@pytest.mark.parametrize("index", range(len(BAD_REQUESTS)))
def test_bad_request_gets_its_4xx_then_a_good_request_works(client, index):
    path, body, headers, status = BAD_REQUESTS[index]
    response = _send(client, path, body, headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if status in (400, 404, 413):
        assert error["type"] == "invalid_request_error"
    if status == 404 and path == CHAT:
        assert error["code"] == "model_not_found"
    good = client.post(CHAT, json=GOOD_CHAT)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"


def test_context_overflow_by_one_token_gets_openai_message(client, serve_model_dir):  # noqa: F811
    tokenizer = Tokenizer.load(serve_model_dir)
    context = 256
    prompt = tokenizer.encode("def alpha_1(beta):")
    room = context - len(prompt)
    ok = client.post(COMPLETIONS, json=_completion(prompt=prompt, max_tokens=room))
    assert ok.status_code == 200
    over = client.post(COMPLETIONS, json=_completion(prompt=prompt, max_tokens=room + 1))
    assert over.status_code == 400
    error = over.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["message"] == (
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{context + 1} tokens ({len(prompt)} in the messages, {room + 1} in the completion). "
        "Please reduce the length of the messages or completion."
    )


def test_stop_strings_are_cut_and_logprobs_returned(client):
    base = client.post(COMPLETIONS, json=_completion(max_tokens=12, temperature=0)).json()
    text = base["choices"][0]["text"]
    if len(text) >= 3:
        stop = text[1:3]
        cut = client.post(
            COMPLETIONS, json=_completion(max_tokens=12, temperature=0, stop=stop)
        ).json()
        assert cut["choices"][0]["text"] == text[: text.index(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"
    chat = client.post(CHAT, json=_chat(logprobs=True, top_logprobs=2, temperature=0)).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2 for c in content)


def test_n_choices_and_token_prompts(client):
    body = _completion(prompt=[[5, 6, 7], [8, 9]], n=2, max_tokens=3, temperature=0)
    out = client.post(COMPLETIONS, json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["prompt_tokens"] == 5
    assert out["choices"][0]["text"] == out["choices"][1]["text"]  # greedy


def test_models_health_ready_and_playground(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL_NAME
    assert client.get(f"/v1/models/{MODEL_NAME}").status_code == 200
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    assert client.get("/metrics").status_code == 404  # opt-in
    page = client.get("/")
    assert page.status_code == 200 and "fmforge playground" in page.text
    assert ".innerHTML" not in client.get("/playground/app.js").text
