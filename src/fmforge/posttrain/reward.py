"""A Bradley-Terry reward model: a scalar head on the decoder, trained on preference pairs.

The reward of a sequence is a linear head `score` (hidden -> 1, no bias) on the decoder's final
hidden state at its last real token, exactly what HF's `LlamaForSequenceClassification` with
`num_labels=1` computes (it pools at the last token that is not `pad_token_id`). The dir this
writes is that class's layout (`model.*` + `score.weight`, `architectures`, `id2label` with one
label, `pad_token_id`), so `transformers` loads it and scores the same.

Loss per pair (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, eq. 1; Llama 2's margin):

    -log sigma(r_c - r_r - m) + c (r_c + r_r)^2

m is the record's optional `margin` (0 without one); the centring term with coefficient c
(Eisenstein et al. 2023, TRL's `center_rewards_coefficient`) keeps rewards near zero mean.

Notation: B pairs; a batch holds 2B rows, the B chosen then the B rejected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fmforge.errors import DataError, UserError
from fmforge.posttrain.preference import encode_preference
from fmforge.posttrain.sequences import ShuffledBatches, read_jsonl


class RewardModel(nn.Module):
    """A decoder and a scalar head: token ids (B, T) + lengths (B,) -> rewards (B,)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.score = nn.Linear(lm.config.hidden_size, 1, bias=False)
        nn.init.zeros_(self.score.weight)  # every reward starts at 0: the first loss is ln 2

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.lm(input_ids, return_hidden=True)  # (B, T, C)
        last = hidden[torch.arange(len(lengths), device=hidden.device), lengths - 1]  # (B, C)
        return self.score(last).squeeze(-1).float()  # (B,)


def bradley_terry(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None, centring: float
) -> torch.Tensor:
    """Return the per-pair loss -log sigma(r_c - r_r - m) + c (r_c + r_r)^2, shape (B,)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff) + centring * (chosen + rejected) ** 2


class RewardObjective:
    """Bradley-Terry objective: (summed per-pair loss, pairs); accuracy accumulates for logs."""

    def __init__(self, centring: float = 0.0):
        self.centring = centring
        self._stats = torch.zeros(3, dtype=torch.float64)  # correct, margin sum, pairs

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Any, int]:
        rewards = model(batch["input_ids"], batch["lengths"])  # (2B,)
        b = rewards.shape[0] // 2
        chosen, rejected = rewards[:b], rewards[b:]
        losses = bradley_terry(chosen, rejected, batch.get("margins"), self.centring)
        gap = (chosen - rejected).detach()
        self._stats += torch.tensor([(gap > 0).sum(), gap.sum(), b], dtype=torch.float64)
        return losses.sum(), b

    def pop_metrics(self) -> dict[str, float]:
        """Return the training pairwise accuracy and mean reward gap since the last call."""
        correct, gap, pairs = self._stats.tolist()
        self._stats.zero_()
        return {} if pairs == 0 else {"pair_accuracy": correct / pairs, "reward_gap": gap / pairs}


# --- data ---------------------------------------------------------------------------------------

Pair = tuple[list[int], list[int], float]  # chosen ids, rejected ids, margin


def read_reward_pairs(path: Any, tokenizer: Any, template: Any, max_tokens: int = 0) -> list[Pair]:
    """Return (chosen ids, rejected ids, margin) of a JSONL preference file (prompt included)."""
    pairs = []
    for number, record in read_jsonl(path):
        where = f"{path}:{number}"
        (chosen, _), (rejected, _) = encode_preference(tokenizer, template, record, where)
        margin = record.get("margin", 0.0)
        if not isinstance(margin, int | float):
            raise DataError(f"{where}: margin must be a number, got {margin!r}")
        if max_tokens:
            chosen, rejected = chosen[-max_tokens:], rejected[-max_tokens:]  # keep the answer
        pairs.append((chosen, rejected, float(margin)))
    return pairs


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad pairs into input_ids (2B, T), lengths and attention_mask; margins (B,)."""
    rows = [c for c, _, _ in pairs] + [r for _, r, _ in pairs]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in rows])
    attention_mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    margins = torch.tensor([m for _, _, m in pairs], dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "lengths": lengths,
        "attention_mask": attention_mask,
        "margins": margins,
    }


def reward_batches(pairs: list[Pair], batch_size: int, pad_id: int, seed: int = 0) -> Any:
    """Return resumable seeded batches of reward pairs."""
    seq_len = max(max(len(c), len(r)) for c, r, _ in pairs) if pairs else 0
    return ShuffledBatches(pairs, batch_size, lambda p: collate_pairs(p, pad_id), seed, seq_len)


@torch.no_grad()
def pairwise_accuracy(model: RewardModel, pairs: list[Pair], pad_id: int, batch_size: int = 16):
    """Return the share of pairs whose chosen sequence gets the higher reward."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        batch = collate_pairs(chunk, pad_id)
        rewards = model(batch["input_ids"], batch["lengths"])
        correct += int((rewards[: len(chunk)] > rewards[len(chunk) :]).sum())
    model.train(was_training)
    return correct / len(pairs)


# --- the HF LlamaForSequenceClassification dir ------------------------------------------------


def save_reward_model(
    model: RewardModel,
    tokenizer: Any,
    out: str | os.PathLike,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an HF `LlamaForSequenceClassification` dir (num_labels=1); return its path."""
    from safetensors.torch import save_file

    from fmforge import __version__
    from fmforge.artifacts import atomic_dir, write_json_atomic

    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    if pad_id is None:
        raise UserError("the tokenizer has no pad or end-of-sequence token to mark padding")
    state = {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.lm.state_dict().items()
        if k.startswith("model.")
    }
    state["score.weight"] = model.score.weight.detach().to("cpu").contiguous()
    hf_config = model.config.to_hf_dict()
    hf_config.update(
        architectures=["LlamaForSequenceClassification"],
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        problem_type="regression",
        pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
    )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_json_atomic(tmp / "config.json", hf_config)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp)
        meta = {"fmforge_version": __version__, "kind": "reward_model", **(provenance or {})}
        write_json_atomic(tmp / "fmforge.json", meta)
    return Path(out)


def load_reward_model(path: str | os.PathLike) -> tuple[RewardModel, Any]:
    """Load a dir written by `save_reward_model` (or by transformers); return (model, tokenizer)."""
    from safetensors.torch import load_file

    from fmforge.model.registry import build_model
    from fmforge.tokenizer import Tokenizer

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: no config.json; is this a reward model dir?")
    hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    if "LlamaForSequenceClassification" not in (hf_config.get("architectures") or []):
        raise UserError(f"{path}: not a LlamaForSequenceClassification dir")
    lm, _ = build_model(hf_config)
    model = RewardModel(lm)
    state = load_file(str(path / "model.safetensors"))
    with torch.no_grad():
        model.score.weight.copy_(state.pop("score.weight"))
    missing = set(k for k in lm.state_dict() if k.startswith("model.")) - set(state)
    if missing:
        raise UserError(f"{path}: model.safetensors lacks {sorted(missing)[:3]}")
    lm.load_state_dict(state, strict=False)
    return model.eval(), Tokenizer.load(path)


def reward_model_scorer(path: str | os.PathLike) -> Any:
    """Return reward(completion_text, record) -> float from a reward-model dir.

    The record's `prompt` (messages, or a string taken as one user turn) and the completion as the
    assistant's answer are rendered with the reward model's own chat template, as in training.
    """
    from fmforge.posttrain.sequences import chat_template_of, encode_conversation

    model, tokenizer = load_reward_model(path)
    template = chat_template_of(tokenizer)

    def reward(text: str, record: dict[str, Any]) -> float:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        messages = [*prompt, {"role": "assistant", "content": text}]
        ids, _ = encode_conversation(tokenizer, template, messages, last_only=True)
        with torch.no_grad():
            return float(model(torch.tensor([ids]), torch.tensor([len(ids)]))[0])

    return reward
