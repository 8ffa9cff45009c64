"""The server's side of the one generation scheduler (generate/scheduler.py): a thread and a queue.

The scheduler does all the decoding: continuous batching, chunked prefill, sampling, stop ids and
strings. This adapter only runs `Scheduler.step` on a background thread while there is work,
bounds the waiting queue (`QueueFull` -> 429), refuses new work while draining (`NotAccepting`
-> 503), and fails in-flight requests with an "error" event if a step ever raises, instead of
hanging them. Events go to the callbacks the app passes, which hand them to the event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fmforge.generate.scheduler import Event, Request, Scheduler, SequenceState


class QueueFull(Exception):
    """Every slot is busy and the waiting queue holds `max_queue` requests."""


class NotAccepting(Exception):
    """The engine is draining (shutting down) and admits no new request."""


class BatchEngine:
    """Runs a `Scheduler` of `slots` rows on its own thread for the server's requests."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, slots: int = 4, max_queue: int = 16
    ) -> None:
        if slots < 1 or max_queue < 0:
            raise ValueError("slots must be >= 1 and max_queue >= 0")
        self.scheduler = Scheduler(model, tokenizer, slots=slots)
        self.slots = slots
        self.max_queue = max_queue
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.accepting = True
        self.stopped = False
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    @property
    def steps(self) -> int:
        """Scheduler steps run (for /metrics)."""
        return self.scheduler.steps

    @property
    def tokens_generated(self) -> int:
        """Tokens generated (for /metrics)."""
        return self.scheduler.tokens_generated

    def start(self) -> None:
        """Start the scheduler thread."""
        self.thread = threading.Thread(target=self._loop, name="fmforge-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> SequenceState:
        """Queue a request; return its handle (`.cancel()`). Raises QueueFull or NotAccepting."""
        return self.submit_many([request], on_event=lambda i, e: on_event(e))[0]

    def submit_many(
        self, requests: Sequence[Request], on_event: Callable[[int, Event], None]
    ) -> list[SequenceState]:
        """Queue several requests atomically (all or none); `on_event(i, event)` per request."""
        with self.lock:
            if not self.accepting:
                raise NotAccepting("the server is shutting down")
            load = self.scheduler.load()
            if load["active"] + load["waiting"] + len(requests) > self.slots + self.max_queue:
                raise QueueFull("all slots are busy and the queue is full")
            handles = self.scheduler.add(requests, on_event)
            self.wakeup.notify()
        return handles

    def load(self) -> dict[str, int]:
        """Return the numbers of active and waiting sequences."""
        return self.scheduler.load()

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (draining)."""
        with self.lock:
            self.accepting = False

    def idle(self) -> bool:
        """Return True when no sequence is active or waiting."""
        return not self.scheduler.has_work()

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
        self.scheduler.fail_all()  # whatever did not finish in time

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.stopped and not self.scheduler.has_work():
                    self.wakeup.wait(timeout=0.5)
                if self.stopped:
                    return
            try:
                self.scheduler.step()
            except Exception as e:  # a bug: fail every in-flight request instead of hanging them
                self.error = e
                self.scheduler.fail_all()
