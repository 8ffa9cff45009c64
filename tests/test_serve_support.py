"""Shared fixtures for the server tests: a tiny model dir, an in-process app, a server subprocess.

No tests here; the test_serve*/test_store*/test_playground* modules import from it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from polling import wait_until

MODEL_NAME = "tiny-serve"


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Llama (2 layers, d 64) with the session tokenizer, saved as a model dir."""
    from fmforge.model.config import preset_config
    from fmforge.model.llama import LlamaForCausalLM
    from fmforge.model.load import save_model_dir
    from fmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset_config("tiny", vocab_size=tokenizer.vocab_size))
    out = tmp_path_factory.mktemp("serve") / MODEL_NAME
    save_model_dir(model, tokenizer, out)
    return out


def make_app(model_dir: Path, db_url: str | None = None, **settings):
    """Return (app, store) for `model_dir`; store is None when db_url is None."""
    from fmforge.api import load
    from fmforge.flywheel.store import FeedbackStore
    from fmforge.serve.app import Settings, create_app

    store = FeedbackStore(db_url) if db_url else None
    app = create_app(load(model_dir), Settings(model_name=MODEL_NAME, **settings), store)
    return app, store


class ServerProcess:
    """`fmforge serve` in a subprocess on 127.0.0.1:<free port>; stopped by the test."""

    def __init__(self, model_dir: Path, db: str | None, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "fmforge.cli", "serve", str(model_dir)]
        args += ["--port", str(self.port), "--log-level", "warning"]
        args += ["--db", db] if db else ["--no-store"]
        args += list(extra)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
        )

    def wait_ready(self, timeout: float = 60.0) -> ServerProcess:
        def healthy_or_exited() -> bool:
            if self.proc.poll() is not None:
                return True
            try:
                return httpx.get(self.url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        ready = wait_until(healthy_or_exited, timeout=timeout, interval=0.1)
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{self.proc.stdout.read()}")
        if not ready:
            self.stop()
            raise RuntimeError("server did not start in time")
        return self

    def output(self) -> str:
        return self.proc.stdout.read() if self.proc.stdout else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(model_dir: Path, db: str | None = None, *extra: str) -> ServerProcess:
    """Start a server subprocess and wait until /health answers."""
    return ServerProcess(model_dir, db, *extra).wait_ready()


class ThreadServer:
    """uvicorn serving `app` in a thread of the test process (no start-up imports to pay)."""

    def __init__(self, app, log_level: str = "warning") -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=log_level)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        started = wait_until(lambda: self.server.started or not self.thread.is_alive(), timeout=30)
        if not (started and self.server.started):
            raise RuntimeError("in-thread server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
