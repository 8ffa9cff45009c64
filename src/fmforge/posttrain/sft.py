"""Supervised fine-tuning on chat data: assistant-only targets, packed rows, the one Trainer.

Data: JSON lines with `messages` (role/content lists: fmforge's `feedback export --format sft`,
OpenAI/TRL chat layout) or `prompt`/`completion` strings (fmforge's export of completions), or the
built-in chatterbot corpus (`chatterbot`, `chatterbot:korean`). Chats
are rendered with the model's own chat template (`fmforge.chat_template`); only each assistant
turn's content and its end-of-turn token are targets (`posttrain/sequences.py` derives the spans
from the template). A data set whose targets are all masked is refused, never trained on silently.

Packing: examples are laid end to end in rows of at most `seq_len` tokens. Each example keeps its
own RoPE positions (0, 1, ... from its first token) and attends only within itself (a block-
diagonal causal mask), and the target of an example's last token is never the next example's first
token, so a packed example's loss equals its loss alone (tests/test_posttrain_sft.py).

Notation: B rows, T tokens per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fmforge.errors import DataError
from fmforge.posttrain.sequences import (
    ShuffledBatches,
    encode_conversation,
    encode_text_pair,
    read_jsonl,
)
from fmforge.train.objectives import IGNORE_INDEX

Example = tuple[list[int], list[int]]  # (ids, targets): targets[t] labels position t, unshifted


def encode_sft_record(tokenizer: Any, template: Any, record: dict[str, Any]) -> Example:
    """Return (ids, targets) of one SFT record (`messages`, or `prompt` + `completion`)."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise DataError("messages must be a list of {role, content} objects")
        return encode_conversation(tokenizer, template, messages)
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return encode_text_pair(tokenizer, record["prompt"], record["completion"])
    raise DataError("a record needs `messages`, or `prompt` and `completion` strings")


def chatterbot_records(language: str = "english") -> list[dict[str, Any]]:
    """Return the chatterbot corpus as chat records: each conversation's turns alternate
    user, assistant, user, ... (`pip install chatterbot-corpus`)."""
    import yaml

    from fmforge.model.load import package_dir

    root = package_dir("chatterbot_corpus", "pip install chatterbot-corpus") / "data" / language
    if not root.is_dir():
        raise DataError(f"chatterbot corpus has no language {language!r} ({root})")
    records = []
    for path in sorted(root.glob("*.yml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise DataError(f"{path}: unreadable chatterbot file ({e})") from e
        for conversation in data.get("conversations") or []:
            turns = [str(t).strip() for t in conversation if t is not None and str(t).strip()]
            roles = ("user", "assistant")
            messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
            if len(messages) >= 2:
                records.append({"messages": messages})
    return records


def sft_records(data: Any) -> list[tuple[int, dict[str, Any]]]:
    """Return (line number, record) of a JSONL file, or (conversation number, record) of the
    built-in `chatterbot[:LANGUAGE]` corpus."""
    name = str(data)
    if name.split(":")[0] == "chatterbot" and not Path(name).exists():
        return list(enumerate(chatterbot_records(name.partition(":")[2] or "english"), 1))
    return read_jsonl(data)


def read_sft(path: Any, tokenizer: Any, template: Any) -> tuple[list[Example], dict[str, int]]:
    """Return the encoded examples of an SFT file and counts (examples, supervised, skipped).

    `path` is a JSONL file or `chatterbot[:LANGUAGE]`. A record without any assistant turn is
    skipped and counted; a file where every record is skipped, or an empty assistant turn
    anywhere, is a one-line DataError.
    """
    examples, skipped = [], 0
    for number, record in sft_records(path):
        try:
            example = encode_sft_record(tokenizer, template, record)
        except DataError as e:
            raise DataError(f"{path}:{number}: {e}") from e
        if all(t == IGNORE_INDEX for t in example[1]):
            skipped += 1
            continue
        examples.append(example)
    if not examples:
        raise DataError(
            f"{path}: no assistant tokens to train on (the loss mask is all zero); SFT needs "
            "records with assistant turns"
        )
    supervised = sum(sum(t != IGNORE_INDEX for t in targets) for _, targets in examples)
    return examples, {"examples": len(examples), "supervised": supervised, "skipped": skipped}


def pack(examples: list[Example], seq_len: int) -> list[dict[str, list[int]]]:
    """Lay examples end to end in rows of <= seq_len tokens (first fit, in order).

    Each row: input_ids, target_ids (the label of the token predicted at t, within its example;
    -100 at each example's last token), position_ids (restarting at 0 per example) and
    segment_ids (1, 2, ... per example). An example longer than seq_len is cut to seq_len.
    """
    rows: list[dict[str, list[int]]] = []
    for ids, targets in examples:
        ids, targets = ids[:seq_len], targets[:seq_len]
        if not rows or len(rows[-1]["input_ids"]) + len(ids) > seq_len:
            rows.append({"input_ids": [], "target_ids": [], "position_ids": [], "segment_ids": []})
        row = rows[-1]
        segment = (row["segment_ids"][-1] if row["segment_ids"] else 0) + 1
        row["input_ids"] += ids
        row["target_ids"] += targets[1:] + [IGNORE_INDEX]
        row["position_ids"] += list(range(len(ids)))
        row["segment_ids"] += [segment] * len(ids)
    return rows


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad packed rows into (B, T) tensors; padding is segment 0 with no targets."""
    width = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_id, "target_ids": IGNORE_INDEX, "position_ids": 0, "segment_ids": 0}
    batch = {}
    for key, value in fill.items():
        tensor = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            tensor[i, : len(row[key])] = torch.tensor(row[key])
        batch[key] = tensor
    batch["attention_mask"] = (batch["segment_ids"] > 0).long()
    return batch


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Return the (B, 1, T, T) bool mask: causal, and only within one segment.

    Padding (segment 0) attends within the padding, so no query row is empty.
    """
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()  # (T, T)
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)  # (B, T, T)
    return (same & causal).unsqueeze(1)


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
    """Summed next-token cross-entropy over the assistant targets of packed rows, and their count.

    batch: input_ids, target_ids, position_ids, segment_ids (B, T) from `collate`.
    """
    logits = model(
        batch["input_ids"],
        position_ids=batch["position_ids"],
        mask=segment_mask(batch["segment_ids"]),
    )  # (B, T, V)
    targets = batch["target_ids"]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (targets != IGNORE_INDEX).sum()


def packed_batches(
    examples: list[Example], seq_len: int, batch_size: int, pad_id: int, seed: int = 0
) -> ShuffledBatches:
    """Return resumable seeded batches of packed rows (rows reshuffled each epoch)."""
    return ShuffledBatches(
        pack(examples, seq_len), batch_size, lambda rows: collate(rows, pad_id), seed, seq_len
    )
