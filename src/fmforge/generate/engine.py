"""Generation entry points of the library, all on the one scheduler (generate/scheduler.py).

- `token_budget`: the one rule for how many new tokens a prompt gets (library and server).
- `run_requests`: run requests to completion on a scheduler in the caller's thread.
- `generate_tokens`: token ids in, new token ids out, batched.
- `generate_text` / `chat_text`: what `fmforge.load(...).generate(...)` and `.chat(...)` call;
  `chat_prompt` is the one chat-prompt assembly (the server uses it too).
- `generate_naive`: the test oracle: a full uncached forward pass for every new token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from fmforge.errors import UserError
from fmforge.generate.sampling import SamplingParams, sample_next
from fmforge.generate.scheduler import Event, Request, Scheduler

DEFAULT_MAX_NEW_TOKENS = 256  # when a request names no budget (shortened to fit the context)


@dataclass
class Generation:
    """The new tokens of one prompt (stop token excluded) and why generation ended."""

    tokens: list[int]
    finish_reason: str  # "stop" (a stop id was produced) or "length" (max_new_tokens reached)


def token_budget(
    context: int, prompt_tokens: int, requested: int | None, default: int = DEFAULT_MAX_NEW_TOKENS
) -> int:
    """Return the new-token budget of a prompt: `requested`, or `default` cut to the context.

    The one rule of the library and the server. UserError when the prompt is empty, the
    budget < 1, or prompt + budget exceeds the context.
    """
    if requested is None:
        requested = max(min(default, context - prompt_tokens), 1)
    if requested < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {requested}")
    if prompt_tokens == 0:
        raise UserError("the prompt is empty; give some text to continue")
    if prompt_tokens + requested > context:
        raise UserError(
            f"prompt of {prompt_tokens} tokens + --max-new-tokens {requested} exceeds the "
            f"model's context of {context} tokens; lower --max-new-tokens to at most "
            f"{max(context - prompt_tokens, 0)}"
        )
    return requested


def check_lengths(
    model: torch.nn.Module, prompt_lengths: Sequence[int], max_new: int | None
) -> int:
    """Return the number of new tokens to generate for every prompt (`token_budget` of the
    longest); UserError for an empty or too-long request."""
    if not prompt_lengths or min(prompt_lengths) == 0:
        raise UserError("the prompt is empty; give some text to continue")
    return token_budget(model.config.max_position_embeddings, max(prompt_lengths), max_new)


@contextmanager
def _eval(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def run_requests(
    model: torch.nn.Module, requests: Sequence[Request], tokenizer: Any = None
) -> Iterator[list[tuple[int, Event]]]:
    """Run `requests` to completion on one scheduler; yield each step's (index, event) pairs.

    inference_mode is entered per step, never held across a `yield`: the caller's code between
    steps runs in its own grad mode.
    """
    longest = max(len(r.prompt) + r.max_tokens for r in requests)
    context = model.config.max_position_embeddings
    scheduler = Scheduler(model, tokenizer, slots=len(requests), max_len=min(longest, context))
    events: list[tuple[int, Event]] = []
    states = scheduler.add(requests, lambda i, e: events.append((i, e)))
    with _eval(model):
        try:
            while scheduler.has_work():
                scheduler.step()
                if events:
                    yield list(events)
                    events.clear()
        finally:
            for state in states:
                state.cancel()


def generate_tokens(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | None = None,
    params: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
    seed: int | None = None,
) -> list[Generation]:
    """Return the new tokens of each prompt (batched on the scheduler; prompt i samples with
    seed + i)."""
    params = params or SamplingParams()
    max_new_tokens = check_lengths(model, [len(p) for p in prompts], max_new_tokens)
    requests = [
        Request(list(p), max_new_tokens, params, stop_token_ids, seed=_row_seed(seed, i))
        for i, p in enumerate(prompts)
    ]
    results = [Generation([], "length") for _ in prompts]
    for events in run_requests(model, requests):
        for index, event in events:
            if event.token is not None:
                results[index].tokens.append(event.token)
            if event.finish_reason is not None:
                results[index].finish_reason = event.finish_reason
    return results


def _row_seed(seed: int | None, row: int) -> int | None:
    return None if seed is None else seed + row


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
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        generator = torch.Generator(device=device).manual_seed(seed)
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
# Text in, text out.
# ---------------------------------------------------------------------------------------------

SAMPLING_NAMES = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
)


def sampling_params(kwargs: dict[str, Any]) -> SamplingParams:
    """Return SamplingParams from keyword arguments (None values keep the defaults)."""
    unknown = sorted(set(kwargs) - set(SAMPLING_NAMES))
    if unknown:
        raise TypeError(f"unexpected generation arguments: {unknown}")
    return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})


def stop_ids_of(tokenizer: Any, extra: Sequence[int] = ()) -> list[int]:
    """Return EOS (when the tokenizer has one) followed by the `extra` stop ids."""
    ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    return ids + [i for i in extra if i not in ids]


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Return (prompt ids, stop ids) of chat `messages`: the one chat-prompt assembly."""
    from fmforge.chat_template import template_for

    template = template_for(tokenizer)
    prompt = template.render(tokenizer, messages)
    return prompt, stop_ids_of(tokenizer, template.stop_ids(tokenizer))


def _texts(loaded: Any, requests: list[Request]) -> Iterator[list[tuple[int, str]]]:
    # Yields one list of (prompt index, text delta) per step.
    for events in run_requests(loaded.model, requests, loaded.tokenizer):
        yield [(index, event.text) for index, event in events]


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
    params = sampling_params(sampling)
    stop_strings = [stop] if isinstance(stop, str) else list(stop or [])
    max_new_tokens = check_lengths(loaded.model, [len(p) for p in prompts], max_new_tokens)
    if stream and len(prompts) != 1:
        raise UserError("stream=True takes a single prompt")
    requests = [
        Request(p, max_new_tokens, params, stop_ids, stop_strings, _row_seed(seed, i))
        for i, p in enumerate(prompts)
    ]
    steps = _texts(loaded, requests)
    if stream:
        return (delta for deltas in steps for _, delta in deltas if delta)
    pieces: list[list[str]] = [[] for _ in prompts]
    for deltas in steps:
        for index, delta in deltas:
            pieces[index].append(delta)
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
    iterator of text deltas instead. Extra keywords: min_p, repetition_penalty,
    presence_penalty, frequency_penalty, logit_bias ({token id: bias}).
    """
    tokenizer = _require_tokenizer(loaded)
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [tokenizer.encode(t) for t in texts]
    sampling.update(temperature=temperature, top_k=top_k, top_p=top_p)
    stop_ids = stop_ids_of(tokenizer, stop_token_ids)
    out = _run(loaded, prompts, stream, max_new_tokens, stop_ids, stop, seed, sampling)
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
    prompt, stop_ids = chat_prompt(_require_tokenizer(loaded), messages)
    sampling.update(temperature=temperature, top_k=top_k, top_p=top_p)
    out = _run(loaded, [prompt], stream, max_new_tokens, stop_ids, stop, seed, sampling)
    return out if stream else out[0]
