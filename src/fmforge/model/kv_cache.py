"""A preallocated key/value cache: one (B, K, max_len, D) buffer pair per layer."""

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
    ):
        super().__init__()
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
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
