"""The one generation scheduler: many sequences decoded together over one KV cache.

`generate`, `chat`, `fmforge.load(...).generate(...)` (generate/engine.py), the adaptation lab and
the server all run `Scheduler.step`; the server only adds a thread and transport (serve/engine.py).

Every admitted sequence owns one row of a preallocated KV cache and sits at its own position in
it. Each `step()`:
1. drops finished and cancelled sequences (their rows become free) and admits waiting requests
   into free rows (continuous batching: requests join and leave between steps);
2. builds one batch of model rows: the pending token of every decoding sequence, plus prompt
   tokens of sequences still prefilling, in chunks (chunked prefill). While sequences decode, a
   step takes only as many prompt tokens as keep it within `prefill_stall` of a plain decode step,
   so a long prompt is spread over many steps and never stalls the running streams; a short one
   (`WHOLE_PROMPT` tokens, a chat turn) runs whole, so a new request starts at once;
3. runs the batch as one `decode_step` (each weight read once for all rows; each row at its own
   cache row and position, see model/kv_cache.CacheRows) and samples every sequence whose logits
   came out, each with its own sampling state (generator, penalties, stop ids and strings).
A sequence's results do not depend on which others share its steps: the native kernels compute
each row bitwise alike whatever the batch, the torch ops to float rounding.

Notation: N rows in a step, V vocab.
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

from fmforge.errors import UserError
from fmforge.generate.sampling import SamplingParams, sample_next
from fmforge.generate.stream import TextStream
from fmforge.model.kv_cache import CacheRows, KVCache

MAX_STEP_ROWS = 256  # prompt tokens run in one step when no sequence is decoding
PREFILL_STALL = 0.5  # while sequences decode, prompt rows may add this fraction to a step's time
WHOLE_PROMPT = 64  # a prompt with at most this many tokens left runs whole in the next step


@dataclass
class Request:
    """One sequence to generate: a prompt, how to sample it and when to stop."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: Sequence[int] = ()
    stop: Sequence[str] = ()  # stop strings (need the scheduler's tokenizer)
    seed: int | None = None  # None: drawn from torch's global RNG (torch.manual_seed fixes it)
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token + top-k alternatives


@dataclass
class Event:
    """What one step produced for a sequence (sent to its `on_event`)."""

    text: str  # the new, final text (may be ""; always "" without a tokenizer)
    token: int | None  # the sampled token id (None when a stop id or an error ends it)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # on the last event: "stop", "length" or "error"


class SequenceState:
    """One request inside the scheduler: its cache row, progress and own sampling state.

    The requester holds it as a handle: `cancel()` drops it at the next step.
    """

    def __init__(self, request: Request, on_event: Callable[[Event], None]) -> None:
        self.request = request
        self.on_event = on_event
        self.cancelled = False
        self.finished = False
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self.row = -1  # cache row, once admitted
        self.length = 0  # tokens in the cache
        self.pending: int | None = None  # the sampled token not yet run through the model
        self.stream: TextStream | None = None
        self.generator: torch.Generator | None = None
        self.seen = self.counts = None  # penalties: (1, V) tokens seen, output counts

    def cancel(self) -> None:
        """Ask the scheduler to drop this sequence at its next step (the client went away)."""
        self.cancelled = True

    def _start(self, row: int, tokenizer: Any, vocab: int, device: torch.device) -> None:
        request = self.request
        self.row = row
        if tokenizer is not None:
            self.stream = TextStream(tokenizer, request.stop)
        if not request.params.greedy:
            seed = request.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            self.generator = torch.Generator(device=device).manual_seed(seed)
        if request.params.uses_penalties:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(request.prompt, device=device)] = True
            self.counts = torch.zeros(1, vocab, dtype=torch.long, device=device)

    @property
    def plain_greedy(self) -> bool:
        params = self.request.params
        return params.greedy and self.seen is None and not params.logit_bias


class Scheduler:
    """Continuous batching of requests over `slots` rows of one KV cache (see the module doc).

    `add` may be called from any thread; `step` from one thread at a time.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        slots: int = 4,
        max_len: int | None = None,
        max_step_rows: int = MAX_STEP_ROWS,
        prefill_stall: float = PREFILL_STALL,
    ) -> None:
        if slots < 1 or max_step_rows < 1:
            raise ValueError("slots and max_step_rows must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.slots = slots
        self.max_len = max_len or model.config.max_position_embeddings
        self.max_step_rows = max_step_rows
        self.prefill_stall = prefill_stall
        self.device = model.lm_head.weight.device
        self.cache: KVCache | None = None  # allocated by the first step
        self.free_rows = list(range(slots))
        self.waiting: deque[SequenceState] = deque()
        self.active: list[SequenceState] = []
        self.lock = threading.Lock()
        self.weights: Any = None  # the model's decode_weights(), fetched when sequences join
        self.steps = 0
        self.tokens_generated = 0
        self.decode_seconds: dict[int, float] = {}  # decode rows -> moving average of a step
        self.row_seconds: float | None = None  # moving average of one prompt row's extra time

    # --- requester side ------------------------------------------------------------------------

    def add(
        self, requests: Sequence[Request], on_event: Callable[[int, Event], None]
    ) -> list[SequenceState]:
        """Queue requests (all or none); `on_event(i, event)` receives request i's events."""
        for request in requests:
            if not request.prompt:
                raise UserError("the prompt is empty; give some text to continue")
            if len(request.prompt) > self.max_len:
                raise UserError(
                    f"prompt of {len(request.prompt)} tokens exceeds the context of "
                    f"{self.max_len} tokens"
                )
        states = [SequenceState(r, lambda e, i=i: on_event(i, e)) for i, r in enumerate(requests)]
        with self.lock:
            self.waiting.extend(states)
        return states

    def load(self) -> dict[str, int]:
        """Return the numbers of active and waiting sequences."""
        with self.lock:
            return {"active": len(self.active), "waiting": len(self.waiting)}

    def has_work(self) -> bool:
        """Return True while a sequence is active or waiting."""
        with self.lock:
            return bool(self.active or self.waiting)

    def fail_all(self) -> None:
        """End every active and waiting sequence with finish_reason "error" (a failed step)."""
        with self.lock:
            failed = [s for s in self.active if not s.finished] + list(self.waiting)
            self.waiting.clear()
            for seq in self.active:
                self.free_rows.append(seq.row)
            self.active = []
        for seq in failed:
            seq.finished = True
            if not seq.cancelled:
                seq.on_event(Event("", None, finish_reason="error"))

    # --- one step ------------------------------------------------------------------------------

    def step(self) -> None:
        """Admit, run one batch of decode and prompt rows, sample, and send the events."""
        admitted = self._admit()
        if not self.active:
            return
        self.steps += 1
        with torch.inference_mode():
            if admitted or self.cache is None:
                self.weights = self.model.decode_weights()
            if self.cache is None:
                self.cache = self._new_cache()
            owners, logits = self._run()
            if owners:
                self._sample(owners, logits)
        with self.lock:
            self._release()

    def _release(self) -> None:
        # Free the rows of finished and cancelled sequences (call under the lock).
        kept = []
        for seq in self.active:
            if seq.finished or seq.cancelled:
                self.free_rows.append(seq.row)
            else:
                kept.append(seq)
        self.active = kept

    def _admit(self) -> bool:
        with self.lock:
            self._release()
            admitted = False
            while self.waiting and self.free_rows:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    continue
                seq._start(self.free_rows.pop(0), self.tokenizer, self.vocab, self.device)
                self.active.append(seq)
                admitted = True
            return admitted

    @property
    def vocab(self) -> int:
        return self.model.config.vocab_size

    def _new_cache(self) -> KVCache:
        c = self.model.config
        # The native kernels read only each row's own positions: untouched memory stays
        # uncommitted. The torch ops read up to the longest row under a mask: zeros, not garbage.
        native = getattr(self.weights, "kernel", None) is not None
        return KVCache(
            c.num_hidden_layers,
            self.slots,
            c.num_key_value_heads,
            self.max_len,
            c.head_dim,
            dtype=self.model.lm_head.weight.dtype,
            device=self.device,
            zeroed=not native,
        )

    def _prefill_budget(self, decoding: int) -> int:
        # Prompt rows this step may take: all it can when nothing decodes, else as many as keep
        # the step within prefill_stall of a plain decode step (measured moving averages).
        if decoding == 0:
            return self.max_step_rows
        decode_seconds = self.decode_seconds.get(decoding)
        if decode_seconds is None or self.row_seconds is None:
            return max(self.max_step_rows // 16, 1)
        rows = int(self.prefill_stall * decode_seconds / self.row_seconds)
        return min(max(rows, 1), self.max_step_rows)

    def _run(self) -> tuple[list[SequenceState], torch.Tensor]:
        # One batch: every decoding sequence's pending token, then prompt chunks.
        decoding = [s for s in self.active if s.pending is not None]
        budget = self._prefill_budget(len(decoding))
        tokens: list[int] = [s.pending for s in decoding]
        rows = [s.row for s in decoding]
        positions = [s.length for s in decoding]
        owners = list(decoding)  # sequences that get logits this step, in logit-row order
        logit_rows = list(range(len(decoding)))
        chunks = []  # (sequence, start, count) of prompt tokens
        whole = min(WHOLE_PROMPT, self.max_step_rows)
        room = self.max_step_rows  # prompt rows in this step, at most
        for seq in self.active:
            left = len(seq.request.prompt) - seq.length
            if seq.pending is not None or left <= 0:
                continue
            # A short remainder (a chat turn) runs whole, so it starts at once; longer prompts
            # get the budget, a chunk per step.
            count = min(left, room) if left <= whole else min(budget, left, room)
            if count <= 0:
                continue
            chunks.append((seq, seq.length, count))
            budget -= count
            room -= count
        start_time = time.perf_counter()
        if self.weights is None:  # plain forward (an adapter wraps a projection)
            logits = self._run_forward(decoding, tokens, rows, positions, chunks, owners)
        else:
            for seq, start, count in chunks:
                tokens += seq.request.prompt[start : start + count]
                rows += [seq.row] * count
                positions += range(start, start + count)
                if start + count == len(seq.request.prompt):
                    owners.append(seq)
                    logit_rows.append(len(tokens) - 1)
            view = CacheRows(self.cache, rows, positions)
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
            logits = self.model.decode_step(
                ids,
                view,
                view.width - 1,
                self.weights,
                position_ids=None if view.uniform else view.positions.view(-1, 1),
                logit_rows=None
                if len(logit_rows) == len(tokens)
                else torch.tensor(logit_rows, dtype=torch.long, device=self.device),
            )  # (len(owners), V)
        self._time(time.perf_counter() - start_time, len(decoding), len(tokens) - len(decoding))
        for seq in decoding:
            seq.length += 1
        for seq, start, count in chunks:
            seq.length = start + count
        return owners, logits

    def _run_forward(self, decoding, tokens, rows, positions, chunks, owners) -> torch.Tensor:
        # The same steps through `forward`: decode rows together, each prompt chunk on its own.
        parts = []
        if decoding:
            view = CacheRows(self.cache, rows, positions)
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
            parts.append(
                self.model.decode_step(
                    ids,
                    view,
                    view.width - 1,
                    None,
                    position_ids=view.positions.view(-1, 1),
                    mask=view.key_mask(),
                )
            )
        for seq, start, count in chunks:
            ids = torch.tensor([seq.request.prompt[start : start + count]], device=self.device)
            mask = None
            if start > 0:  # the chunk's queries see the cached prompt and themselves causally
                mask = torch.ones(count, start + count, dtype=torch.bool, device=self.device)
                mask = mask.tril(diagonal=start)[None, None]  # (1, 1, T, S)
            view = CacheRows(self.cache, [seq.row], [start])
            hidden = self.model(ids, cache=view, start=start, mask=mask, return_hidden=True)
            if start + count == len(seq.request.prompt):
                owners.append(seq)
                parts.append(self.model.lm_head(hidden[:, -1]))  # (1, V)
        return torch.cat(parts) if parts else torch.empty(0)

    def _time(self, seconds: float, decode_rows: int, prompt_rows: int) -> None:
        # Moving averages behind _prefill_budget.
        def average(old: float | None, new: float) -> float:
            return new if old is None else 0.8 * old + 0.2 * new

        decode_seconds = self.decode_seconds.get(decode_rows)
        if prompt_rows == 0:
            self.decode_seconds[decode_rows] = average(decode_seconds, seconds)
        elif decode_rows == 0:
            self.row_seconds = average(self.row_seconds, seconds / prompt_rows)
        elif decode_seconds is not None:
            extra = max(seconds - decode_seconds, 1e-6) / prompt_rows
            self.row_seconds = average(self.row_seconds, extra)

    def _sample(self, owners: list[SequenceState], logits: torch.Tensor) -> None:
        # Each sequence's next token under its own sampling state, then its event.
        chosen: list[int] = [0] * len(owners)
        if any(s.plain_greedy for s in owners):
            chosen = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(owners):
            if not seq.plain_greedy:
                params = seq.request.params
                token = sample_next(logits[i : i + 1], params, seq.generator, seq.seen, seq.counts)
                chosen[i] = int(token[0])
        log_probs = None
        if any(s.request.logprobs is not None for s in owners):
            log_probs = logits.float().log_softmax(dim=-1)  # (N, V)
        for i, seq in enumerate(owners):
            self._deliver(seq, chosen[i], None if log_probs is None else log_probs[i])

    def _deliver(self, seq: SequenceState, token: int, log_probs: torch.Tensor | None) -> None:
        if seq.cancelled:
            return
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        stream = seq.stream
        if token in seq.request.stop_ids:
            seq.finished = True
            seq.on_event(Event(stream.finish() if stream else "", None, finish_reason="stop"))
            return
        logprob = top = None
        wanted = seq.request.logprobs
        if log_probs is not None and wanted is not None:
            logprob = _finite(float(log_probs[token]))
            if wanted > 0:
                values, ids = log_probs.topk(wanted)
                top = [(int(t), _finite(float(v))) for t, v in zip(ids, values)]
        seq.completion_tokens += 1
        self.tokens_generated += 1
        text = stream.push(token) if stream else ""
        finish = None
        if stream is not None and stream.stopped:
            finish = "stop"
        elif seq.completion_tokens >= seq.request.max_tokens or seq.length >= self.max_len:
            finish = "length"
            text += stream.finish() if stream else ""
        if finish is not None:
            seq.finished = True
        else:
            seq.pending = token
            if seq.seen is not None:
                seq.seen[0, token] = True
                seq.counts[0, token] += 1
        seq.on_event(Event(text, token, logprob, top, finish_reason=finish))


def _finite(value: float) -> float:
    # JSON has no -inf; OpenAI reports impossible tokens as a very negative number.
    return value if math.isfinite(value) else -9999.0
