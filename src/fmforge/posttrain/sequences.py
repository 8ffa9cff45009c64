"""Token sequences for post-training: chat rendering with loss masks, JSONL records, padding and
per-sequence log-probabilities.

A supervised span is exactly what the model must generate at inference: the template renders the
prompt before an assistant turn ending with an open assistant header (`<|im_start|>assistant\\n`),
and the tokens the finished turn adds after that prefix are the turn's content plus its end-of-turn
token (`<|im_end|>`). The separator after the end-of-turn token is context, never a target. The
spans come from the chat template itself (`fmforge.chat_template`), so a template change moves the
mask with it; a rendering in which the prompt is not a prefix of the conversation is refused.

Notation: B sequences, T padded length, V vocabulary.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fmforge.data.sources import iter_jsonl
from fmforge.errors import DataError, UserError
from fmforge.train.objectives import IGNORE_INDEX


def chat_template_of(tokenizer: Any) -> Any:
    """Return the model's chat template; UserError (one line) when the tokenizer cannot chat."""
    from fmforge.chat_template import template_for

    if tokenizer is None:
        raise UserError("this model has no tokenizer, so it cannot be post-trained on text")
    template = template_for(tokenizer)
    template.special_ids(tokenizer)  # raises when <|im_start|>/<|im_end|> are missing
    return template


def encode_conversation(
    tokenizer: Any, template: Any, messages: list[dict[str, str]], last_only: bool = False
) -> tuple[list[int], list[int]]:
    """Return (ids, targets) of a rendered conversation; targets are -100 except assistant spans.

    targets[t] is the label of position t (the id at t for supervised tokens), unshifted: a
    supervised assistant turn contributes its content tokens and its end-of-turn token.
    last_only: supervise only the final assistant turn (preference and reward responses).
    """
    from fmforge.chat_template import check_messages

    check_messages(messages)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in assistant:
        if not messages[i]["content"].strip():
            raise DataError(f"messages[{i}] is an empty assistant turn; drop or fill it")
    if last_only:
        assistant = assistant[-1:]
    ids = template.render(tokenizer, messages, add_generation_prompt=False)
    targets = [IGNORE_INDEX] * len(ids)
    _, end = template.special_ids(tokenizer)
    for i in assistant:
        if i == 0:
            raise DataError("messages[0] is an assistant turn with no prompt before it")
        prompt = template.render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = template.render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if ids[: len(turn)] != turn or turn[: len(prompt)] != prompt:
            raise DataError(
                "the chat template does not render a prompt as a prefix of its conversation, "
                "so the assistant tokens cannot be located"
            )
        stop = turn.index(end, len(prompt))  # the turn's end-of-turn token
        for t in range(len(prompt), stop + 1):
            targets[t] = ids[t]
    return ids, targets


def encode_text_pair(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Return (ids, targets) of a plain-text prompt + completion + EOS; the completion is scored."""
    if not completion.strip():
        raise DataError("a record has an empty completion; drop or fill it")
    if tokenizer.eos_id is None:
        raise UserError("this tokenizer has no end-of-sequence token to end a completion")
    head, tail = tokenizer.encode(prompt), tokenizer.encode(completion) + [tokenizer.eos_id]
    return head + tail, [IGNORE_INDEX] * len(head) + tail


def read_jsonl(
    path: str | os.PathLike, required: tuple[str, ...] = ()
) -> list[tuple[int, dict[str, Any]]]:
    """Return (line number, object) for each record of a JSONL file (blank lines skipped, so the
    numbers are the file's own); DataError naming `file:line` on a bad record."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such data file")
    records = []
    for number, record in iter_jsonl(path):
        missing = [k for k in required if k not in record]
        if missing:
            raise DataError(
                f"{path}:{number}: missing field {missing[0]!r} "
                f"(each record needs {', '.join(required)})"
            )
        records.append((number, record))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def pad_sequences(
    sequences: list[tuple[list[int], list[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad (ids, targets) pairs into a batch for next-token scoring.

    Returns input_ids (B, T), target_ids (B, T) with target_ids[:, t] the label of the token
    PREDICTED at t (targets shifted left by one; -100 where unscored or padding) and
    attention_mask (B, T). Right padding never changes a causal model's earlier positions.
    """
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    target_ids = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(sequences):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        target_ids[row, : n - 1] = torch.tensor(targets[1:])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "target_ids": target_ids, "attention_mask": attention_mask}


def token_logprobs(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Return log p(target) at each position (B, T) in fp32; 0 where the target is -100."""
    scored = target_ids != IGNORE_INDEX  # (B, T)
    safe = target_ids.clamp(min=0)
    logp = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, safe.unsqueeze(-1))  # (B, T, 1)
    return logp.squeeze(-1) * scored


def scored_logprobs(model: Any, input_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Return log p(target) at each position (B, T) in fp32, 0 where the target is -100, running
    the vocabulary projection only at the scored positions (equal to
    `token_logprobs(model(input_ids), target_ids)`; the prompt's positions cost no logits)."""
    scored = target_ids != IGNORE_INDEX  # (B, T)
    logits = model(input_ids, logits_at=scored)  # (K, V)
    picked = target_ids[scored].unsqueeze(1)  # (K, 1)
    logp = torch.gather(F.log_softmax(logits.float(), dim=-1), 1, picked).squeeze(1)  # (K,)
    return torch.zeros(target_ids.shape, dtype=logp.dtype, device=logp.device).masked_scatter(
        scored, logp
    )


def sequence_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return each sequence's log-probability summed over its scored (response) tokens, (B,)."""
    return scored_logprobs(model, batch["input_ids"], batch["target_ids"]).sum(-1)


def pad_id_of(tokenizer: Any) -> int:
    """Return the id used for padding (pad, else EOS, else 0); padded positions are never read."""
    for candidate in (tokenizer.pad_id, tokenizer.eos_id):
        if candidate is not None:
            return candidate
    return 0


class ShuffledBatches:
    """Resumable seeded batches: `batch_size` items per batch, reshuffled every epoch.

    make_batch(items) turns the picked items into a batch; the position (epoch, index) is the
    whole state, so a resumed run picks exactly what an uninterrupted one would.
    """

    def __init__(
        self,
        items: list[Any],
        batch_size: int,
        make_batch: Callable[[list[Any]], Any],
        seed: int = 0,
        seq_len: int = 0,
    ):
        if not items:
            raise DataError("no training examples")
        self.items, self.batch_size, self.make_batch = items, batch_size, make_batch
        self.seed, self.seq_len = seed, seq_len
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.items), generator=g).tolist()

    def next_batch(self) -> Any:
        order, picked = self._order(), []
        while len(picked) < self.batch_size:
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            picked.append(self.items[order[self.position]])
            self.position += 1
        return self.make_batch(picked)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
