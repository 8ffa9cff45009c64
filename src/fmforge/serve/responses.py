"""Engine events -> OpenAI response objects, SSE chunks, store records and metrics text.

A `Job` is one API request: one or more engine sequences ("choices": for completions, prompt p's
choice j is index p * n + j). It gathers each choice's text, tokens and logprobs as events arrive.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fmforge.generate.scheduler import Event


@dataclass
class Job:
    """The state of one chat or completions request while its choices are generated."""

    kind: str  # "chat" or "completion"
    id: str
    body: Any  # the validated request
    prompts: list[list[int]]
    prompt_texts: list[str | None]
    messages: list[dict[str, str]] | None
    logprobs: int | None  # None: no logprobs; else how many alternatives per token
    requests: list[Any]
    slot: Any = None  # the serve.versions.ModelSlot it runs on (its version is logged)
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = 0.0
    failed: bool = False

    def __post_init__(self) -> None:
        n = len(self.requests)
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.entries: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.sent_role = False

    @property
    def done(self) -> bool:
        """Return True when every choice has finished (or the job failed)."""
        return self.failed or all(f is not None for f in self.finish)

    def add(self, index: int, event: Event, tokenizer: Any) -> str:
        """Record one event of choice `index`; return its text delta."""
        if event.finish_reason == "error":
            self.failed = True
            return ""
        if event.token is not None:
            self.tokens[index].append(event.token)
            if self.logprobs is not None and event.logprob is not None:
                self.entries[index].append(_entry(tokenizer, event))
        self.texts[index].append(event.text)
        if event.finish_reason is not None:
            self.finish[index] = event.finish_reason
        return event.text

    def text(self, index: int) -> str:
        """Return the full text of choice `index` (with the echoed prompt for completions)."""
        text = "".join(self.texts[index])
        if self.kind == "completion" and self.body.echo:
            text = self.prompt_texts[index // self.body.n] + text
        return text

    def usage(self) -> dict[str, int]:
        """Return exact token counts: each prompt once, every generated token (stop ids aside)."""
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(t) for t in self.tokens)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def _entry(tokenizer: Any, event: Event) -> dict[str, Any]:
    token = tokenizer.decode([event.token])
    top = [
        {"token": tokenizer.decode([t]), "logprob": lp, "id": t}
        for t, lp in (event.top_logprobs or [])
    ]
    return {"token": token, "logprob": event.logprob, "id": event.token, "top": top}


def _chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = []
    for e in entries:
        row = item(e["token"], e["logprob"])
        row["top_logprobs"] = [item(t["token"], t["logprob"]) for t in e["top"]]
        content.append(row)
    return {"content": content}


def _completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    tokens, logprobs, tops, offsets = [], [], [], []
    for e in entries:
        tokens.append(e["token"])
        logprobs.append(e["logprob"])
        tops.append({t["token"]: t["logprob"] for t in e["top"]})
        offsets.append(offset)
        offset += len(e["token"])
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _logprobs(job: Job, index: int, entries: list[dict[str, Any]], offset: int = 0) -> Any:
    if job.logprobs is None:
        return None
    return _chat_logprobs(entries) if job.kind == "chat" else _completion_logprobs(entries, offset)


def _head(server: Any, job: Job) -> dict[str, Any]:
    obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    return {
        "id": job.id,
        "object": obj,
        "created": job.created,
        "model": server.settings.model_name,
        "system_fingerprint": job.slot.fingerprint,
    }


def _with_usage(job: Job, chunk: dict[str, Any]) -> dict[str, Any]:
    options = job.body.stream_options
    if options is not None and options.include_usage:
        chunk["usage"] = None
    return chunk


def final_body(server: Any, job: Job) -> dict[str, Any]:
    """Return the chat.completion or text_completion object of a finished job."""
    body = _head(server, job)
    body["object"] = "chat.completion" if job.kind == "chat" else "text_completion"
    choices = []
    for i in range(len(job.requests)):
        if job.kind == "chat":
            choice = {"index": i, "message": {"role": "assistant", "content": job.text(i)}}
        else:
            choice = {"index": i, "text": job.text(i)}
        choice["logprobs"] = _logprobs(job, i, job.entries[i])
        choice["finish_reason"] = job.finish[i]
        choices.append(choice)
    body["choices"] = choices
    body["usage"] = job.usage()
    return body


def first_chunks(server: Any, job: Job) -> list[dict[str, Any]]:
    """Return the chunks sent before any token: the assistant role (chat) or the echo."""
    chunks = []
    for i in range(len(job.requests)):
        if job.kind == "chat":
            delta = {"role": "assistant", "content": ""}
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
        elif job.body.echo:
            text = job.prompt_texts[i // job.body.n]
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": None}
        else:
            continue
        chunks.append(_with_usage(job, {**_head(server, job), "choices": [choice]}))
    return chunks


def delta_chunk(
    server: Any, job: Job, index: int, event: Event, delta: str
) -> dict[str, Any] | None:
    """Return the SSE chunk for one event, or None when it carries nothing to send."""
    has_logprob = job.logprobs is not None and event.token is not None
    if not delta and event.finish_reason is None and not has_logprob:
        return None
    entries = job.entries[index][-1:] if has_logprob else []
    logprobs = _logprobs(job, index, entries) if entries else None
    if job.kind == "chat":
        choice = {
            "index": index,
            "delta": {"content": delta} if delta or event.finish_reason is None else {},
            "logprobs": logprobs,
            "finish_reason": event.finish_reason,
        }
    else:
        choice = {
            "index": index,
            "text": delta,
            "logprobs": logprobs,
            "finish_reason": event.finish_reason,
        }
    return _with_usage(job, {**_head(server, job), "choices": [choice]})


def usage_chunk(server: Any, job: Job) -> dict[str, Any]:
    """Return the extra last chunk of `stream_options.include_usage`: no choices, the usage."""
    return {**_head(server, job), "choices": [], "usage": job.usage()}


def store_record(server: Any, job: Job) -> dict[str, Any]:
    """Return the feedback-store row of a finished job."""
    import json

    params = job.body.model_dump(
        exclude={"messages", "prompt", "model", "stream_options"}, exclude_none=True
    )
    usage = job.usage()
    prompt = None
    if job.kind == "completion":
        texts = job.prompt_texts
        prompt = texts[0] if len(texts) == 1 else json.dumps(texts, ensure_ascii=False)
    return {
        "id": job.id,
        "endpoint": job.kind,
        "model": server.settings.model_name,
        "model_version": job.slot.version,
        "params": params,
        "messages": job.messages,
        "prompt": prompt,
        "outputs": [job.text(i) for i in range(len(job.requests))],
        "finish_reasons": job.finish,
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "latency_s": time.monotonic() - job.started,
    }


def model_card(server: Any) -> dict[str, Any]:
    """Return the /v1/models entry of the served model."""
    return {
        "id": server.settings.model_name,
        "object": "model",
        "created": server.created,
        "owned_by": "fmforge",
    }


def prometheus(server: Any) -> str:
    """Return the Prometheus text exposition of the server's counters and gauges."""
    load = server.engine.load()
    totals = server.serving.totals()
    lines = [
        "# HELP fmforge_requests_total Generation requests by endpoint and status.",
        "# TYPE fmforge_requests_total counter",
    ]
    for (endpoint, status), count in sorted(server.requests.items()):
        lines.append(f'fmforge_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
    lines += [
        "# HELP fmforge_active_sequences Sequences decoding now.",
        "# TYPE fmforge_active_sequences gauge",
        f"fmforge_active_sequences {load['active']}",
        "# HELP fmforge_waiting_sequences Sequences waiting for a slot.",
        "# TYPE fmforge_waiting_sequences gauge",
        f"fmforge_waiting_sequences {load['waiting']}",
        "# HELP fmforge_generated_tokens_total Tokens generated.",
        "# TYPE fmforge_generated_tokens_total counter",
        f"fmforge_generated_tokens_total {totals['tokens']}",
        "# HELP fmforge_decode_steps_total Batched decode steps run.",
        "# TYPE fmforge_decode_steps_total counter",
        f"fmforge_decode_steps_total {totals['steps']}",
        "# HELP fmforge_serving_version_info The model version new requests run on.",
        "# TYPE fmforge_serving_version_info gauge",
        f'fmforge_serving_version_info{{version="{server.version}"}} 1',
    ]
    return "\n".join(lines) + "\n"
