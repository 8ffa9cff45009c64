"""Hot swap under load: streaming clients keep a registry-following server busy while an admin
promotes and rolls back a LoRA version of SmolLM2-135M-Instruct (docs/serving-versions.md).

It builds a registry in a temp dir (v0 = the built-in base, v1 = a random-init LoRA adapter over
it, q/v projections, r 8), starts `fmforge serve --db DB --api-key-file KEY` in a subprocess,
runs `--streams` clients that each send streaming chat completions back to back (greedy,
`--max-tokens`), and after every `--interval` seconds promotes v1 or rolls back, `--swaps` times.

It reports: requests, failures (non-200, an in-band error, or no `[DONE]`), 5xx, requests per
version, how long each admin call took (loading the version included), the streams in flight at
each switch and whether each finished on the version it started with (every stream that started
after a switch must run on the new version), whether every logged row names the version its
response header named, and the gaps between stream chunks outside and during swaps (a swap loads
a model in a worker thread of the same process, competing for the CPU with decoding).

    .venv/bin/python bench/serve_hotswap.py [--streams 8] [--swaps 4] [--interval 8] [--out F]

Lines: `hotswap_failed=`, `hotswap_5xx=`, `hotswap_version_errors=`, `hotswap_rows_mismatch=`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

BASE = "smollm2-135m-instruct"
KEY = "sk-hotswap-bench"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "What is 2+2?",
    "Say hello.",
    "What is a cat?",
    "Count to five.",
    "What is water made of?",
    "Who wrote Hamlet?",
]


def build_registry(work: Path) -> str:
    """Register v0 (the base) and v1 (a random LoRA adapter over it); return the DB path."""
    import torch

    from fmforge.adapt.lora import apply_lora, base_fingerprint, save_lora_adapter
    from fmforge.flywheel.registry import Registry
    from fmforge.model.load import load_bundle

    bundle = load_bundle(BASE, kind="decoder")
    fingerprint = base_fingerprint(bundle.model, bundle.tokenizer)
    apply_lora(bundle.model, ("q_proj", "v_proj"), r=8, alpha=16.0)
    torch.manual_seed(0)
    for name, param in bundle.model.named_parameters():
        if ".lora_B" in name:
            param.data.normal_(0, 0.02)
    save_lora_adapter(bundle.model, work / "adapter", BASE, fingerprint)
    db = str(work / "flywheel.db")
    registry = Registry(db)
    registry.ensure_base(BASE, BASE)
    registry.register(
        base=BASE, path=str(work / "adapter"), kind="lora", parent="v0", dataset_id="bench"
    )
    registry.close()
    return db


def start_server(db: str, key_file: Path, streams: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "fmforge.cli", "serve", "--db", db, "--port", str(port)]
    args += ["--api-key-file", str(key_file), "--max-concurrency", str(streams)]
    args += ["--log-level", "warning", "--poll-registry", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{proc.stdout.read()}")


def stream_once(url: str, model: str, question: str, max_tokens: int) -> dict:
    """Run one streaming chat completion; return its timings, status, version and errors."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    out = {"start": time.monotonic(), "status": None, "version": None, "id": None, "error": None}
    times: list[float] = []
    try:
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=300
        ) as r:
            out["status"], out["version"] = r.status_code, r.headers.get("x-model-version")
            buffer, last = "", ""
            for part in r.iter_text():
                buffer += part
                while "\n\n" in buffer:
                    event, buffer = buffer.split("\n\n", 1)
                    times.append(time.monotonic())
                    last = event
                    if event == "data: [DONE]":
                        continue
                    chunk = json.loads(event.removeprefix("data: "))
                    if "error" in chunk:
                        out["error"] = chunk["error"]
                    out["id"] = chunk.get("id", out["id"])
            if last != "data: [DONE]" and out["error"] is None:
                out["error"] = "the stream ended without [DONE]"
    except Exception as e:  # a dropped connection is a failure to report, not to raise
        out["error"] = repr(e)
    out["end"] = time.monotonic()
    out["chunk_times"] = times
    return out


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=4)
    parser.add_argument("--interval", type=float, default=8.0, help="seconds between swaps")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fmforge-hotswap-"))
    key_file = work / "key.txt"
    key_file.write_text(KEY)
    db = build_registry(work)
    proc, url = start_server(db, key_file, args.streams)
    model = httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]["id"]
    records: list[dict] = []
    lock, stop = threading.Lock(), threading.Event()

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            result = stream_once(url, model, QUESTIONS[(i + n) % len(QUESTIONS)], args.max_tokens)
            n += 1
            with lock:
                records.append(result)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.streams)]
    for t in threads:
        t.start()
    swaps = []  # (action, status, version it switched to, t0, t1)
    try:
        for k in range(args.swaps):
            time.sleep(args.interval)
            t0 = time.monotonic()
            if k % 2 == 0:
                r = httpx.post(
                    url + "/admin/promote", json={"version": "v1"}, headers=AUTH, timeout=600
                )
            else:
                r = httpx.post(url + "/admin/rollback", headers=AUTH, timeout=600)
            swaps.append(
                (
                    "promote" if k % 2 == 0 else "rollback",
                    r.status_code,
                    r.json().get("version"),
                    t0,
                    time.monotonic(),
                )
            )
        time.sleep(args.interval)
    finally:
        stop.set()
        for t in threads:
            t.join()
        proc.terminate()
        proc.wait(120)

    from fmforge.flywheel.store import FeedbackStore

    store = FeedbackStore(db)
    rows = {g["id"]: g["model_version"] for g in store.list_generations()}
    store.close()
    shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in records if r["status"] != 200 or r["error"] is not None]
    served = ["v0"] + [version for (_, _, version, _, _) in swaps]
    in_flight, version_errors = 0, []
    for k, (_, _, version, t0, t1) in enumerate(swaps):
        following = swaps[k + 1][3] if k + 1 < len(swaps) else float("inf")
        for r in records:
            if r["start"] < t1 and r["end"] > t1:  # in flight when the swap answered
                in_flight += 1
                if r["start"] < t0 and r["version"] != served[k]:  # admitted before the swap
                    version_errors.append(("in flight", k, r["version"]))
            if t1 < r["start"] < following and r["version"] != version:
                version_errors.append(("after the switch", k, r["version"]))
    windows = [(t0, t1 + 0.5) for (_, _, _, t0, t1) in swaps]
    inside, outside = [], []
    for r in records:
        times = r["chunk_times"]
        for a, b in zip(times, times[1:]):
            (inside if any(lo <= a <= hi for lo, hi in windows) else outside).append(b - a)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 1)

    report = {
        "model": BASE,
        "streams": args.streams,
        "requests": len(records),
        "failed": len(failed),
        "5xx": sum(1 for r in records if (r["status"] or 0) >= 500),
        "by_version": {v: sum(1 for r in records if r["version"] == v) for v in ("v0", "v1")},
        "swaps": [
            {"action": a, "status": s, "version": v, "seconds": round(t1 - t0, 2)}
            for (a, s, v, t0, t1) in swaps
        ],
        "streams_in_flight_at_a_switch": in_flight,
        "version_errors": version_errors,
        "rows_missing": sum(1 for r in records if r["id"] not in rows),
        "rows_mismatch": sum(
            1 for r in records if r["id"] in rows and rows[r["id"]] != r["version"]
        ),
        "chunk_gap_ms": {
            "outside_swaps": {
                "p50": ms(quantile(outside, 0.5)),
                "p99": ms(quantile(outside, 0.99)),
            },
            "during_swaps": {"p50": ms(quantile(inside, 0.5)), "p99": ms(quantile(inside, 0.99))},
        },
        "failures": [{k: r[k] for k in ("status", "version", "error")} for r in failed[:5]],
    }
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"hotswap_failed={report['failed']}")
    print(f"hotswap_5xx={report['5xx']}")
    print(f"hotswap_version_errors={len(version_errors)}")
    print(f"hotswap_rows_mismatch={report['rows_mismatch']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
