"""`fmforge serve`: load a model, open the feedback store, run the app under uvicorn.

SIGTERM (or Ctrl-C) stops admission at once (readiness answers 503), lets in-flight requests
finish within the drain deadline, then exits 0. No child processes are started.

With `--db URL` the server follows the model registry in that database (flywheel/registry.py):
it serves the registry's serving version (registering MODEL as v0 when the registry is empty),
logs that version's id with every generation, and hot-swaps to promoted or rolled-back versions
(serve/versions.py).
"""

from __future__ import annotations

import logging
from typing import Any

from fmforge.errors import UserError
from fmforge.serve.app import Settings, create_app

log = logging.getLogger("fmforge.serve")


def serve(
    model: str | None,
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
    no_registry: bool = False,
    poll_registry: float = 2.0,
) -> None:
    """Load `model` and serve it on host:port until SIGTERM/Ctrl-C (which drain in-flight work).

    With `db` (and neither `no_store` nor `no_registry`) serve the registry's serving version
    instead, polling it every `poll_registry` seconds (0: only the admin routes change it).
    """
    import contextlib
    import os
    import socket

    import uvicorn

    if max_concurrency < 1 or max_queue < 0:
        raise UserError("--max-concurrency must be >= 1 and --max-queue >= 0")
    if not poll_registry >= 0:
        raise UserError(f"--poll-registry {poll_registry}: give seconds >= 0 (0: no polling)")
    follow = db is not None and not no_store and not no_registry
    if model is None and not follow:
        raise UserError("give MODEL to serve (or --db URL to serve its registry's version)")
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
    store = registry = version = None
    if follow:
        from fmforge.flywheel.registry import Registry, load_version

        registry = Registry(db)
        store = registry.store
        version, model = _registry_version(registry, model)
        if version is not None:
            loaded = load_version(version)
        else:
            registry = None
    if version is None:
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
        poll_registry_s=poll_registry,
    )
    embedder = None
    if embeddings is not None:
        from fmforge.serve.embeddings import load_embedder

        embedder = load_embedder(embeddings, search_index, decoder_name=name)
    elif search_index is not None:
        raise UserError("--search-index needs --embeddings ENCODER (the model that built it)")
    app = create_app(
        loaded,
        settings,
        store,
        embedder=embedder,
        registry=registry,
        version=None if version is None else version.id,
    )
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

    what = name if version is None else f"{name} version {version.id} (model registry)"
    print(f"fmforge: serving {what} on http://{host}:{port} (playground at /)", flush=True)
    _Server(config).run()


def _registry_version(registry: Any, model: str | None) -> tuple[Any | None, str]:
    """Return (the version to serve, the base model spec that names the served model).

    An empty registry registers `model` as v0. A registry that already serves keeps serving its
    version when `model` (if given) is one of its base versions. Any other `model` is served as
    itself, without the registry (version None): its lineage is not the registry's.
    """
    from fmforge.flywheel.cycle import model_spec
    from fmforge.flywheel.store import redact

    serving = registry.serving()
    if serving is None:
        if model is None:
            raise UserError(
                f"the model registry in {redact(registry.url)} has no version yet; "
                "give MODEL to register and serve it as v0"
            )
        spec = model_spec(model)
        return registry.ensure_base(spec, spec), spec
    bases = [v for v in registry.list() if v.kind == "base"]
    specs = {model_spec(p) for v in bases for p in (v.base, v.path)}
    if model is not None and model_spec(model) not in specs:
        known = ", ".join(f"{v.id} ({v.base})" for v in bases) or "none"
        print(
            f"fmforge: {model} is not a base of the model registry in {redact(registry.url)} "
            f"(bases: {known}); serving it without the registry",
            flush=True,
        )
        return None, model
    root = bases[0].base if bases else serving.base
    return serving, model if model is not None else root
