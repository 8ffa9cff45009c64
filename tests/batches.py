"""Batch sources and masked data shared by the trainer and distributed tests."""

from __future__ import annotations

import torch


class FixedBatches:
    """Yields slices of one fixed (x, y) pair, in order; resumable."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size, self.position = x, y, batch_size, 0

    def next_batch(self):
        s = slice(self.position, self.position + self.batch_size)
        self.position = (self.position + self.batch_size) % len(self.x)
        return self.x[s], self.y[s]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def unequally_masked(vocab_size: int, rows: int = 8, seq_len: int = 16, seed: int = 0):
    """Return (x, y) whose rows score very different numbers of targets (the rest are -100).

    Row i keeps 1 + 2i targets, so micro-batches of 2 rows score 4, 12, 20 and 28 targets: a mean
    per micro-batch weighs one target of the first 7x more than one of the last.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (rows, seq_len), generator=g)
    y = torch.randint(0, vocab_size, (rows, seq_len), generator=g)
    for i in range(rows):
        keep = torch.randperm(seq_len, generator=g)[: 1 + 2 * i]
        masked = torch.ones(seq_len, dtype=torch.bool)
        masked[keep] = False
        y[i, masked] = -100
    return x, y
