"""The feedback store on SQLite and (when FMFORGE_TEST_POSTGRES_URL reaches one) PostgreSQL:
every generation recorded, idempotent retries, N x M concurrent writers, kill -9 durability,
deterministic deduplicated exports."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading

import httpx
from fastapi.testclient import TestClient

from fmforge.flywheel.export import dpo_records, export, sft_records
from fmforge.flywheel.store import FeedbackStore
from test_serve_support import MODEL_NAME, make_app, serve_model_dir, start_server  # noqa: F401


def _generation(gen_id: str, outputs=("a",), messages=None, prompt="p") -> dict:
    return {
        "id": gen_id,
        "endpoint": "chat" if messages else "completion",
        "model": "m",
        "model_version": "v",
        "params": {"temperature": 0},
        "messages": messages,
        "prompt": None if messages else prompt,
        "outputs": list(outputs),
        "finish_reasons": ["stop"] * len(outputs),
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "latency_s": 0.1,
    }


def test_every_generation_returned_is_recorded(db_url, serve_model_dir):  # noqa: F811
    app, store = make_app(serve_model_dir, db_url)
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    completion = {"model": MODEL_NAME, "prompt": "def", "max_tokens": 4}
    returned = {}
    with TestClient(app) as client:
        for path, body in [
            ("/v1/chat/completions", chat),
            ("/v1/chat/completions", {**chat, "n": 2}),
            ("/v1/completions", completion),
        ]:
            out = client.post(path, json=body).json()
            texts = [c.get("text", c.get("message", {}).get("content")) for c in out["choices"]]
            returned[out["id"]] = (texts, out["usage"])
        raw = client.post("/v1/chat/completions", json={**chat, "stream": True}).text
        chunks = [json.loads(e[6:]) for e in raw.split("\n\n")[:-2]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        returned[chunks[0]["id"]] = ([text], None)
        opted_out = client.post("/v1/chat/completions", json={**chat, "store": False}).json()
    for gen_id, (texts, usage) in returned.items():
        row = store.get_generation(gen_id)
        assert row is not None and row["outputs"] == texts
        assert row["model"] == MODEL_NAME and row["model_version"]
        if usage:
            assert row["prompt_tokens"] == usage["prompt_tokens"]
            assert row["completion_tokens"] == usage["completion_tokens"]
    assert store.get_generation(opted_out["id"]) is None
    assert store.counts()["generations"] == len(returned)


def test_retried_feedback_with_same_key_is_stored_once(db_url, serve_model_dir):  # noqa: F811
    app, store = make_app(serve_model_dir, db_url)
    with TestClient(app) as client:
        chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}
        gen_id = client.post("/v1/chat/completions", json={**chat, "max_tokens": 3}).json()["id"]
        body = {"generation_id": gen_id, "kind": "rating", "value": 5, "idempotency_key": "k-1"}
        first = client.post("/v1/feedback", json=body)
        again = client.post("/v1/feedback", json=body)
        assert first.status_code == again.status_code == 200
        assert first.json()["created_now"] and not again.json()["created_now"]
        assert first.json()["id"] == again.json()["id"]
        header = {"Idempotency-Key": "k-2"}
        body = {"generation_id": gen_id, "kind": "thumbs", "value": "up"}
        for _ in range(3):
            assert client.post("/v1/feedback", json=body, headers=header).status_code == 200
        bad = client.post("/v1/feedback", json={**body, "value": "sideways"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "value"
        missing = client.post("/v1/feedback", json={**body, "generation_id": "chatcmpl-nope"})
        assert missing.status_code == 404
    assert store.counts()["feedback"] == 2


def test_n_concurrent_writers_times_m_writes_give_n_m_rows(db_url):
    store = FeedbackStore(db_url)
    store.record_generation(_generation("g-1"))
    writers, writes = 6, 20

    def write(worker: int) -> None:
        own = FeedbackStore(db_url)  # each writer its own connection pool, as separate clients
        for i in range(writes):
            own.add_feedback("g-1", "comment", f"w{worker} #{i}", f"key-{worker}-{i}")
            own.add_feedback("g-1", "comment", f"w{worker} #{i}", f"key-{worker}-{i}")  # retry
        own.close()

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # And two more writer processes at once (SQLite's locking across processes).
    code = (
        "import sys; from fmforge.flywheel.store import FeedbackStore\n"
        "s = FeedbackStore(sys.argv[1]); w = sys.argv[2]\n"
        f"for i in range({writes}): s.add_feedback('g-1', 'comment', 'x', f'proc-{{w}}-{{i}}')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, db_url, str(p)]) for p in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert store.counts()["feedback"] == (writers + 2) * writes


def test_feedback_with_a_2xx_survives_kill_9(db_url, serve_model_dir):  # noqa: F811
    server = start_server(serve_model_dir, db_url)
    try:
        chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}
        url = server.url
        gen = httpx.post(url + "/v1/chat/completions", json={**chat, "max_tokens": 3}, timeout=30)
        gen_id = gen.json()["id"]
        acknowledged = 0
        for i in range(25):
            body = {"generation_id": gen_id, "kind": "comment", "value": f"c{i}"}
            r = httpx.post(url + "/v1/feedback", json=body, timeout=30)
            acknowledged += r.status_code == 200
    finally:
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=30)
    assert acknowledged == 25
    if not db_url.startswith("postgres"):
        with sqlite3.connect(db_url) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = FeedbackStore(db_url)
    assert store.counts() == {"generations": 1, "feedback": 25}


def test_exports_are_deterministic_and_deduplicated(db_url, tmp_path):
    store = FeedbackStore(db_url)
    messages = [{"role": "user", "content": "2+2?"}]
    store.record_generation(_generation("g-1", ["4", "5"], messages))
    store.record_generation(_generation("g-2", ["four"], messages))
    store.record_generation(_generation("g-3", ["bad"], messages))
    store.record_generation(_generation("g-4", ["x"], prompt="def f"))
    store.add_feedback("g-1", "pairwise", {"chosen": 0, "rejected": 1}, "p1")
    store.add_feedback("g-1", "pairwise", {"chosen": 0, "rejected": 1}, "p2")  # same pair again
    store.add_feedback("g-1", "thumbs", "up", "t1")
    store.add_feedback("g-2", "thumbs", "up", "t2")
    store.add_feedback("g-3", "thumbs", "down", "t3")
    store.add_feedback("g-4", "edit", "def f(): pass", "e1")
    store.add_feedback("g-4", "rating", 5, "r1")
    sft = sft_records(store)
    assert {"messages": [*messages, {"role": "assistant", "content": "4"}]} in sft
    assert {"prompt": "def f", "completion": "def f(): pass"} in sft
    assert len(sft) == len({json.dumps(r, sort_keys=True) for r in sft}) == 3
    dpo = dpo_records(store)
    chosen = [
        (r["chosen"][0]["content"] if isinstance(r["chosen"], list) else r["chosen"]) for r in dpo
    ]
    assert sorted(chosen) == ["4", "4", "def f(): pass", "four"]  # 4>5, 4>bad, four>bad, edit>x
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert export(store, "dpo", a) == export(store, "dpo", b) == 4
    assert a.read_bytes() == b.read_bytes()
