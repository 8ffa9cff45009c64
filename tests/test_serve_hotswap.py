"""Hot swap of model versions in a running server (issue #15, acceptance 3 and parts of 8).

Two tiny random models are the registry's v0 (base) and v1 (a "full" version). While 8 streams
decode on v0, an admin promotes v1 and then rolls back: no request fails, nothing answers 5xx, the
8 streams finish on v0 (their header, their logged rows and their tokens say so), the requests in
between run on v1, and every logged row names the version that produced it. The streams are held
in flight by pausing v0's engine thread between two scheduler steps, so the test does not depend
on timing.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from fmforge.generate.engine import chat_prompt, stop_ids_of
from fmforge.tokenizer import Tokenizer
from polling import wait_until
from test_serve_support import MODEL_NAME, ThreadServer, serve_model_dir  # noqa: F401

KEY = "sk-admin-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
STREAMS = 8
STREAM_TOKENS = 40
PROMPTS = [
    "def alpha_1(beta):",
    "return",
    "gamma delta value count",
    "x",
    "def count_3(index):\n    return index + 4",
    "# total",
    "item and more",
    "beta",
]


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory, serve_model_dir) -> Path:  # noqa: F811
    """Another tiny random model with the same tokenizer: the registry's v1."""
    from fmforge.model.config import preset_config
    from fmforge.model.llama import LlamaForCausalLM
    from fmforge.model.load import save_model_dir

    tokenizer = Tokenizer.load(serve_model_dir)
    torch.manual_seed(1)
    # Untied, so its greedy answers differ from v0's (a tied random model echoes its input).
    config = preset_config("tiny", vocab_size=tokenizer.vocab_size, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("hotswap") / "v1"
    save_model_dir(model, tokenizer, out)
    return out


def _registry(db: Path | str, v0_dir: Path, v1_dir: Path):
    from fmforge.flywheel.registry import Registry

    registry = Registry(str(db))
    registry.ensure_base(str(v0_dir), str(v0_dir))
    registry.register(
        base=str(v0_dir),
        path=str(v1_dir),
        kind="full",
        parent="v0",
        dataset_id="sha256:test",
        gate={"decision": "promote", "by": "test", "metrics": {"win_rate": 0.7}},
    )
    return registry


def _app(registry, api_key: str | None = KEY, poll_s: float = 0.0, **settings):
    from fmforge.flywheel.registry import load_version
    from fmforge.serve.app import Settings, create_app

    serving = registry.serving()
    config = Settings(
        model_name=MODEL_NAME,
        api_key=api_key,
        max_concurrency=STREAMS,
        max_queue=32,
        poll_registry_s=poll_s,
        **settings,
    )
    loaded = load_version(serving)
    return create_app(loaded, config, registry.store, registry=registry, version=serving.id)


def _no_stop_bias(tokenizer, chat: bool) -> dict[str, float]:
    # Ban every stop token, so each stream runs exactly STREAM_TOKENS tokens ("length").
    messages = [{"role": "user", "content": "x"}]
    ids = chat_prompt(tokenizer, messages)[1] if chat else stop_ids_of(tokenizer)
    return {str(i): -100.0 for i in ids}


def _body(i: int, tokenizer, stream: bool) -> tuple[str, dict]:
    chat = i % 2 == 0
    body = {
        "model": MODEL_NAME,
        "max_tokens": STREAM_TOKENS,
        "temperature": 0,
        "logit_bias": _no_stop_bias(tokenizer, chat),
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        return "/v1/chat/completions", {
            **body,
            "messages": [{"role": "user", "content": PROMPTS[i]}],
        }
    return "/v1/completions", {**body, "prompt": PROMPTS[i]}


def _text(choice: dict) -> str:
    return (
        choice.get("text")
        or (choice.get("delta") or choice.get("message") or {}).get("content")
        or ""
    )


def _hold_after_first_tokens(engine, count: int):
    """Make `engine`'s thread start only once `count` requests have arrived (so they decode
    together however slowly the clients connect), then pause it between two steps once each of
    them has a token, until `release` is set: they are in flight for as long as the test needs."""
    scheduler = engine.scheduler
    original = scheduler.step
    held, release = threading.Event(), threading.Event()

    def step() -> None:
        if not release.is_set():
            wait_until(lambda: sum(scheduler.load().values()) >= count, timeout=60)
        original()
        active = scheduler.active
        if not release.is_set() and len(active) == count:
            if all(seq.completion_tokens >= 1 for seq in active):
                held.set()
                release.wait(timeout=120)

    scheduler.step = step
    return held, release


def test_promote_then_rollback_under_8_streams(serve_model_dir, v1_dir, db_url):  # noqa: F811
    registry = _registry(db_url, serve_model_dir, v1_dir)
    app = _app(registry)
    server_state = app.state.server
    tokenizer = Tokenizer.load(serve_model_dir)
    held, release = _hold_after_first_tokens(server_state.engine, STREAMS)
    results: list[dict] = [{} for _ in range(STREAMS)]
    statuses: list[int] = []

    with ThreadServer(app) as server:

        def stream(i: int) -> None:
            path, body = _body(i, tokenizer, stream=True)
            out = results[i]
            with httpx.stream("POST", server.url + path, json=body, headers=AUTH, timeout=120) as r:
                out["status"], out["version"] = r.status_code, r.headers.get("x-model-version")
                events = [e for e in r.read().decode().split("\n\n") if e]
            out["done"] = events[-1] == "data: [DONE]"
            chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
            out["errors"] = [c for c in chunks if "error" in c]
            out["ids"] = {c.get("id") for c in chunks}
            out["fingerprints"] = {c.get("system_fingerprint") for c in chunks}
            out["text"] = "".join(_text(c["choices"][0]) for c in chunks if c.get("choices"))
            out["finish"] = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
            out["usage"] = [c["usage"] for c in chunks if c.get("usage")]

        def request(i: int) -> httpx.Response:
            path, body = _body(i, tokenizer, stream=False)
            response = httpx.post(server.url + path, json=body, headers=AUTH, timeout=60)
            statuses.append(response.status_code)
            return response

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        try:
            assert held.wait(timeout=60), ("the 8 streams never all decoded on v0", results)

            promoted = httpx.post(
                server.url + "/admin/promote", json={"version": "v1"}, headers=AUTH, timeout=60
            )
            assert promoted.status_code == 200, promoted.text
            assert promoted.json() == {
                "object": "serving",
                "version": "v1",
                "previous": "v0",
                "changed": True,
            }
            on_v1 = [request(i) for i in range(4)]
            rolled = httpx.post(server.url + "/admin/rollback", headers=AUTH, timeout=60)
            assert rolled.status_code == 200, rolled.text
            assert (rolled.json()["version"], rolled.json()["previous"]) == ("v0", "v1")
            on_v0_again = [request(i) for i in range(4)]
            # The 8 streams are still in flight on the first v0 engine, across both swaps.
            assert not any(r.get("done") for r in results)
            versions = httpx.get(server.url + "/admin/versions", headers=AUTH, timeout=30).json()
            assert versions["serving"]["version"] == "v0"
            assert versions["serving"]["in_flight"]["v0"] >= STREAMS
        finally:
            release.set()  # also when an assertion failed: no stream is left hanging
        for t in threads:
            t.join(timeout=120)
        # After the streams end, the retired engines (first v0, then v1) are released.
        assert wait_until(lambda: not server_state.serving.retiring, timeout=30)
        solo_v0 = [request(i) for i in range(STREAMS)]

    # 0 failed requests, 0 5xx.
    assert [r["status"] for r in results] == [200] * STREAMS
    assert statuses == [200] * len(statuses) and len(statuses) == 4 + 4 + STREAMS
    assert not any(status >= 500 for (_, status) in server_state.requests)
    for i, r in enumerate(results):
        assert r["done"] and not r["errors"], (i, r)
        assert r["finish"][-1] == "length", (i, r["finish"])
        assert r["usage"][-1]["completion_tokens"] == STREAM_TOKENS
        assert len(r["ids"]) == 1 and len(r["fingerprints"]) == 1
        # They started on v0 and finished there: the header, and v0's own greedy tokens.
        assert r["version"] == "v0"
        assert r["text"] == _text(solo_v0[i].json()["choices"][0]), i
    for response in on_v1:
        assert response.headers["x-model-version"] == "v1"
    for response in on_v0_again + solo_v0:
        assert response.headers["x-model-version"] == "v0"
    # The test could tell the versions apart: v1 answers differently from v0.
    assert any(
        _text(a.json()["choices"][0]) != _text(b.json()["choices"][0])
        for a, b in zip(on_v1, solo_v0)
    )
    fingerprints = {r["fingerprints"].pop() for r in results}
    assert len(fingerprints) == 1
    assert on_v1[0].json()["system_fingerprint"] not in fingerprints

    # Every logged row names the version that produced it.
    rows = {row["id"]: row["model_version"] for row in registry.store.list_generations()}
    expected = {r["ids"].pop(): "v0" for r in results}
    expected |= {resp.json()["id"]: "v1" for resp in on_v1}
    expected |= {resp.json()["id"]: "v0" for resp in on_v0_again + solo_v0}
    assert rows == expected
    history = [(e["version"], e["action"], e["by"]) for e in registry.history()]
    assert history == [
        ("v0", "promote", "ensure_base"),
        ("v1", "promote", "admin-api"),
        ("v0", "rollback", "admin-api"),
    ]


def test_polling_follows_promotions_made_elsewhere(serve_model_dir, v1_dir, db_url):  # noqa: F811
    from fmforge.flywheel.registry import Registry

    db = db_url
    registry = _registry(db, serve_model_dir, v1_dir)
    app = _app(registry, poll_s=0.02, metrics=True)
    other = Registry(str(db))  # another process's handle, as `fmforge flywheel promote` holds
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with TestClient(app, headers=AUTH) as client:

        def serving() -> str:
            return client.get("/admin/versions").json()["serving"]["version"]

        first = client.post("/v1/chat/completions", json=chat)
        assert first.headers["x-model-version"] == "v0"
        feedback = {"generation_id": first.json()["id"], "kind": "thumbs", "value": "up"}
        assert client.post("/v1/feedback", json=feedback).status_code == 200
        other.promote("v1", by="cli")
        assert wait_until(lambda: serving() == "v1", timeout=30)
        second = client.post("/v1/chat/completions", json=chat)
        assert second.headers["x-model-version"] == "v1"
        metrics = client.get("/metrics").text
        assert 'fmforge_serving_version_info{version="v1"} 1' in metrics
        # Counters keep counting across versions: both answers' tokens are in the total.
        tokens = sum(r.json()["usage"]["completion_tokens"] for r in (first, second))
        assert f"fmforge_generated_tokens_total {tokens}\n" in metrics
        report = client.get("/admin/versions").json()
        # Feedback counts since v1 was promoted: the thumbs-up was on v0, before it.
        assert report["serving"]["feedback_since"] == {}
        assert report["serving"]["generations_since"] == 1
        assert [v["id"] for v in report["versions"]] == ["v1", "v0"]
        assert report["versions"][0]["gate"]["metrics"] == {"win_rate": 0.7}
        assert [e["version"] for e in report["history"]] == ["v0", "v1"]
        other.rollback(by="cli")
        assert wait_until(lambda: serving() == "v0", timeout=30)
        third = client.post("/v1/chat/completions", json=chat)
        assert third.headers["x-model-version"] == "v0"
        # A promoted version that does not load: the server keeps v0 and says why.
        broken = other.register(base="v0-base", path="/nonexistent/model", kind="full")
        other.promote(broken.id, by="cli")

        def report_error() -> str | None:
            return client.get("/admin/versions").json()["serving"]["load_error"]

        assert wait_until(lambda: report_error() is not None, timeout=30)
        assert broken.id in report_error() and serving() == "v0"
        status = client.get("/admin/versions").json()["serving"]
        assert status["registry_version"] == broken.id
    rows = {r["id"]: r["model_version"] for r in registry.store.list_generations()}
    assert rows == {
        first.json()["id"]: "v0",
        second.json()["id"]: "v1",
        third.json()["id"]: "v0",
    }


def test_a_lora_version_is_merged_into_its_base_and_served(
    serve_model_dir,  # noqa: F811
    v1_dir,
    tmp_path,
):
    from fmforge.adapt.lora import apply_lora, base_fingerprint, save_lora_adapter
    from fmforge.model.load import load_bundle

    registry = _registry(tmp_path / "flywheel.db", serve_model_dir, v1_dir)
    base = load_bundle(str(serve_model_dir), kind="decoder")
    fingerprint = base_fingerprint(base.model, base.tokenizer)
    apply_lora(base.model, ("q_proj", "v_proj", "o_proj"), r=4, alpha=8.0)
    torch.manual_seed(2)
    for name, p in base.model.named_parameters():
        if ".lora_B" in name:
            p.data.normal_(0, 0.5)
    save_lora_adapter(base.model, tmp_path / "adapter", str(serve_model_dir), fingerprint)
    lora = registry.register(
        base=str(serve_model_dir),
        path=str(tmp_path / "adapter"),
        kind="lora",
        parent="v0",
        dataset_id="sha256:lora",
    )
    app = _app(registry)
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with TestClient(app, headers=AUTH) as client:
        before = app.state.server.loaded.model.state_dict()
        r = client.post("/admin/promote", json={"version": lora.id})
        assert r.status_code == 200 and r.json()["version"] == lora.id
        after = app.state.server.loaded.model.state_dict()
        answer = client.post("/v1/chat/completions", json=chat)
        assert answer.headers["x-model-version"] == lora.id
    # Merged: the adapted projections moved, the rest of the base did not, no LoRA layers left.
    assert set(after) == set(before)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    adapted = ("q_proj.weight", "v_proj.weight", "o_proj.weight")
    assert moved == {k for k in before if k.endswith(adapted)} and len(moved) == 3 * 2
    row = registry.store.get_generation(answer.json()["id"])
    assert row["model_version"] == lora.id


def test_admin_errors_change_nothing(serve_model_dir, v1_dir, tmp_path):  # noqa: F811
    registry = _registry(tmp_path / "flywheel.db", serve_model_dir, v1_dir)
    broken = registry.register(
        base=str(serve_model_dir), path=str(tmp_path / "gone"), kind="full", parent="v0"
    )
    app = _app(registry)
    before = registry.history()
    with TestClient(app) as client:
        for method, path in [
            ("POST", "/admin/promote"),
            ("POST", "/admin/rollback"),
            ("GET", "/admin/versions"),
        ]:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = client.request(method, path, json={"version": "v1"}, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"

        def error(response, status: int, code: str) -> str:
            assert response.status_code == status, response.text
            body = response.json()["error"]
            assert body["code"] == code and body["type"]
            return body["message"]

        unknown = client.post("/admin/promote", json={"version": "v9"}, headers=AUTH)
        assert "v9" in error(unknown, 404, "version_not_found")
        not_loadable = client.post("/admin/promote", json={"version": broken.id}, headers=AUTH)
        assert broken.id in error(not_loadable, 400, "version_load_failed")
        nothing_earlier = client.post("/admin/rollback", headers=AUTH)
        error(nothing_earlier, 400, "nothing_to_roll_back")
        for bad in ({}, {"version": 1}, {"version": "v1", "by": "me"}):
            r = client.post("/admin/promote", json=bad, headers=AUTH)
            assert r.status_code == 400, bad
        # Nothing half-switched: the registry and the server still serve v0.
        assert registry.history() == before
        versions = client.get("/admin/versions", headers=AUTH).json()
        assert versions["serving"]["version"] == "v0"
        assert not app.state.server.serving.retiring
        chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}
        ok = client.post("/v1/chat/completions", json={**chat, "max_tokens": 3}, headers=AUTH)
        assert ok.status_code == 200 and ok.headers["x-model-version"] == "v0"


def test_admin_needs_a_key_and_a_registry(serve_model_dir, v1_dir, tmp_path):  # noqa: F811
    from test_serve_support import make_app

    registry = _registry(tmp_path / "flywheel.db", serve_model_dir, v1_dir)
    with TestClient(_app(registry, api_key=None)) as client:
        r = client.post("/admin/promote", json={"version": "v1"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
        assert client.get("/admin/versions").json()["serving"]["version"] == "v0"
    assert registry.serving().id == "v0"
    app, _ = make_app(serve_model_dir, api_key=KEY)
    with TestClient(app, headers=AUTH) as client:
        r = client.post("/admin/promote", json={"version": "v1"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_registry"
        report = client.get("/admin/versions").json()
        assert report["registry"] is False and report["versions"] == []
        assert report["serving"]["version"] == app.state.server.version  # the fingerprint


def test_serve_cli_follows_the_registry_it_registered_v0_in(
    serve_model_dir,  # noqa: F811
    v1_dir,
    tmp_path,
):
    from fmforge.cli import main
    from fmforge.flywheel.registry import Registry
    from test_serve_support import start_server

    db = str(tmp_path / "flywheel.db")
    assert main(["serve", "--db", db, "--port", "0"]) == 2  # an empty registry needs MODEL
    server = start_server(serve_model_dir, db, "--poll-registry", "0.05")
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

    def version() -> str:
        r = httpx.post(server.url + "/v1/chat/completions", json=chat, timeout=30)
        assert r.status_code == 200
        return r.headers["x-model-version"]

    try:
        assert version() == "v0"
        registry = Registry(db)  # as `fmforge flywheel cycle` and `promote` write it
        assert registry.get("v0").path == str(Path(serve_model_dir).resolve())
        registry.register(base=registry.get("v0").base, path=str(v1_dir), kind="full", parent="v0")
        registry.promote("v1", by="cli")
        assert wait_until(lambda: version() == "v1", timeout=30, interval=0.05)
    finally:
        assert server.stop() == 0
    rows = [g["model_version"] for g in registry.store.list_generations()]
    assert set(rows) == {"v0", "v1"} and rows[0] == "v1"  # newest first


def test_playground_shows_the_serving_version_and_its_history(
    serve_model_dir,  # noqa: F811
    v1_dir,
    tmp_path,
):
    import os
    import shutil

    playwright = pytest.importorskip("playwright.sync_api")
    from test_playground import CHROMIUM, FLAGS

    if not os.path.exists(CHROMIUM) and not shutil.which("chromium"):
        pytest.skip("Debian's chromium is not installed")
    registry = _registry(tmp_path / "flywheel.db", serve_model_dir, v1_dir)
    markup = registry.register(
        base=str(serve_model_dir),
        path=str(v1_dir),
        kind="full",
        parent="v1",
        gate={"decision": "reject", "by": "<b>gate</b>", "metrics": {"<i>m</i>": 0.25}},
        status="rejected",
    )
    app = _app(registry)
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

    def panel(page) -> str:
        page.dispatch_event("#api_key", "change")  # refreshes the panel now
        return page.inner_text("#serving")

    with ThreadServer(app) as server, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#api_key", KEY)
            assert wait_until(lambda: "Serving v0" in panel(page), timeout=30)
            assert "none yet" in page.inner_text("#serving")
            httpx.post(server.url + "/admin/promote", json={"version": "v1"}, headers=AUTH)
            answer = httpx.post(server.url + "/v1/chat/completions", json=chat, headers=AUTH)
            feedback = {"generation_id": answer.json()["id"], "kind": "thumbs", "value": "up"}
            httpx.post(server.url + "/v1/feedback", json=feedback, headers=AUTH)
            assert wait_until(lambda: "1 thumbs" in panel(page), timeout=30)
            assert "Serving v1" in page.inner_text("#serving")
            assert page.inner_text("#model-version") == "version v1"
            rows = page.locator("#version-table tbody tr")
            assert rows.count() == 3
            assert page.inner_text("#version-table tr.serving td") == "v1"
            table = page.inner_text("#version-table")
            assert "promote by test" in table and "win_rate=0.7" in table
            assert f"{markup.id}\tv1\trejected\treject by <b>gate</b>\t<i>m</i>=0.25" in table
            assert page.locator("#version-table b, #version-table i").count() == 0  # text only
            history = page.locator("#version-history li")
            assert history.count() == 2 and "promote v1 by admin-api" in history.first.inner_text()
            page.screenshot(path=str(tmp_path / "versions.png"), full_page=True)
        finally:
            browser.close()
    if os.environ.get("FMFORGE_SCREENSHOT"):
        shutil.copy(tmp_path / "versions.png", os.environ["FMFORGE_SCREENSHOT"])
