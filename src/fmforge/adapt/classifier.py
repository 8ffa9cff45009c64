"""Classifiers built on a language model, the batches they train on, and their evaluation.

Every adaptation method ends in a module mapping a batch of prompts to class scores:
`forward(input_ids (B, T), lengths (B,)) -> (B, L)`, so one objective (cross-entropy over the L
labels, `train/objectives.py: classification_loss`) and one evaluation serve them all.

- `HeadClassifier`: a linear head on the mean of the prompt's final hidden states
  (full fine-tuning, freezing, linear probing).
- `VerbalizerClassifier`: the log-likelihood the language model gives each label's word after the
  prompt (LoRA, prompt tuning, PET, in-context learning). When the labels' first tokens differ it
  reads them off one forward pass; otherwise it scores every label continuation in full.
  Optional: a soft prompt prepended to the input, and a shared prefix of demonstrations whose
  keys/values are computed once per batch (k-shot prompts).

Notation: B batch, T prompt length, L labels, M longest label, V vocab, C hidden size, P prefix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmforge.data.tasks import Example, Task

# Patterns rephrase an input as a cloze whose answer is the label's word (PET, Schick & Schuetze
# 2021). Pattern 0 is the default for every single-pattern method.
PATTERNS = [
    "{text}\nTopic:",
    "Text: {text}\nCategory:",
    "{text}\nThis is about",
    'Question: what is the topic of "{text}"?\nAnswer:',
]


def render_ids(tokenizer, pattern: str, text: str, max_text_tokens: int) -> list[int]:
    """Return the ids of `pattern` filled with `text`, the text cut to `max_text_tokens`."""
    before, _, after = pattern.partition("{text}")
    text_ids = tokenizer.encode(text)[:max_text_tokens]
    return (tokenizer.encode(before) if before else []) + text_ids + tokenizer.encode(after)


def label_token_ids(tokenizer, task: Task) -> list[list[int]]:
    """Return the ids of " <word>" for each label, in the task's label order."""
    return [tokenizer.encode(" " + task.verbalizer[label]) for label in task.labels]


@dataclass
class Encoded:
    """Prompts as token ids with their class indices."""

    ids: list[list[int]]
    labels: list[int]


def encode(
    tokenizer, task: Task, examples: list[Example], pattern: str, max_text_tokens: int = 96
) -> Encoded:
    """Render and tokenize `examples` with `pattern`."""
    return Encoded(
        [render_ids(tokenizer, pattern, e.text, max_text_tokens) for e in examples],
        [task.label_index(e.label) for e in examples],
    )


def collate(ids: list[list[int]], labels: list[int], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad prompts into a batch: input_ids (B, T), lengths (B,), labels (B,)."""
    lengths = torch.tensor([len(x) for x in ids])
    input_ids = torch.full((len(ids), int(lengths.max())), pad_id, dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
    return {"input_ids": input_ids, "lengths": lengths, "labels": torch.tensor(labels)}


class ExampleBatches:
    """Seeded, resumable shuffled epochs over encoded examples (the Trainer's batch source).

    Data-parallel: every rank draws the same epoch order and takes its own `batch_size` slice of
    each global batch of `batch_size * world_size` examples, so the ranks together see what one
    process with the global batch would, and resume from the same (epoch, position).
    """

    def __init__(
        self,
        data: Encoded,
        batch_size: int,
        seed: int = 0,
        pad_id: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.data, self.batch_size, self.seed, self.pad_id = data, batch_size, seed, pad_id
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        """A seeded permutation, length-bucketed: batches hold prompts of similar length.

        Shuffle, sort each window of 16 batches by length, cut it into batches, shuffle the
        batches. Right-padding then costs little (fortunes run 25-140 tokens), which makes a
        training step about twice as fast on CPU without changing what a batch samples.
        """
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.data.ids))
        size = self.batch_size * self.world_size  # the global batch: the same order on every rank
        if len(order) <= size:
            return order
        lengths = np.array([len(self.data.ids[i]) for i in order])
        window = 16 * size
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(lengths[start : start + window], kind="stable")]
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        return np.concatenate([batches[i] for i in rng.permutation(len(batches))])

    def next_batch(self) -> dict[str, torch.Tensor]:
        picked = []  # the global batch; this rank keeps its slice
        while len(picked) < self.batch_size * self.world_size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order()
            picked.append(int(self._order[self.position]))
            self.position += 1
            if len(picked) == len(self.data.ids):
                break  # fewer examples than a batch: one of each
        share = picked[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        picked = share or picked
        return collate(
            [self.data.ids[i] for i in picked], [self.data.labels[i] for i in picked], self.pad_id
        )

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order()


class _LMClassifier(nn.Module):
    """Base of the classifiers: a state dict without tied duplicates (safetensors refuses them)."""

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        seen = set()
        for name in list(state):
            tensor = state[name]
            key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
            if key in seen and tensor.numel():
                del state[name]  # e.g. a tied lm_head: loading re-ties it
            seen.add(key)
        return state


class HeadClassifier(_LMClassifier):
    """A linear head on the mean of the prompt's final hidden states.

    Mean pooling rather than the last token: a small causal model's last position mostly
    predicts the next token, while the mean keeps evidence from every word of the input.
    """

    def __init__(self, lm: nn.Module, num_labels: int):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.config.hidden_size, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.lm(input_ids, return_hidden=True)  # (B, T, C)
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        keep = (positions[None, :] < lengths[:, None]).to(hidden.dtype)  # (B, T)
        pooled = (hidden * keep[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)  # (B, C)
        return self.head(pooled)  # (B, L)


class VerbalizerClassifier(_LMClassifier):
    """Class scores = log p(label word | prompt) under the language model."""

    def __init__(self, lm: nn.Module, label_ids: list[list[int]], soft_prompt: nn.Module = None):
        super().__init__()
        self.lm = lm
        self.label_ids = label_ids
        self.soft_prompt = soft_prompt
        self.prefix_ids: list[int] | None = None  # shared demonstrations (evaluation only)
        first = [ids[0] for ids in label_ids]
        self.first_token_only = len(set(first)) == len(first)
        self.register_buffer("first_ids", torch.tensor(first), persistent=False)

    def _logits(self, input_ids: torch.Tensor, hidden: bool = False) -> torch.Tensor:
        """Return next-token logits (B, T, V) of the prompt (or its hidden states (B, T, C))."""
        lm = self.lm
        if self.soft_prompt is not None:
            embeds = self.soft_prompt(lm.model.embed_tokens(input_ids))  # (B, n + T, C)
            out = lm(None, inputs_embeds=embeds, return_hidden=hidden)
            return out[:, self.soft_prompt.num_tokens :]
        if not self.prefix_ids:
            return lm(input_ids, return_hidden=hidden)
        # k-shot: run the demonstrations once, copy their keys/values to every row.
        b, t = input_ids.shape
        p = len(self.prefix_ids)
        cache = lm.new_cache(b, p + t)
        prefix = torch.tensor([self.prefix_ids], device=input_ids.device)
        lm(prefix, cache=cache, start=0, return_hidden=True)  # fills the cache; output unused
        cache.k[:, 1:b, :, :p] = cache.k[:, :1, :, :p]  # (layers, B, K, P, D)
        cache.v[:, 1:b, :, :p] = cache.v[:, :1, :, :p]
        mask = torch.ones(t, p + t, dtype=torch.bool, device=input_ids.device).tril(diagonal=p)
        return lm(input_ids, cache=cache, start=p, mask=mask[None, None], return_hidden=hidden)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        rows = torch.arange(b, device=input_ids.device)
        if self.first_token_only:
            # Only the last position is scored: project just it through the LM head.
            last = self.lm.lm_head(
                self._logits(input_ids, hidden=True)[rows, lengths - 1]
            )  # (B, V)
            return F.log_softmax(last.float(), dim=-1)[:, self.first_ids]  # (B, L)
        # Score each label's whole word: B * L sequences prompt + label.
        n_labels, longest = len(self.label_ids), max(len(x) for x in self.label_ids)
        seqs = input_ids.new_zeros(b, n_labels, t + longest)  # (B, L, T + M)
        seqs[:, :, :t] = input_ids[:, None]
        for i, ids in enumerate(self.label_ids):
            positions = lengths[:, None] + torch.arange(len(ids), device=input_ids.device)
            words = torch.tensor(ids, device=input_ids.device).expand(b, -1)
            seqs[:, i].scatter_(1, positions, words)
        logp = F.log_softmax(self._logits(seqs.view(b * n_labels, -1)).float(), dim=-1)
        logp = logp.view(b, n_labels, t + longest, -1)  # (B, L, T + M, V)
        scores = []
        for i, ids in enumerate(self.label_ids):
            positions = lengths[:, None] + torch.arange(len(ids), device=input_ids.device) - 1
            words = torch.tensor(ids, device=input_ids.device).expand(b, -1)
            token_logp = logp[rows[:, None], i, positions, words]  # (B, len(ids))
            scores.append(token_logp.sum(-1))
        return torch.stack(scores, dim=-1)  # (B, L)


@torch.no_grad()
def predict_proba(classifier: nn.Module, data: Encoded, batch_size: int = 16) -> torch.Tensor:
    """Return class probabilities (N, L) for every encoded prompt, in order."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    # Sort by length so batches hold prompts of similar size (less padding), then restore order.
    order = sorted(range(len(data.ids)), key=lambda i: len(data.ids[i]))
    out = torch.empty(len(order), 0)
    chunks = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = collate([data.ids[i] for i in index], [0] * len(index))
        scores = classifier(batch["input_ids"].to(device), batch["lengths"].to(device))
        chunks.append(F.softmax(scores.float(), dim=-1).cpu())
    out = torch.cat(chunks)[torch.argsort(torch.tensor(order))]
    classifier.train(was_training)
    return out


def accuracy(probs: torch.Tensor, labels: list[int]) -> float:
    """Return the fraction of rows whose most likely class is the label."""
    return round(float((probs.argmax(-1) == torch.tensor(labels)).double().mean()), 6)


def choose_demonstrations(train: list[Example], k: int, labels: list[str], seed: int) -> list:
    """Return `k` training examples, round-robin over labels in a seeded order."""
    rng = random.Random(seed)
    pools = {label: [e for e in train if e.label == label] for label in labels}
    for pool in pools.values():
        rng.shuffle(pool)
    order = list(labels)
    rng.shuffle(order)
    chosen: list[Example] = []
    while len(chosen) < k and any(pools.values()):
        for label in order:
            if pools[label] and len(chosen) < k:
                chosen.append(pools[label].pop())
    return chosen
