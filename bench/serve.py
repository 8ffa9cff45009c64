"""Serving benchmark: continuous batching at 1, 4 and 8 concurrent streams on 127.0.0.1.

Starts `fmforge serve` (the `small` preset, random weights, a tokenizer trained in-process) in a
subprocess, then drives streaming chat completions of a fixed length (EOS is suppressed with
logit_bias so every answer has exactly --max-tokens tokens). For each concurrency it reports time
to first token (TTFT), time per output token (TPOT), end-to-end latency p50/p95, aggregate output
tokens/s and failures, as the median over repeats that alternate the levels. The last line is
`ratio=X`: aggregate tokens/s at 8 streams / at 1 stream (the peer is fmforge at concurrency 1).

    .venv/bin/python bench/serve.py [--repeats 5] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

LEVELS = (1, 4, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(out: str) -> None:
    """Write a `small`-preset model with random weights and an in-process tokenizer to `out`."""
    import torch

    from fmforge.model.config import preset_config
    from fmforge.model.llama import LlamaForCausalLM
    from fmforge.model.load import save_model_dir
    from fmforge.tokenizer import train_tokenizer

    words = "alpha beta gamma delta value count index total item return def class".split()
    texts = [" ".join(words[(i * k) % len(words)] for k in range(1, 12)) for i in range(2000)]
    tokenizer = train_tokenizer(texts, vocab_size=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset_config("small", vocab_size=tokenizer.vocab_size))
    save_model_dir(model, tokenizer, out)


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content") is not None:
                    if first is None and chunk["choices"][0]["delta"].get("role") is None:
                        first = time.perf_counter()
    except httpx.HTTPError:
        return {"ok": False}
    end = time.perf_counter()
    first = first or end
    return {
        "ok": tokens > 0,
        "ttft": first - start,
        "tpot": (end - first) / max(tokens - 1, 1),
        "e2e": end - start,
        "tokens": tokens,
    }


async def run_level(url: str, concurrency: int, body: dict, rounds: int) -> dict:
    """Run `concurrency` workers, each sending `rounds` requests back to back."""
    async with httpx.AsyncClient(timeout=300) as client:

        async def worker():
            return [await _one(client, url, body) for _ in range(rounds)]

        start = time.perf_counter()
        results = [
            r for rs in await asyncio.gather(*(worker() for _ in range(concurrency))) for r in rs
        ]
        wall = time.perf_counter() - start
    good = [r for r in results if r["ok"]]
    return {
        "failures": len(results) - len(good),
        "tokens_per_s": sum(r["tokens"] for r in good) / wall,
        "ttft": [r["ttft"] for r in good],
        "tpot": [r["tpot"] for r in good],
        "e2e": [r["e2e"] for r in good],
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(int(q * len(values)), len(values) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="requests per stream per repeat")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch

    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "small")
        build_model(model_dir)
        from fmforge.tokenizer import Tokenizer

        eos = Tokenizer.load(model_dir).eos_id
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "fmforge.cli", "serve", model_dir, "--port", str(port),
             "--no-store", "--max-concurrency", str(max(LEVELS)), "--log-level", "warning"],
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("server did not start")
                time.sleep(0.2)
            body = {
                "model": "small",
                "messages": [{"role": "user", "content": "count the items in the index"}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "logit_bias": {str(eos): -100},
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            url = base + "/v1/chat/completions"
            asyncio.run(run_level(url, 2, body, 1))  # warm-up
            per_level: dict[int, list[dict]] = {c: [] for c in LEVELS}
            for repeat in range(args.repeats):
                for c in LEVELS if repeat % 2 == 0 else reversed(LEVELS):
                    cpu0, wall0 = _cpu_seconds(server.pid), time.perf_counter()
                    result = asyncio.run(run_level(url, c, body, args.rounds))
                    result["cpu_ratio"] = (_cpu_seconds(server.pid) - cpu0) / (
                        time.perf_counter() - wall0
                    )
                    per_level[c].append(result)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"max_tokens={args.max_tokens} repeats={args.repeats} rounds={args.rounds} (ms)")
    header = "conc  tok/s(min/med/max)     TTFT p50/p95   TPOT p50/p95   E2E p50/p95   fail  cpu"
    print(header)
    medians = {}
    for c in LEVELS:
        runs = per_level[c]
        rates = sorted(r["tokens_per_s"] for r in runs)
        medians[c] = statistics.median(rates)
        ttft = [x for r in runs for x in r["ttft"]]
        tpot = [x for r in runs for x in r["tpot"]]
        e2e = [x for r in runs for x in r["e2e"]]
        fails = sum(r["failures"] for r in runs)
        cpu = statistics.median(r["cpu_ratio"] for r in runs)
        print(
            f"{c:>4}  {rates[0]:6.0f}/{medians[c]:6.0f}/{rates[-1]:6.0f}  "
            f"{_pct(ttft, 0.5) * 1e3:6.0f}/{_pct(ttft, 0.95) * 1e3:6.0f}  "
            f"{_pct(tpot, 0.5) * 1e3:6.1f}/{_pct(tpot, 0.95) * 1e3:6.1f}  "
            f"{_pct(e2e, 0.5) * 1e3:6.0f}/{_pct(e2e, 0.95) * 1e3:6.0f}  {fails:>4}  {cpu:.2f}"
        )
    print(f"ratio={medians[8] / medians[1]:.2f}")


if __name__ == "__main__":
    main()
