"""Model versions in a running server: the slot a request holds, hot swap, following a registry.

The server serves one `ModelSlot` at a time: a version id, the loaded model and the `BatchEngine`
(a thread around the one scheduler) that runs it. A request takes the current slot when it is
admitted and keeps it to its end, so a stream finishes on the version it started with and its
logged row names that version. A swap loads the next version off the event loop (a worker
thread), starts its engine, then switches the slot with one assignment on the loop: requests
admitted after that run on the new version. The old engine admits nothing more; once its
in-flight sequences are done it is shut down and dropped.

With a model registry (flywheel/registry.py) the served version follows the registry's serving
pointer, by polling it (`--poll-registry`) and through the admin routes `POST /admin/promote` and
`POST /admin/rollback`. An admin change loads the target before it touches the registry, so a
version that does not load leaves both the registry and the server as they were.
`GET /admin/versions` feeds the playground's versions panel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, StrictStr
from starlette.concurrency import run_in_threadpool

from fmforge.errors import UserError
from fmforge.serve.engine import BatchEngine
from fmforge.serve.errors import APIError

log = logging.getLogger("fmforge.serve")

RETIRE_POLL_S = 0.05  # how often a retired engine is checked for its last in-flight sequence


def weights_fingerprint(loaded: Any) -> str:
    """Return a short fingerprint of the weights' config, source and tokenizer."""
    parts = [
        json.dumps(loaded.config.to_hf_dict(), sort_keys=True, default=str),
        str(loaded.provenance.get("tokenizer_sha256", "")),
        str(loaded.provenance.get("fmforge_version", "")),
        str(loaded.source),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclasses.dataclass
class ModelSlot:
    """One servable version: its id, the loaded model, and the engine decoding it."""

    version: str  # the registry's version id, or the weights' fingerprint without a registry
    loaded: Any  # a LoadedModel
    engine: BatchEngine
    fingerprint: str  # `system_fingerprint` of its responses
    context: int  # max_position_embeddings
    vocab: int  # token ids a request may use

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer


def open_slot(loaded: Any, version: str | None, slots: int, max_queue: int) -> ModelSlot:
    """Return a slot for `loaded` (engine built, not started); `version` None: the fingerprint."""
    weights = weights_fingerprint(loaded)
    fingerprint = "fp_" + weights[:10]
    if version is not None:  # a registry version: its id and weights pick the fingerprint
        fingerprint = "fp_" + hashlib.sha256(f"{version}\n{weights}".encode()).hexdigest()[:10]
    version = version or weights
    vocab = loaded.config.vocab_size
    if loaded.tokenizer is not None:
        vocab = min(vocab, loaded.tokenizer.vocab_size)
    engine = BatchEngine(loaded.model, loaded.tokenizer, slots, max_queue)
    context = loaded.config.max_position_embeddings
    return ModelSlot(version, loaded, engine, fingerprint, context, vocab)


class Serving:
    """The current slot and the retired ones still finishing their in-flight requests.

    `current` and `switch` are used on the event loop only, so a request reads either the old
    slot or the new one, never a mix.
    """

    def __init__(self, slot: ModelSlot) -> None:
        self.current = slot
        self.since = time.time()  # when `current` started serving here
        self.retiring: dict[int, ModelSlot] = {}  # id(slot) -> slot
        self.tasks: set[asyncio.Task] = set()
        self.released = {"steps": 0, "tokens": 0}  # counters of the engines already released

    def switch(self, slot: ModelSlot) -> ModelSlot:
        """Serve `slot` (its engine started) from now on; retire the old one; return the old."""
        old, self.current = self.current, slot
        self.since = time.time()
        old.engine.stop_accepting()
        self.retiring[id(old)] = old
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return old

    async def _retire(self, slot: ModelSlot) -> None:
        # Its requests were admitted before the switch; they finish here, then it goes.
        while not slot.engine.idle():
            await asyncio.sleep(RETIRE_POLL_S)
        await run_in_threadpool(slot.engine.shutdown, 0.0)
        self.released["steps"] += slot.engine.steps
        self.released["tokens"] += slot.engine.tokens_generated
        self.retiring.pop(id(slot), None)
        log.info("released version %s", slot.version)

    def slots(self) -> list[ModelSlot]:
        """Return the current slot, then the retiring ones."""
        return [self.current, *self.retiring.values()]

    def totals(self) -> dict[str, int]:
        """Return scheduler steps and generated tokens over every version served (for /metrics)."""
        slots = self.slots()
        return {
            "steps": self.released["steps"] + sum(s.engine.steps for s in slots),
            "tokens": self.released["tokens"] + sum(s.engine.tokens_generated for s in slots),
        }

    def in_flight(self) -> dict[str, int]:
        """Return active + waiting sequences per version (current and retiring)."""
        out: dict[str, int] = {}
        for slot in self.slots():
            load = slot.engine.load()
            out[slot.version] = out.get(slot.version, 0) + load["active"] + load["waiting"]
        return out

    def shutdown(self, timeout: float) -> None:
        """Drain and stop every engine (called from a worker thread at server exit)."""
        for slot in self.slots():
            slot.engine.shutdown(timeout)


class PromoteRequest(BaseModel):
    """POST /admin/promote."""

    model_config = ConfigDict(extra="forbid")
    version: StrictStr


class RollbackRequest(BaseModel):
    """POST /admin/rollback (no fields)."""

    model_config = ConfigDict(extra="forbid")


class RegistryFollower:
    """Keeps the served version equal to the registry's serving version.

    `loader(version)` returns a LoadedModel (flywheel.registry.load_version by default). Every
    change goes through `lock`, so polling and admin calls never load two versions at once.
    """

    def __init__(
        self,
        serving: Serving,
        registry: Any,
        open_version: Callable[[Any], ModelSlot],
        poll_s: float,
        is_draining: Callable[[], bool],
    ) -> None:
        self.serving = serving
        self.registry = registry
        self.open_version = open_version
        self.poll_s = poll_s
        self.is_draining = is_draining
        self.lock = asyncio.Lock()
        self.failed: str | None = None  # a version the poller could not load (not retried)
        self.failure: str | None = None  # why it did not load
        self.task: asyncio.Task | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start polling the registry (when poll_s > 0); call on the running loop."""
        if self.poll_s > 0:
            self.task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        """Stop polling."""
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.sync()
            except Exception as e:  # the database may be briefly unavailable: try again later
                log.warning("registry poll failed: %s", " ".join(str(e).split())[:200])

    # --- changes --------------------------------------------------------------------------------

    async def _load(self, version: Any) -> ModelSlot:
        # Load and start the version's engine off the event loop; UserError if it does not load.
        def load() -> ModelSlot:
            slot = self.open_version(version)
            slot.engine.start()
            return slot

        try:
            return await run_in_threadpool(load)
        except Exception as e:  # missing or corrupt files: the version stays unserved
            reason = " ".join(str(e).split())[:300]
            raise UserError(f"model version {version.id} could not be loaded: {reason}") from e

    def _switch(self, slot: ModelSlot) -> None:
        if self.is_draining():
            slot.engine.shutdown(0.0)
            return
        old = self.serving.switch(slot)
        log.info("now serving version %s (was %s)", slot.version, old.version)

    async def sync(self) -> bool:
        """Serve the registry's serving version if it is not served yet; return True on a swap."""
        async with self.lock:
            version = await run_in_threadpool(self.registry.serving)
            if version is None or version.id == self.serving.current.version:
                return False
            if version.id == self.failed or self.is_draining():
                return False
            try:
                slot = await self._load(version)
            except UserError as e:
                self.failed, self.failure = version.id, str(e)  # retried once the pointer moves
                log.error("the registry serves %s but it did not load: %s", version.id, e)
                return False
            self.failed = self.failure = None
            self._switch(slot)
            return True

    async def promote(self, version_id: str, by: str) -> dict[str, Any]:
        """Load `version_id`, record the promotion in the registry, then serve it."""
        async with self.lock:
            self._check_draining()
            try:
                version = await run_in_threadpool(self.registry.get, version_id)
            except UserError as e:
                raise APIError(404, str(e), "version", "version_not_found") from e
            previous = self.serving.current.version
            if version.id == previous:
                pointer = await run_in_threadpool(self.registry.serving)
                if pointer is not None and pointer.id == version.id:
                    return _changed(version.id, previous, False)
            slot = await self._admin_load(version)
            try:
                await run_in_threadpool(self.registry.promote, version.id, by)
            except Exception as e:
                await _discard(slot)
                raise _registry_error(e, "version", "invalid_value") from e
            if slot is not None:
                self._switch(slot)
            return _changed(version.id, previous, True)

    async def rollback(self, by: str) -> dict[str, Any]:
        """Load the version before the serving one, record the rollback, then serve it."""
        async with self.lock:
            self._check_draining()
            previous = self.serving.current.version
            target = await run_in_threadpool(self.registry.rollback_target)
            slot = await self._admin_load(target) if target is not None else None
            try:
                version = await run_in_threadpool(self.registry.rollback, by)
            except Exception as e:
                await _discard(slot)
                raise _registry_error(e, None, "nothing_to_roll_back") from e
            if version.id == previous:
                await _discard(slot)
                return _changed(version.id, previous, False)
            if slot is None or slot.version != version.id:
                # Another process changed the registry between the two reads: serve its choice.
                await _discard(slot)
                slot = await self._admin_load(version)
            self._switch(slot)
            return _changed(version.id, previous, True)

    async def _admin_load(self, version: Any) -> ModelSlot | None:
        if version.id == self.serving.current.version:
            return None  # the registry catches up with what is served; nothing to load
        try:
            return await self._load(version)
        except UserError as e:
            raise APIError(400, str(e), "version", "version_load_failed") from e

    def _check_draining(self) -> None:
        if self.is_draining():
            raise APIError(
                503,
                "The server is shutting down; it takes no version change.",
                code="server_shutting_down",
                type="server_error",
            )

    # --- reads ----------------------------------------------------------------------------------

    def versions(self) -> list[dict[str, Any]]:
        """Return the registry's versions, newest first, with their gate results (no reports)."""
        keep = ("id", "created", "parent", "base", "kind", "status", "dataset_id")
        keep += ("log_window", "feedback_counts", "gate")
        rows = [{k: getattr(v, k) for k in keep} for v in self.registry.list()]
        return sorted(rows, key=lambda r: r["created"], reverse=True)


async def _discard(slot: ModelSlot | None) -> None:
    # A loaded version that will not serve: stop its (idle) engine thread.
    if slot is not None:
        await run_in_threadpool(slot.engine.shutdown, 0.0)


def _registry_error(error: Exception, param: str | None, code: str) -> APIError:
    # A refusal by the registry is the caller's (400); a database failure is temporary (503).
    if isinstance(error, UserError):
        return APIError(400, str(error), param, code)
    log.error("model registry write failed: %s", " ".join(str(error).split())[:300])
    return APIError(
        503,
        "The model registry could not be written; the served version is unchanged. Retry shortly.",
        code="registry_unavailable",
        type="server_error",
    )


def _changed(version: str, previous: str, changed: bool) -> dict[str, Any]:
    return {"object": "serving", "version": version, "previous": previous, "changed": changed}


def add_admin_routes(app: FastAPI, server: Any) -> None:
    """Add the /admin routes of `server` (app.Server) to `app`: versions, promote, rollback.

    The guard middleware already answers 401 without the API key; a server started without a key
    refuses version changes (403), since anyone could make them.
    """

    def follower() -> RegistryFollower:
        if server.settings.api_key is None:
            raise APIError(
                403,
                "Version changes need an API key: start the server with --api-key-file.",
                code="admin_disabled",
                type="permission_error",
            )
        if server.follower is None:
            raise APIError(
                400,
                "This server follows no model registry; start it with `fmforge serve --db URL`.",
                code="no_registry",
            )
        return server.follower

    @app.get("/admin/versions", summary="fmforge: the serving version, its feedback, the history")
    async def versions() -> dict[str, Any]:
        return await run_in_threadpool(_versions_report, server)

    @app.post("/admin/promote", summary="fmforge: serve a registered version from now on")
    async def promote(body: PromoteRequest) -> dict[str, Any]:
        return await follower().promote(body.version, by="admin-api")

    @app.post("/admin/rollback", summary="fmforge: serve the previous version again")
    async def rollback(body: RollbackRequest | None = None) -> dict[str, Any]:
        return await follower().rollback(by="admin-api")


def _versions_report(server: Any) -> dict[str, Any]:
    # Runs in a worker thread: registry and store reads are blocking.
    serving = server.serving
    follower = server.follower
    since = serving.since
    versions: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    pointer = load_error = None
    if follower is not None:
        versions = follower.versions()
        history = follower.registry.history()
        pointer = history[-1]["version"] if history else None
        if pointer == serving.current.version:
            since = history[-1]["created"]  # when the registry made it serve
        elif pointer is not None and pointer == follower.failed:
            load_error = follower.failure
    feedback: dict[str, int] = {}
    generations = None
    if server.store is not None:
        counts = server.store.counts_since(since)
        feedback, generations = counts["feedback"], counts["generations"]
    return {
        "object": "versions",
        "model": server.settings.model_name,
        "registry": follower is not None,
        "serving": {
            "version": serving.current.version,
            "since": since,
            "feedback_since": feedback,
            "generations_since": generations,
            "in_flight": serving.in_flight(),
            "registry_version": pointer,  # differs while a swap is loading, or after it failed
            "load_error": load_error,
        },
        "versions": versions,
        "history": history,
    }
