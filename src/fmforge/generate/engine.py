"""Text generation: prefill and one-token decode steps over a preallocated KV cache; streaming.

Layers, bottom to top:
- `prefill` / `decode_one_token`: one forward pass each, returning next-token logits (B, V).
- `iter_tokens`: the decode loop for one or several prompts of different lengths. Prompts are
  left-padded to a common length; RoPE positions (`position_ids`) count from each prompt's first
  real token and a key mask hides the padding, so every row equals generating that prompt alone.
- `generate_tokens`: collects the loop's tokens per prompt, cut at the first stop id.
- `generate_naive`: the test oracle: a full uncached forward pass for every new token.
- `TextStream`: token ids -> text deltas that never split a UTF-8 character and never show a stop
  string (or any prefix of one that might still complete).
- `generate_text` / `chat_text`: what `fmforge.load(...).generate(...)` and `.chat(...)` call.

Notation: B batch, L padded prompt length, S cache length, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fmforge.errors import UserError
from fmforge.generate.sampling import SamplingParams, sample_next
from fmforge.model.kv_cache import KVCache

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class Generation:
    """The new tokens of one prompt (stop token excluded) and why generation ended."""

    tokens: list[int]
    finish_reason: str  # "stop" (a stop id was produced) or "length" (max_new_tokens reached)


# ---------------------------------------------------------------------------------------------
# One forward pass each.
# ---------------------------------------------------------------------------------------------


def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: KVCache,
    position_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the prompt (B, L) into cache slots 0..L; return the last position's logits (B, V)."""
    hidden = model(
        input_ids, cache=cache, start=0, position_ids=position_ids, mask=mask, return_hidden=True
    )  # (B, L, C)
    return model.lm_head(hidden[:, -1])  # only the last position is needed: (B, V)


def decode_one_token(
    model: torch.nn.Module,
    token: torch.Tensor,
    cache: KVCache,
    slot: int,
    position_ids: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    weights: Any = None,
) -> torch.Tensor:
    """Run one token per row (B, 1) into cache slot `slot`; return next-token logits (B, V).

    weights: the model's `decode_weights()`, fetched once per generation (None: plain forward).
    """
    return model.decode_step(token, cache, slot, weights, position_ids=position_ids, mask=mask)


# ---------------------------------------------------------------------------------------------
# The decode loop.
# ---------------------------------------------------------------------------------------------


def check_lengths(
    model: torch.nn.Module, prompt_lengths: Sequence[int], max_new: int | None
) -> int:
    """Return the number of new tokens to generate; UserError for an empty or too-long request.

    max_new=None means DEFAULT_MAX_NEW_TOKENS, shortened to fit the context.
    """
    context = model.config.max_position_embeddings
    if max_new is None:
        room = context - max(prompt_lengths, default=0)
        max_new = max(min(DEFAULT_MAX_NEW_TOKENS, room), 1)
    if max_new < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new}")
    if not prompt_lengths or min(prompt_lengths) == 0:
        raise UserError("the prompt is empty; give some text to continue")
    longest = max(prompt_lengths)
    if longest + max_new > context:
        raise UserError(
            f"prompt of {longest} tokens + --max-new-tokens {max_new} exceeds the model's context "
            f"of {context} tokens; lower --max-new-tokens to at most {max(context - longest, 0)}"
        )
    return max_new


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    # Without a seed, draw one from torch's global RNG: torch.manual_seed then fixes the output.
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    return torch.Generator(device=device).manual_seed(seed)


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device):
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    pad = width - lengths  # (B,): padding slots before each prompt
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
    return input_ids, pad


def iter_tokens(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | None = None,
    params: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
) -> Iterator[list[int]]:
    """Yield the next token of every prompt, one list of B ids per step.

    Stops after `max_new_tokens` steps or once every row has produced a stop id; rows that
    stopped earlier keep yielding (ignored) tokens until then.
    """
    params = params or SamplingParams()
    max_new_tokens = check_lengths(model, [len(p) for p in prompts], max_new_tokens)
    device = next(model.parameters()).device
    batch = len(prompts)
    input_ids, pad = _left_pad(prompts, device)  # (B, L), (B,)
    width = input_ids.shape[1]
    total = width + max_new_tokens
    stops = set(stop_token_ids)
    generator = None
    if not params.greedy:
        generator = _generator(seed, device)
    seen = counts = None
    if params.uses_penalties:
        vocab = model.config.vocab_size
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            seen[row, torch.tensor(prompt, dtype=torch.long, device=device)] = True
        counts = torch.zeros(batch, vocab, dtype=torch.long, device=device)

    padded = bool(pad.any())
    positions = key_mask = None
    prefill_mask = None
    if padded:
        slots = torch.arange(total, device=device)
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, S): RoPE position per slot
        key_mask = (slots[None, :] >= pad[:, None]).view(batch, 1, 1, total)  # (B, 1, 1, S)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()  # (L, L)
        # A padding query sees only itself, so no softmax row is empty (NaN would reach the cache).
        own = torch.eye(width, dtype=torch.bool, device=device)
        prefill_mask = causal & (key_mask[..., :width] | own)  # (B, 1, L, L)

    was_training = model.training
    model.eval()
    # inference_mode is entered per step, never held across a `yield`: the caller's code between
    # steps must run in its own grad mode.
    try:
        with torch.inference_mode():
            cache = model.new_cache(batch, total)
            logits = prefill(
                model,
                input_ids,
                cache,
                position_ids=positions[:, :width] if padded else None,
                mask=prefill_mask,
            )
            weights = model.decode_weights()
        fast_greedy = params.greedy and seen is None and not params.logit_bias
        done = [False] * batch
        for step in range(max_new_tokens):
            with torch.inference_mode():
                if fast_greedy:
                    token = logits.argmax(dim=-1)  # (B,)
                else:
                    token = sample_next(logits, params, generator, seen, counts)
                    if seen is not None:
                        seen.scatter_(1, token[:, None], True)
                        counts.scatter_add_(1, token[:, None], torch.ones_like(token[:, None]))
            values = token.tolist()
            yield values
            if stops:
                done = [d or v in stops for d, v in zip(done, values)]
                if all(done):
                    return
            if step == max_new_tokens - 1:
                return
            slot = width + step
            with torch.inference_mode():
                logits = decode_one_token(
                    model,
                    token.view(batch, 1),
                    cache,
                    slot,
                    position_ids=positions[:, slot : slot + 1] if padded else None,
                    mask=key_mask[..., : slot + 1] if padded else None,
                    weights=weights,
                )
    finally:
        model.train(was_training)


def _collect(steps: Iterator[list[int]], batch: int, stop_token_ids: Sequence[int]):
    stops = set(stop_token_ids)
    results = [Generation([], "length") for _ in range(batch)]
    for values in steps:
        for row, value in enumerate(values):
            result = results[row]
            if result.finish_reason == "stop":
                continue
            if value in stops:
                result.finish_reason = "stop"
            else:
                result.tokens.append(value)
    return results


def generate_tokens(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | None = None,
    params: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
) -> list[Generation]:
    """Return the new tokens of each prompt (with the KV cache, batched)."""
    steps = iter_tokens(model, prompts, max_new_tokens, params, stop_token_ids, seed)
    return _collect(steps, len(prompts), stop_token_ids)


def generate_naive(
    model: torch.nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int | None = None,
    params: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
) -> Generation:
    """Return the new tokens of one prompt, re-running the whole sequence each step (the oracle)."""
    params = params or SamplingParams()
    max_new_tokens = check_lengths(model, [len(prompt)], max_new_tokens)
    device = next(model.parameters()).device
    generator = None
    if not params.greedy:
        generator = _generator(seed, device)
    ids = list(prompt)
    vocab = model.config.vocab_size
    seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
    seen[0, torch.tensor(ids, device=device)] = True
    counts = torch.zeros(1, vocab, dtype=torch.long, device=device)
    result = Generation([], "length")
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids], device=device))[:, -1]  # (1, V)
            token = int(sample_next(logits, params, generator, seen, counts)[0])
            if token in stop_token_ids:
                result.finish_reason = "stop"
                break
            result.tokens.append(token)
            ids.append(token)
            seen[0, token] = True
            counts[0, token] += 1
    return result


# ---------------------------------------------------------------------------------------------
# Text.
# ---------------------------------------------------------------------------------------------


class TextStream:
    """Turn generated token ids into text deltas.

    A delta never ends inside a UTF-8 character (byte-level tokens can split one: the decoder then
    shows U+FFFD, which is held back until the next token completes the character), and never
    shows a stop string or a tail that could still grow into one. After a stop string, `stopped`
    is True and the text before it has been emitted.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.text = ""  # decoded text of the committed tokens
        self.pending: list[int] = []  # tokens whose text may still end mid-character
        self.emitted = 0  # characters of text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now final (possibly "")."""
        if self.stopped:
            return ""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if not piece.endswith("\ufffd"):
            self.text += piece
            self.pending.clear()
            piece = ""
        full = self.text + piece
        for stop in self.stop:
            # Anything before `emitted` held no stop string, so search only from there.
            index = full.find(stop, max(self.emitted - len(stop) + 1, 0))
            if index != -1:
                self.stopped = True
                self.text, self.pending = full[:index], []
                return self._emit(index)
        safe = len(self.text)  # the undecodable tail (piece) is never safe
        safe -= self._stop_prefix_length(self.text)
        return self._emit(max(safe, self.emitted))

    def finish(self) -> str:
        """Return whatever is still held back (generation ended without a stop string)."""
        if self.stopped:
            return ""
        if self.pending:
            self.text += self.tokenizer.decode(self.pending, skip_special_tokens=True)
            self.pending.clear()
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        delta = self.text[self.emitted : end]
        self.emitted = max(end, self.emitted)
        return delta

    def _stop_prefix_length(self, text: str) -> int:
        # The longest tail of `text` that is a proper prefix of some stop string.
        best = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best


def _params(kwargs: dict[str, Any]) -> SamplingParams:
    names = (
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
    )
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise TypeError(f"unexpected generation arguments: {unknown}")
    return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})


def _stop_ids(tokenizer: Any, extra: Sequence[int] = ()) -> list[int]:
    ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    return ids + [i for i in extra if i not in ids]


def _texts(
    loaded: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams,
    stop_ids: list[int],
    stop: Sequence[str],
    seed: int | None,
) -> Iterator[list[str]]:
    # Yields one list of text deltas (one per prompt) per step, then the held-back tails.
    streams = [TextStream(loaded.tokenizer, stop) for _ in prompts]
    stop_set = set(stop_ids)
    finished = [False] * len(prompts)
    steps = iter_tokens(loaded.model, prompts, max_new_tokens, params, stop_ids, seed)
    try:
        for values in steps:
            deltas = []
            for row, (stream, value) in enumerate(zip(streams, values)):
                if finished[row]:
                    deltas.append("")
                elif value in stop_set:
                    finished[row] = True
                    deltas.append(stream.finish())
                else:
                    deltas.append(stream.push(value))
                    finished[row] = stream.stopped
            yield deltas
            if all(finished):
                return
        yield [stream.finish() for stream in streams]
    finally:
        steps.close()


def _run(
    loaded: Any,
    prompts: list[list[int]],
    stream: bool,
    max_new_tokens: int | None,
    stop_ids: list[int],
    stop: str | Sequence[str] | None,
    seed: int | None,
    sampling: dict[str, Any],
) -> Any:
    params = _params(sampling)
    stop_strings = [stop] if isinstance(stop, str) else list(stop or [])
    max_new_tokens = check_lengths(loaded.model, [len(p) for p in prompts], max_new_tokens)
    steps = _texts(loaded, prompts, max_new_tokens, params, stop_ids, stop_strings, seed)
    if stream:
        if len(prompts) != 1:
            raise UserError("stream=True takes a single prompt")
        return (deltas[0] for deltas in steps if deltas[0])
    pieces: list[list[str]] = [[] for _ in prompts]
    for deltas in steps:
        for row, delta in enumerate(deltas):
            pieces[row].append(delta)
    return ["".join(p) for p in pieces]


def _require_tokenizer(loaded: Any) -> Any:
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.source or 'this model'} has no tokenizer.json; cannot take text")
    return loaded.tokenizer


def generate_text(
    loaded: Any,
    prompt: str | list[str],
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stream: bool = False,
    stop_token_ids: Sequence[int] = (),
    **sampling: Any,
) -> str | list[str] | Iterator[str]:
    """Return the continuation of `prompt` (a list of prompts gives a list, run as one batch).

    Greedy when temperature is 0. Generation ends at EOS (or a `stop_token_ids` id), after
    `max_new_tokens`, or at a `stop` string, which is not returned. stream=True returns an
    iterator of text deltas instead. Extra keywords: repetition_penalty, presence_penalty,
    frequency_penalty, logit_bias ({token id: bias}).
    """
    tokenizer = _require_tokenizer(loaded)
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [tokenizer.encode(t) for t in texts]
    sampling.update(temperature=temperature, top_k=top_k, top_p=top_p)
    out = _run(
        loaded,
        prompts,
        stream,
        max_new_tokens,
        _stop_ids(tokenizer, stop_token_ids),
        stop,
        seed,
        sampling,
    )
    return out[0] if isinstance(prompt, str) and not stream else out


def chat_text(
    loaded: Any,
    messages: list[dict[str, str]],
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stream: bool = False,
    **sampling: Any,
) -> str | Iterator[str]:
    """Return the assistant's reply to `messages` (role/content dicts), ending at end-of-turn."""
    from fmforge.chat_template import template_for

    tokenizer = _require_tokenizer(loaded)
    template = template_for(tokenizer)
    prompt = template.render(tokenizer, messages)
    sampling.update(temperature=temperature, top_k=top_k, top_p=top_p)
    stop_ids = _stop_ids(tokenizer, template.stop_ids(tokenizer))
    out = _run(loaded, [prompt], stream, max_new_tokens, stop_ids, stop, seed, sampling)
    return out if stream else out[0]
