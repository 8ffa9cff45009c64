"""The server runs the one generation engine (generate/scheduler.py), nothing of its own.

An HTTP request and `fmforge generate` go through the same `Scheduler.step` and the same native
kernels, and greedy HTTP output equals the command's token for token, for one request and for 8
concurrent requests of different prompt lengths.
"""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import httpx
import pytest

from fmforge.api import load
from fmforge.cli import main
from fmforge.generate.engine import generate_tokens
from fmforge.generate.scheduler import Scheduler
from fmforge.model import native
from fmforge.model.llama import LlamaForCausalLM
from test_serve_support import (  # noqa: F401
    MODEL_NAME,
    ThreadServer,
    make_app,
    serve_model_dir,
)

PROMPTS = [  # 8 prompts of different lengths
    "x",
    "def",
    "return index",
    "def alpha_1(beta):",
    "# total count of the items",
    "def count_3(index):\n    return index + 4  # total",
    "gamma delta value count index total item and more words here, " * 2,
    "alpha beta gamma delta value count index total item " * 5,
]
NEW_TOKENS = 12


def _cli_generate(model_dir: Path, prompt: str, capsys) -> str:
    argv = ["generate", str(model_dir), "--prompt", prompt]
    assert main(argv + ["--max-new-tokens", str(NEW_TOKENS), "--greedy"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


def _http_complete(url: str, prompt: str) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    return {"text": data["choices"][0]["text"], "tokens": data["usage"]["completion_tokens"]}


def test_serve_has_no_decode_loop_of_its_own():
    serve_dir = Path(__file__).parents[1] / "src" / "fmforge" / "serve"
    for path in serve_dir.glob("*.py"):
        source = path.read_text()
        for call in (".decode_step(", "lm_head", "new_cache", "sample_next", ".model("):
            assert call not in source, f"{path.name} calls the model itself ({call})"


def test_http_greedy_equals_generate_alone_and_8_concurrent(serve_model_dir, capsys):  # noqa: F811
    expected = [_cli_generate(serve_model_dir, p, capsys) for p in PROMPTS]
    loaded = load(serve_model_dir)
    tokenizer = loaded.tokenizer
    stop = [tokenizer.eos_id]
    counts = [
        len(generate_tokens(loaded.model, [tokenizer.encode(p)], NEW_TOKENS, None, stop)[0].tokens)
        for p in PROMPTS
    ]
    app, _ = make_app(serve_model_dir, max_concurrency=8, max_queue=8)
    with ThreadServer(app) as server:
        alone = [_http_complete(server.url, p) for p in PROMPTS]
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(lambda p: _http_complete(server.url, p), PROMPTS))
    assert [r["text"] for r in alone] == expected
    assert [r["text"] for r in together] == expected
    assert [r["tokens"] for r in alone] == [r["tokens"] for r in together] == counts


def test_http_and_generate_run_the_same_engine(serve_model_dir, capsys, monkeypatch):  # noqa: F811
    steps: list[str] = []
    forward_calls: list[int] = []
    step, forward = Scheduler.step, LlamaForCausalLM.forward

    def counted_step(self):
        steps.append(threading.current_thread().name)
        return step(self)

    def counted_forward(self, *args, **kwargs):
        forward_calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "step", counted_step)
    monkeypatch.setattr(LlamaForCausalLM, "forward", counted_forward)
    library = native.library()
    rows = library.fmforge_attended_rows if library is not None else (lambda: 0)

    before = rows()
    _cli_generate(serve_model_dir, "def alpha", capsys)
    assert steps and set(steps) == {threading.current_thread().name}
    library_rows = rows() - before

    steps.clear()
    forward_calls.clear()
    app, _ = make_app(serve_model_dir)
    with ThreadServer(app) as server:
        before = rows()
        _http_complete(server.url, "def alpha")
        http_rows = rows() - before
    assert steps and set(steps) == {"fmforge-engine"}  # the server's thread runs the scheduler
    if library is None:
        pytest.skip(native.status())
    # Both decoded through the native kernels, prompt included: the server never runs the plain
    # forward pass (its second engine used to), and the same prompt costs the same kernel rows.
    assert library_rows > 0 and http_rows == library_rows
    assert not forward_calls


def test_serve_bad_flags_are_one_line_errors(serve_model_dir, capsys):  # noqa: F811
    for flags in (["--port", "99999"], ["--port", "-1"], ["--max-concurrency", "0"]):
        assert main(["serve", str(serve_model_dir), "--no-store", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("fmforge: error:") and err.count("\n") == 1, err
