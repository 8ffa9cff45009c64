"""`fmforge serve`: load a model, open the feedback store, run the app under uvicorn.

SIGTERM (or Ctrl-C) stops admission at once (readiness answers 503), lets in-flight requests
finish within the drain deadline, then exits 0. No child processes are started.
"""

from __future__ import annotations

import logging
from typing import Any

from fmforge.errors import UserError
from fmforge.serve.app import Settings, create_app

log = logging.getLogger("fmforge.serve")


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_file: str | None = None,
    db: str | None = None,
    max_concurrency: int = 4,
    max_queue: int = 16,
    metrics: bool = False,
    no_store: bool = False,
    log_level: str = "info",
    embeddings: str | None = None,
    search_index: str | None = None,
) -> None:
    """Load `model` and serve it on host:port until SIGTERM/Ctrl-C (which drain in-flight work)."""
    import contextlib
    import os
    import socket

    import uvicorn

    if max_concurrency < 1 or max_queue < 0:
        raise UserError("--max-concurrency must be >= 1 and --max-queue >= 0")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port (0-65535)")
    api_key = None
    if api_key_file is not None:
        try:
            api_key = open(api_key_file, encoding="utf-8").read().strip()
        except OSError as e:
            raise UserError(f"--api-key-file {api_key_file}: cannot read it ({e.strerror})") from e
        if not api_key:
            raise UserError(f"--api-key-file {api_key_file} is empty")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror as e:
            raise UserError(f"--host {host}: cannot resolve it ({e.strerror})") from e
        except OSError as e:
            raise UserError(
                f"cannot listen on {host}:{port} ({e.strerror}); pick another --port"
            ) from e
    store = None
    if not no_store:
        from fmforge.flywheel.store import FeedbackStore, redact

        store = FeedbackStore(db)
        log.info("feedback store: %s", redact(store.url))
    from fmforge.model.load import load_bundle

    loaded = load_bundle(model, kind="decoder")
    name = model if not os.path.isdir(model) else os.path.basename(os.path.normpath(model))
    settings = Settings(
        model_name=name,
        api_key=api_key,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        metrics=metrics,
    )
    embedder = None
    if embeddings is not None:
        from fmforge.serve.embeddings import load_embedder

        embedder = load_embedder(embeddings, search_index, decoder_name=name)
    elif search_index is not None:
        raise UserError("--search-index needs --embeddings ENCODER (the model that built it)")
    app = create_app(loaded, settings, store, embedder=embedder)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
    )

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Stop admitting at once (readiness goes 503); uvicorn then waits for open requests.
            app.state.server.draining = True
            app.state.server.engine.stop_accepting()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises SIGTERM after a graceful drain; a drained server exits 0 instead.
            with super().capture_signals():
                yield
                self._captured_signals.clear()

    print(f"fmforge: serving {name} on http://{host}:{port} (playground at /)", flush=True)
    _Server(config).run()
