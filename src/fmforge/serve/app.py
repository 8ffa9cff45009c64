"""The OpenAI-compatible server: `create_app(loaded, settings)` returns a FastAPI app.

Routes: /v1/models, /v1/completions, /v1/chat/completions (streaming or not), /v1/embeddings,
/v1/feedback (fmforge's extension), /health (liveness), /ready (readiness), /metrics (opt-in,
Prometheus text) and the playground at /. Generation runs on the one scheduler of generate/
(`BatchEngine` only gives it a thread); the request side only validates, submits, and turns
scheduler events into OpenAI JSON or SSE chunks (`serve/responses.py`). The chat prompt and the
token budget come from the same functions as the library's (`chat_prompt`, `token_budget`).
Every generation returned is recorded in the feedback store before the client sees its end.
The model is held in a slot (`serve/versions.py`): a request takes the current slot when admitted
and keeps it to its end, so a hot swap to another version (/admin/promote, /admin/rollback, or
polling a model registry) never changes a request midway, and its logged row names its version.
`serve/run.py` runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from fmforge.errors import UserError
from fmforge.generate.engine import DEFAULT_MAX_NEW_TOKENS, chat_prompt, stop_ids_of, token_budget
from fmforge.generate.scheduler import Event
from fmforge.generate.scheduler import Request as EngineRequest
from fmforge.serve import responses
from fmforge.serve.engine import BatchEngine, NotAccepting, QueueFull
from fmforge.serve.errors import APIError, error_response, install_error_handlers, sse_error
from fmforge.serve.middleware import GuardMiddleware
from fmforge.serve.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingRequest,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    ModelList,
)
from fmforge.serve.versions import (
    ModelSlot,
    RegistryFollower,
    Serving,
    add_admin_routes,
    open_slot,
)

log = logging.getLogger("fmforge.serve")

POLL_S = 0.25  # how often a waiting non-streaming request checks for a client disconnect


@dataclass
class Settings:
    """How the server runs; the CLI fills it from flags."""

    model_name: str = "model"  # the id in /v1/models and in requests
    api_key: str | None = None  # when set, every route but /health and the playground needs it
    max_concurrency: int = 4  # sequences decoded together (slots)
    max_queue: int = 16  # sequences waiting for a slot before 429
    max_body_bytes: int = 2 * 1024 * 1024  # larger request bodies get 413
    metrics: bool = False  # expose /metrics
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS  # when a request omits max_tokens
    retry_after_s: int = 1
    poll_registry_s: float = 2.0  # with a registry: seconds between checks of its pointer (0: off)
    extra: dict[str, Any] = field(default_factory=dict)


class Server:
    """The state behind the routes: the serving slot (model + engine), store, counters."""

    def __init__(
        self,
        loaded: Any,
        settings: Settings,
        store: Any | None,
        registry: Any | None = None,
        version: str | None = None,
        load_version: Any | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.serving = Serving(self.open(loaded, version))
        self.follower: RegistryFollower | None = None
        if registry is not None:
            if load_version is None:
                from fmforge.flywheel.registry import load_version

            self.follower = RegistryFollower(
                self.serving,
                registry,
                lambda v: self.open(load_version(v), v.id),
                settings.poll_registry_s,
                lambda: self.draining,
            )
        self.created = int(time.time())
        self.draining = False
        self.requests: dict[tuple[str, int], int] = {}

    def open(self, loaded: Any, version: str | None) -> ModelSlot:
        """Return a slot (engine not started) for `loaded`, named `version` or its fingerprint."""
        return open_slot(loaded, version, self.settings.max_concurrency, self.settings.max_queue)

    # The current slot; a request holds on to the slot it was admitted with instead.
    @property
    def slot(self) -> ModelSlot:
        return self.serving.current

    @property
    def engine(self) -> BatchEngine:
        return self.serving.current.engine

    @property
    def loaded(self) -> Any:
        return self.serving.current.loaded

    @property
    def version(self) -> str:
        return self.serving.current.version

    # --- checks ---------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name != self.settings.model_name:
            shown = "" if name is None else name[:100]
            raise APIError(
                404,
                f"The model `{shown}` does not exist" if name else "you must provide a model",
                "model",
                "model_not_found",
            )

    def check_ready(self, slot: ModelSlot) -> None:
        if slot.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; it cannot take text", None)
        if self.draining or not slot.engine.accepting:
            raise APIError(
                503,
                "The server is shutting down; retry on another instance.",
                code="server_shutting_down",
                type="server_error",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )

    def max_new_tokens(self, slot: ModelSlot, prompt_tokens: int, requested: int | None) -> int:
        """Return the completion budget; APIError with OpenAI's message when it doesn't fit."""
        try:
            default = self.settings.default_max_tokens
            return token_budget(slot.context, prompt_tokens, requested, default)
        except UserError as e:
            completion = requested if requested is not None else 1
            total = prompt_tokens + completion
            raise APIError(
                400,
                f"This model's maximum context length is {slot.context} tokens. However, you "
                f"requested {total} tokens ({prompt_tokens} in the messages, {completion} in the "
                "completion). Please reduce the length of the messages or completion.",
                "messages",
                "context_length_exceeded",
            ) from e

    def sampling(self, slot: ModelSlot, body: Any) -> Any:
        from fmforge.generate.sampling import SamplingParams

        bias: dict[int, float] = {}
        for key, value in (body.logit_bias or {}).items():
            if not key.isdigit() or not 0 <= int(key) < slot.vocab:
                raise APIError(
                    400,
                    f"logit_bias: {key[:40]!r} is not a token id in 0..{slot.vocab - 1}",
                    "logit_bias",
                    "invalid_value",
                )
            bias[int(key)] = float(value)
        try:
            return SamplingParams(
                temperature=body.temperature,
                top_p=body.top_p if body.top_p < 1.0 else None,
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
                logit_bias=bias,
            )
        except UserError as e:
            raise APIError(400, str(e), None, "invalid_value") from e

    def count(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    # --- running requests ------------------------------------------------------------------------

    def submit(
        self, slot: ModelSlot, requests: list[EngineRequest]
    ) -> tuple[list[Any], asyncio.Queue]:
        """Submit to the slot's engine; return (handles, queue of (index, Event)). 429/503."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(index: int, event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (index, event))

        try:
            handles = slot.engine.submit_many(requests, on_event)
        except QueueFull as e:
            raise APIError(
                429,
                "The server is at capacity (all slots busy and the queue full); retry shortly.",
                code="queue_full",
                type="rate_limit_error",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from e
        except NotAccepting as e:
            self.draining = True
            self.check_ready(slot)
            raise AssertionError("unreachable") from e
        return handles, events

    async def record(self, record: dict[str, Any]) -> None:
        if self.store is not None:
            await run_in_threadpool(self.store.record_generation, record)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def create_app(
    loaded: Any,
    settings: Settings | None = None,
    store: Any | None = None,
    embedder: Any | None = None,
    registry: Any | None = None,
    version: str | None = None,
    load_version: Any | None = None,
) -> FastAPI:
    """Return the FastAPI app serving `loaded` (a LoadedModel) under `settings`.

    `embedder` (serve/embeddings.py) adds an encoder's /v1/embeddings and /v1/search. With a
    `registry` (flywheel/registry.py), `loaded` is its version `version` and the server follows
    the registry's serving version (`load_version(Version)` loads one; serve/versions.py).
    """
    settings = settings or Settings()
    server = Server(loaded, settings, store, registry, version, load_version)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        if server.follower is not None:
            server.follower.start()
        try:
            yield
        finally:
            server.draining = True
            if server.follower is not None:
                await server.follower.stop()
            await run_in_threadpool(server.serving.shutdown, settings.drain_timeout_s)
            for task in list(server.serving.tasks):  # retirements: their engines are stopped now
                task.cancel()

    app = FastAPI(
        title="fmforge",
        version="1",
        description="OpenAI-compatible API of one fmforge model, plus /v1/feedback.",
        lifespan=lifespan,
        responses={
            400: {"model": ErrorResponse},
            401: {"model": ErrorResponse},
            404: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
        },
    )
    app.state.server = server
    install_error_handlers(app)
    if embedder is not None:  # registered first, so it answers /v1/embeddings
        from fmforge.serve.embeddings import embeddings_router

        app.include_router(embeddings_router(embedder))
    add_admin_routes(app, server)
    public = ("/health", "/", "/playground/", "/favicon.ico")
    app.add_middleware(
        GuardMiddleware,
        api_key=settings.api_key,
        public_paths=public,
        max_body_bytes=settings.max_body_bytes,
    )
    playground = resources.files("fmforge.serve") / "playground"
    app.mount("/playground", StaticFiles(directory=str(playground)), name="playground")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(str(playground / "index.html"), media_type="text/html")

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 when taking requests, 503 while draining")
    async def ready() -> JSONResponse:
        if server.draining or not server.engine.accepting or server.engine.thread is None:
            return error_response(APIError(503, "not ready", code="not_ready", type="server_error"))
        return JSONResponse({"status": "ready", **server.engine.load()})

    if settings.metrics:

        @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(responses.prometheus(server), media_type="text/plain")

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> dict[str, Any]:
        cards = [responses.model_card(server)]
        if embedder is not None:  # the encoder beside the decoder, for /v1/embeddings
            cards.append({**cards[0], "id": embedder.name})
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if embedder is not None and model_id == embedder.name:
            return {**responses.model_card(server), "id": embedder.name}
        server.check_model(model_id)
        return responses.model_card(server)

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        server.check_model(body.model)
        slot = server.slot  # held to the end; no await before its engine takes the request
        server.check_ready(slot)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text}
            for m in body.messages
        ]
        try:
            prompt, stop_ids = chat_prompt(slot.tokenizer, messages)
        except UserError as e:
            raise APIError(400, str(e), "messages", "invalid_value") from e
        max_tokens = server.max_new_tokens(slot, len(prompt), body.max_tokens)
        top = body.top_logprobs or 0
        job = responses.Job(
            kind="chat",
            id=_new_id("chatcmpl"),
            body=body,
            prompts=[prompt],
            prompt_texts=[None],
            messages=messages,
            logprobs=top if body.logprobs else None,
            requests=_engine_requests(
                server, slot, body, [prompt], max_tokens, stop_ids, top, body.logprobs
            ),
            slot=slot,
        )
        return await _run(server, job, request)

    @app.post("/v1/completions", response_model=Completion)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        server.check_model(body.model)
        slot = server.slot  # held to the end; no await before its engine takes the request
        server.check_ready(slot)
        prompts, texts = _completion_prompts(slot, body.prompt)
        budgets = [server.max_new_tokens(slot, len(p), body.max_tokens) for p in prompts]
        stop_ids = stop_ids_of(slot.tokenizer)
        requests = []
        for prompt, budget in zip(prompts, budgets):
            requests += _engine_requests(
                server,
                slot,
                body,
                [prompt],
                budget,
                stop_ids,
                body.logprobs or 0,
                body.logprobs is not None,
            )
        job = responses.Job(
            kind="completion",
            id=_new_id("cmpl"),
            body=body,
            prompts=prompts,
            prompt_texts=texts,
            messages=None,
            logprobs=body.logprobs,
            requests=requests,
            slot=slot,
        )
        return await _run(server, job, request)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Any:
        server.check_model(body.model)
        raise APIError(
            400,
            f"The model `{settings.model_name}` does not provide embeddings (it is a decoder-only "
            "language model); serve an encoder model for /v1/embeddings.",
            "model",
            "model_does_not_support_embeddings",
        )

    @app.post(
        "/v1/feedback",
        response_model=FeedbackResponse,
        summary="fmforge extension: feedback on a returned generation",
    )
    async def post_feedback(body: FeedbackRequest, request: Request) -> Any:
        if server.store is None:
            raise APIError(400, "this server runs without a feedback store", None, "no_store")
        key = body.idempotency_key or request.headers.get("idempotency-key") or None
        if key is not None and not 0 < len(key) <= 200:
            raise APIError(400, "idempotency key must be 1..200 characters", "idempotency_key")
        try:
            row, new = await run_in_threadpool(
                server.store.add_feedback,
                body.generation_id,
                body.kind,
                body.value,
                key,
                body.choice_index,
            )
        except KeyError as e:
            raise APIError(
                404,
                f"No generation with id `{body.generation_id[:64]}` is stored",
                "generation_id",
                "generation_not_found",
            ) from e
        except ValueError as e:
            raise APIError(400, str(e), "value", "invalid_value") from e
        return {"object": "feedback", **row, "created_now": new}

    return app


def _engine_requests(
    server: Server,
    slot: ModelSlot,
    body: Any,
    prompts: list[list[int]],
    max_tokens: int,
    stop_ids: list[int],
    top_logprobs: int,
    want_logprobs: bool,
) -> list[EngineRequest]:
    params = server.sampling(slot, body)
    out = []
    for prompt in prompts:
        for choice in range(body.n):
            seed = None if body.seed is None else body.seed + choice
            out.append(
                EngineRequest(
                    prompt=prompt,
                    max_tokens=max_tokens,
                    params=params,
                    stop_ids=stop_ids,
                    stop=body.stop_strings,
                    seed=seed,
                    logprobs=top_logprobs if want_logprobs else None,
                )
            )
    return out


def _completion_prompts(slot: ModelSlot, prompt: Any) -> tuple[list[list[int]], list[str]]:
    # Normalise the four prompt forms to token-id lists (and their text, for echo).
    tokenizer = slot.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    ids, texts = [], []
    bos = tokenizer.bos_id if getattr(slot.loaded, "add_bos", False) else None
    for item in prompt:
        if isinstance(item, str):
            tokens = tokenizer.encode(item)
            ids.append(tokens if bos is None else [bos, *tokens])
            texts.append(item)
        else:
            for token in item:
                if not 0 <= token < slot.vocab:
                    raise APIError(
                        400,
                        f"prompt: token id {token} is not in the vocabulary 0..{slot.vocab - 1}",
                        "prompt",
                        "invalid_value",
                    )
            ids.append(list(item))
            texts.append(tokenizer.decode(item))
    if any(not p for p in ids):
        raise APIError(400, "prompt encodes to no tokens", "prompt", "invalid_value")
    return ids, texts


async def _run(server: Server, job: responses.Job, request: Request) -> Any:
    handles, events = server.submit(job.slot, job.requests)
    job.started = time.monotonic()
    endpoint = job.kind
    version = {"X-Model-Version": job.slot.version}
    if job.body.stream:
        server.count(endpoint, 200)
        return StreamingResponse(
            _stream(server, job, handles, events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **version},
        )
    try:
        while not job.done:
            try:
                index, event = await asyncio.wait_for(events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    for handle in handles:
                        handle.cancel()
                    return JSONResponse({}, status_code=499)
                continue
            job.add(index, event, job.slot.tokenizer)
    except asyncio.CancelledError:
        for handle in handles:
            handle.cancel()
        raise
    if job.failed:
        server.count(endpoint, 500)
        raise APIError(500, "generation failed", type="server_error", code="internal_error")
    body = responses.final_body(server, job)
    if job.body.store:
        await server.record(responses.store_record(server, job))
    server.count(endpoint, 200)
    return JSONResponse(body, headers=version)


async def _stream(server: Server, job: responses.Job, handles: list[Any], events: asyncio.Queue):
    # SSE: one chunk per event with text; the last chunk of a choice carries its finish_reason.
    try:
        for chunk in responses.first_chunks(server, job):
            yield f"data: {json.dumps(chunk)}\n\n"
        while not job.done:
            index, event = await events.get()
            delta = job.add(index, event, job.slot.tokenizer)
            if job.failed:
                error = APIError(
                    500, "generation failed", type="server_error", code="internal_error"
                )
                yield sse_error(error) + "\n\n"
                break
            chunk = responses.delta_chunk(server, job, index, event, delta)
            if chunk is not None:
                yield f"data: {json.dumps(chunk)}\n\n"
        if not job.failed:
            if job.body.store:
                await server.record(responses.store_record(server, job))
            if job.body.stream_options is not None and job.body.stream_options.include_usage:
                yield f"data: {json.dumps(responses.usage_chunk(server, job))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        # Runs when the client disconnects too: the engine drops these rows at its next step.
        for handle in handles:
            handle.cancel()
