"""Continuous batching: one scheduler thread decodes up to S sequences together.

Each sequence owns one row ("slot") of a shared KV cache and its own position in it. The active
sequences always fill rows 0..n-1, so a decode step is one forward pass over a view of the cache:
every row writes its new key/value at its own position (`SlotCache.update`), and a key mask hides
each row's columns past its length (left over from an earlier, longer occupant). RoPE positions are
per row (`position_ids`). A finished or abandoned sequence's row is refilled by moving the last
active row into it, so the rows stay contiguous.

Between two decode steps the scheduler frees the slots of finished or cancelled sequences, then
admits waiting requests (one prefill each) while slots are free. Requests beyond the slots wait in
a bounded queue; `submit` raises `QueueFull` when it is full.

Notation: n active rows, S slots, M cache length (the model's context), K key/value heads,
D head dim, V vocab, L prompt length.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fmforge.generate.engine import TextStream
from fmforge.generate.sampling import SamplingParams, sample_next


class QueueFull(Exception):
    """Every slot is busy and the waiting queue holds `max_queue` requests."""


class NotAccepting(Exception):
    """The engine is draining (shutting down) and admits no new request."""


@dataclass
class Request:
    """One sequence to generate: a prompt, how to sample it and when to stop."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token + top-k alternatives


@dataclass
class Event:
    """What one decode step produced for a sequence (sent to the waiting request)."""

    text: str  # the new, final text (may be "")
    token: int | None  # the sampled token id (None for the closing event of a stop string)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # set on the last event: "stop" or "length"


class Handle:
    """The requester's side of a sequence: events arrive through `on_event`; `cancel` frees it."""

    def __init__(self, request: Request, on_event: Callable[[Event], None]) -> None:
        self.request = request
        self.on_event = on_event
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.finished = False

    def cancel(self) -> None:
        """Ask the scheduler to drop this sequence at its next step (client went away)."""
        self.cancelled = True


class SlotCache:
    """A KV cache of S rows whose active rows 0..n-1 each sit at their own position.

    The model calls `update(layer, start, k, v)`. In a decode step (`rows` set) every row writes
    its one new key at `positions[row]`; in a prefill (`prefill_row` set) one row writes L keys.
    """

    def __init__(self, model: torch.nn.Module, slots: int) -> None:
        c = model.config
        weight = model.lm_head.weight
        shape = (c.num_hidden_layers, slots, c.num_key_value_heads, c.max_position_embeddings)
        shape = (*shape, c.head_dim)  # (layers, S, K, M, D)
        self.k = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.v = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.rows = 0  # decode: rows 0..rows-1 take part
        self.positions: torch.Tensor | None = None  # (n,): where each row writes
        self.width = 0  # decode: keys 0..width-1 are returned (max position + 1)
        self.prefill_row: int | None = None

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v and return the keys/values attention reads (see the class docstring)."""
        if self.prefill_row is not None:
            row, end = self.prefill_row, start + k.shape[2]
            self.k[layer, row, :, start:end] = k[0]  # (K, L, D)
            self.v[layer, row, :, start:end] = v[0]
            return self.k[layer, row : row + 1, :, :end], self.v[layer, row : row + 1, :, :end]
        n = self.rows
        index = torch.arange(n, device=k.device)
        self.k[layer, index, :, self.positions] = k[:, :, 0]  # (n, K, D)
        self.v[layer, index, :, self.positions] = v[:, :, 0]
        return self.k[layer, :n, :, : self.width], self.v[layer, :n, :, : self.width]

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (all layers, all positions)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


class _Sequence:
    # Scheduler-side state of one admitted request.
    def __init__(self, handle: Handle, tokenizer: Any, vocab: int, device: torch.device) -> None:
        request = handle.request
        self.handle = handle
        self.request = request
        self.length = len(request.prompt)  # tokens in the cache once the pending token is run
        self.pending: int | None = None  # the sampled token not yet run through the model
        self.generated = 0
        self.stream = TextStream(tokenizer, request.stop)
        self.stop_ids = set(request.stop_ids)
        self.generator = None
        if not request.params.greedy:
            self.generator = torch.Generator(device=device)
            seed = request.seed if request.seed is not None else int(torch.seed()) % 2**63
            self.generator.manual_seed(seed)
        self.seen = self.counts = None
        if request.params.uses_penalties:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(request.prompt, device=device)] = True
            self.counts = torch.zeros(1, vocab, dtype=torch.long, device=device)

    @property
    def plain_greedy(self) -> bool:
        params = self.request.params
        return params.greedy and self.seen is None and not params.logit_bias


class BatchEngine:
    """Schedules requests onto `slots` rows of one shared KV cache, decoding them together."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, slots: int = 4, max_queue: int = 16
    ) -> None:
        if slots < 1 or max_queue < 0:
            raise ValueError("slots must be >= 1 and max_queue >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.slots = slots
        self.max_queue = max_queue
        self.context = model.config.max_position_embeddings
        self.device = model.lm_head.weight.device
        self.cache = SlotCache(model, slots)
        self.waiting: deque[Handle] = deque()
        self.active: list[_Sequence] = []
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.accepting = True
        self.stopped = False
        self.thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (for /metrics)
        self.tokens_generated = 0
        self.error: BaseException | None = None

    # --- requester side ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread."""
        self.thread = threading.Thread(target=self._loop, name="fmforge-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        """Queue a request; return its handle. Raises QueueFull or NotAccepting."""
        return self.submit_many([request], on_event=lambda i, e: on_event(e))[0]

    def submit_many(
        self, requests: Sequence[Request], on_event: Callable[[int, Event], None]
    ) -> list[Handle]:
        """Queue several requests atomically (all or none); `on_event(i, event)` per request."""
        with self.lock:
            if not self.accepting:
                raise NotAccepting("the server is shutting down")
            if len(self.active) + len(self.waiting) + len(requests) > self.slots + self.max_queue:
                raise QueueFull("all slots are busy and the queue is full")
            handles = [Handle(r, (lambda e, i=i: on_event(i, e))) for i, r in enumerate(requests)]
            self.waiting.extend(handles)
            self.wakeup.notify()
        return handles

    def load(self) -> dict[str, int]:
        """Return the numbers of active and waiting sequences."""
        with self.lock:
            return {"active": len(self.active), "waiting": len(self.waiting)}

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (draining)."""
        with self.lock:
            self.accepting = False

    def idle(self) -> bool:
        """Return True when no sequence is active or waiting."""
        with self.lock:
            return not self.active and not self.waiting

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight sequences finish (up to `timeout` s), stop the thread."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        while not self.idle() and time.monotonic() < deadline and self.thread is not None:
            time.sleep(0.02)
        with self.lock:
            self.stopped = True
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join(timeout=5)

    # --- scheduler side -------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.lock:
                while not self.stopped and not self.active and not self.waiting:
                    self.wakeup.wait(timeout=0.5)
                if self.stopped:
                    remaining = [s.handle for s in self.active] + list(self.waiting)
                    self.active, self.waiting = [], deque()
                    break
                if any(h.cancelled for h in self.waiting):
                    self.waiting = deque(h for h in self.waiting if not h.cancelled)
                admit = []
                while self.waiting and len(self.active) + len(admit) < self.slots:
                    admit.append(self.waiting.popleft())
            try:
                with torch.inference_mode():
                    for handle in admit:
                        self._admit(handle)
                    self._drop_cancelled()
                    if self.active:
                        self._step()
            except Exception as e:  # a bug: fail every in-flight request instead of hanging them
                self.error = e
                with self.lock:
                    failed = [s.handle for s in self.active]
                    self.active = []
                for handle in failed:
                    handle.on_event(Event("", None, finish_reason="error"))
        for handle in remaining:
            handle.on_event(Event("", None, finish_reason="error"))

    def _admit(self, handle: Handle) -> None:
        # Prefill into the next free row; the first token is sampled from its last logits.
        if handle.cancelled:
            return
        seq = _Sequence(handle, self.tokenizer, self.model.config.vocab_size, self.device)
        row = len(self.active)
        prompt = torch.tensor([seq.request.prompt], dtype=torch.long, device=self.device)
        self.cache.prefill_row = row
        try:
            hidden = self.model(prompt, cache=self.cache, start=0, return_hidden=True)  # (1, L, C)
        finally:
            self.cache.prefill_row = None
        logits = self.model.lm_head(hidden[:, -1])  # (1, V)
        self.active.append(seq)
        self._emit([seq], logits)

    def _drop_cancelled(self) -> None:
        keep = [s for s in self.active if not s.handle.cancelled and not s.handle.finished]
        if len(keep) == len(self.active):
            return
        # Compact: the surviving rows move down in order, so rows stay 0..n-1.
        old_rows = {id(s): i for i, s in enumerate(self.active)}
        for new_row, seq in enumerate(keep):
            old_row = old_rows[id(seq)]
            if old_row != new_row:
                self.cache.move(old_row, new_row)
        self.active = keep

    def _step(self) -> None:
        # One decode step: run every active row's pending token at its own position.
        seqs = self.active
        n = len(seqs)
        tokens = torch.tensor([[s.pending] for s in seqs], device=self.device)  # (n, 1)
        positions = torch.tensor([s.length for s in seqs], device=self.device)  # (n,)
        width = int(positions.max()) + 1
        self.cache.rows, self.cache.positions, self.cache.width = n, positions, width
        columns = torch.arange(width, device=self.device)
        mask = (columns[None, :] <= positions[:, None]).view(n, 1, 1, width)  # (n, 1, 1, W)
        logits = self.model(
            tokens, cache=self.cache, start=0, position_ids=positions[:, None], mask=mask
        )[:, -1]  # (n, V)
        for seq in seqs:
            seq.length += 1
        self.steps += 1
        self._emit(seqs, logits)
        self._drop_cancelled()

    def _emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        # Sample each row's next token, then tell its requester (text delta, finish reason).
        greedy_rows = [i for i, s in enumerate(seqs) if s.plain_greedy]
        chosen: list[int] = [0] * len(seqs)
        if greedy_rows:
            argmax = logits.argmax(dim=-1).tolist()
            for i in greedy_rows:
                chosen[i] = argmax[i]
        for i, seq in enumerate(seqs):
            if not seq.plain_greedy:
                row = logits[i : i + 1]
                chosen[i] = int(
                    sample_next(row, seq.request.params, seq.generator, seq.seen, seq.counts)[0]
                )
        log_probs = None
        if any(s.request.logprobs is not None for s in seqs):
            log_probs = logits.float().log_softmax(dim=-1)  # (n, V)
        for i, seq in enumerate(seqs):
            self._deliver(seq, chosen[i], None if log_probs is None else log_probs[i])

    def _deliver(self, seq: _Sequence, token: int, log_probs: torch.Tensor | None) -> None:
        handle = seq.handle
        if handle.cancelled:
            return
        if handle.first_token_at is None:
            handle.first_token_at = time.monotonic()
        logprob = top = None
        if log_probs is not None and seq.request.logprobs is not None:
            logprob = _finite(float(log_probs[token]))
            if seq.request.logprobs > 0:
                values, ids = log_probs.topk(seq.request.logprobs)
                top = [(int(t), _finite(float(v))) for t, v in zip(ids, values)]
        if token in seq.stop_ids:
            handle.finished = True
            handle.on_event(Event(seq.stream.finish(), None, finish_reason="stop"))
            return
        seq.generated += 1
        handle.completion_tokens = seq.generated
        self.tokens_generated += 1
        text = seq.stream.push(token)
        finish = None
        if seq.stream.stopped:
            finish = "stop"
        elif seq.generated >= seq.request.max_tokens or seq.length >= self.context:
            finish = "length"
            text += seq.stream.finish()
        handle.on_event(Event(text, token, logprob, top, finish_reason=finish))
        if finish is not None:
            handle.finished = True
            return
        seq.pending = token
        if seq.seen is not None:
            seq.seen[0, token] = True
            seq.counts[0, token] += 1


def _finite(value: float) -> float:
    # JSON has no -inf; OpenAI reports impossible tokens as a very negative number.
    return value if math.isfinite(value) else -9999.0
