"""A preallocated key/value cache: one (B, K, max_len, D) buffer pair per layer.

`KVCache` is written a block of positions at a time (`update(layer, start, k, v)`), the same
positions for every row. `CacheRows` is a view of some of its rows in which every row of a step
writes at its own position: what the generation scheduler runs, where each sequence owns one
cache row and sits at its own length.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of past positions, written in place by `update(layer, pos, k, v)`.

    Buffers are allocated once for `max_len` positions, so decoding never reallocates.
    Notation: B batch, K key/value heads, S cached length, D head dim.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        zeroed: bool = True,
    ):
        """zeroed=False leaves the buffers uninitialised, so memory is only committed where
        positions get written: for readers that never look past a row's length."""
        super().__init__()
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        new = torch.zeros if zeroed else torch.empty
        self.register_buffer("k", new(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", new(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len
        self.batch_size = batch_size
        self._layer_views()

    def _layer_views(self) -> None:
        # Per-layer views, so a decode step's update indexes one layer without re-slicing.
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)

    def _apply(self, fn, recurse=True):  # .to(), .half(), ... replace the buffers: re-view them
        result = super()._apply(fn, recurse)
        self._layer_views()
        return result

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) at positions start..start+T; return keys/values 0..start+T."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        keys, values = self.k_layers[layer], self.v_layers[layer]  # (B, K, max_len, D)
        if k.shape[0] != self.batch_size:
            keys, values = keys[: k.shape[0]], values[: k.shape[0]]
        keys.narrow(2, start, end - start).copy_(k)
        values.narrow(2, start, end - start).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)


class CacheRows:
    """Rows of a `KVCache` for one step, each at its own position (what a scheduler step runs).

    Step row i is one token: it writes its key/value in cache row `index[i]` at position
    `positions[i]` and attends to that row's positions 0..positions[i]. Several step rows may
    share a cache row (consecutive tokens of one prompt chunk); all writes of a layer happen
    before its reads, so they see each other causally.
    Notation: N step rows, K key/value heads, W = max(positions) + 1, D head dim.
    """

    def __init__(self, cache: KVCache, index: list[int], positions: list[int]) -> None:
        device = cache.k.device
        self.k_layers, self.v_layers = cache.k_layers, cache.v_layers
        self.max_len = cache.max_len
        self.rows = len(index)
        self.index = torch.tensor(index, dtype=torch.long, device=device)  # (N,)
        self.positions = torch.tensor(positions, dtype=torch.long, device=device)  # (N,)
        self.width = max(positions) + 1
        if self.width > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked for {self.width}")
        self.unique = len(set(index)) == len(index)
        first = index[0]
        self.contiguous = index == list(range(first, first + len(index)))
        self._mask: torch.Tensor | None = None
        self.uniform = self.unique and len(set(positions)) == 1  # no mask needed

    def key_mask(self) -> torch.Tensor | None:
        """Return bool (N, 1, 1, W): True where row i may attend (positions <= its own), or None
        when every row sits at the same position of its own cache row."""
        if self.uniform:
            return None
        if self._mask is None:
            columns = torch.arange(self.width, device=self.positions.device)
            mask = columns[None, :] <= self.positions[:, None]  # (N, W)
            self._mask = mask.view(self.rows, 1, 1, self.width)
        return self._mask

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v and return the keys/values the step's queries read.

        One token per row, k (N, K, 1, D): row i writes at positions[i] (`start` is unused);
        returns (N, K, W, D), to be read under `key_mask()`. A block of T tokens for a single
        row, k (1, K, T, D): written at start..start+T; returns that row's (1, K, start+T, D).
        """
        keys, values = self.k_layers[layer], self.v_layers[layer]  # (B, K, max_len, D)
        if k.shape[2] > 1:
            if self.rows != 1:
                raise ValueError("a block of positions is written for one cache row at a time")
            row, end = int(self.index[0]), start + k.shape[2]
            if end > self.max_len:
                raise ValueError(f"KV cache holds {self.max_len} positions; asked for {end}")
            keys[row, :, start:end] = k[0]
            values[row, :, start:end] = v[0]
            return keys[row : row + 1, :, :end], values[row : row + 1, :, :end]
        self.write(layer, k[:, :, 0], v[:, :, 0])
        if self.contiguous:
            first = int(self.index[0])
            span = slice(first, first + self.rows)
            return keys[span, :, : self.width], values[span, :, : self.width]
        return keys[self.index, :, : self.width], values[self.index, :, : self.width]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one key/value per step row, k and v (N, K, D), at each row's position."""
        self.k_layers[layer][self.index, :, self.positions] = k
        self.v_layers[layer][self.index, :, self.positions] = v

    def runs(self) -> list[tuple[int, int, int]]:
        """Return (cache row, first step row, end step row) of each run of consecutive step rows
        in the same cache row (a prompt chunk is one run)."""
        index = self.index.tolist()
        runs, start = [], 0
        for i in range(1, len(index) + 1):
            if i == len(index) or index[i] != index[start]:
                runs.append((index[start], start, i))
                start = i
        return runs
