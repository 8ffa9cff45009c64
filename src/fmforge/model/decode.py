"""The matrices of a decode step, laid out for fast products with a few rows.

A decode step multiplies a few activation rows (one per sequence, plus the tokens of a prompt
chunk) by every weight matrix once, so it is bound by reading the weights (and by per-op overhead
on small models), not by FLOPs, until the rows are many. On CPU, torch runs a batch-1 matmul on a
single thread, leaving the other cores' memory bandwidth idle. `DecodeWeights` makes every thread
read its share, and reads each weight once per step for all rows:
- with fmforge's native kernels (model/native/kernels.c; fp32 on CPU) the products run on the
  nn.Linear weights in place, no copy: threads split the output rows, stream them once and apply
  them to every activation row (a small-batch GEMM; a row's result does not depend on the others);
- otherwise (no C compiler, GPU, other dtypes) the weights are copied once into one buffer as
  column blocks (n, C_in, C_out / n), n = 2 per thread, and one `torch.bmm` over the blocks
  spreads the product across threads. That copy costs a second set of weights in memory and is
  rebuilt when a source weight changes (optimizer step, `load_state_dict`, `.to()`).
On 2 cores, for SmolLM2's shapes, the native kernel reads ~23-26 GB/s, bmm ~18, F.linear ~12.
The step's other pieces come as `NativeOps` (one kernel call each) or `TorchOps`.

The interface the model uses (`LlamaForCausalLM.decode_step`): `matmul(index, x)` for every
product, with `index` the group's position in the list passed in, and `ops` for the rest. Another
weight format (quantised weights, say) needs only another `matmul` behind the same two names.

Decode weights exist only for inference (no gradients) and when every projection is a plain
bias-free `nn.Linear`; an adapter such as LoRA wraps them, and then the ordinary forward runs.
`current` compares the weights' pointers and version counters to catch any change.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from fmforge.model import native
from fmforge.model.kv_cache import CacheRows, KVCache
from fmforge.model.layers import RMSNorm, apply_rope_one, attention, decode_attention
from fmforge.model.quantize import QuantLinear, decode_matmul


def bmm_split_count(out_features: int, device: torch.device) -> int:
    """Return how many column blocks torch.bmm splits a matrix into: 2 per thread on CPU."""
    if device.type != "cpu":
        return 1  # GPU matmul kernels already use the whole device for one row
    n = 1
    while n < 2 * torch.get_num_threads() and out_features % (2 * n) == 0:
        n *= 2
    return n


class DecodeWeights:
    """Groups of bias-free linears, each fused (outputs concatenated) and stored in blocks.

    `groups[i]` is a tuple of nn.Linear sharing their input; `matmul(i, x)` returns
    x @ concat(weights).T, i.e. the concatenated outputs of the group, for x (B, C_in).
    heads = (query heads, key/value heads, head dim). `ops` holds the step's other pieces:
    `NativeOps` with the native kernels, else `TorchOps`.
    """

    def __init__(self, groups: list[tuple[nn.Linear, ...]], heads: tuple[int, int, int]):
        self.sources = [decode_source(m) for group in groups for m in group]
        self.key = self.key_of(self.sources)
        first = next((w for w in self.sources if w.is_floating_point()), self.sources[0])
        self.threads = torch.get_num_threads()
        # a group of QuantLinears keeps its modules: their products run in model/quantize.py
        self.groups = [
            list(g) if isinstance(g[0], QuantLinear) else [m.weight.detach() for m in g]
            for g in groups
        ]
        self.outs = [sum(m.out_features for m in group) for group in groups]
        self.kernel = None
        if (
            first.device.type == "cpu"
            and all(w.dtype == torch.float32 for w in self.sources if w.is_floating_point())
            and all(w.is_contiguous() for w in self.sources)
        ):
            self.kernel = native.library()
        self._pointer_cache: dict[int, tuple[ctypes.Array, ctypes.Array]] = {}
        self.buffer: torch.Tensor | None = None  # the torch path's blocked copy
        self.blocks: list[torch.Tensor | None] = []
        if self.kernel is None:
            self._copy_blocks(groups, first)
        h, kv, d = heads
        self.ops = TorchOps(h, kv, d) if self.kernel is None else NativeOps(self.kernel, h, kv, d)

    def _copy_blocks(self, groups: list[tuple[nn.Linear, ...]], first: torch.Tensor) -> None:
        shapes = []  # (n, C_in, C_out / n) per group
        for group, c_out in zip(groups, self.outs):
            if isinstance(group[0], QuantLinear):
                shapes.append((0, 0, 0))  # no copy: decode_matmul reads the int weights
                continue
            n = bmm_split_count(c_out, first.device)
            shapes.append((n, group[0].in_features, c_out // n))
        self.buffer = torch.empty(
            sum(n * c_in * block for n, c_in, block in shapes),
            dtype=first.dtype,
            device=first.device,
        )
        offset = 0
        with torch.no_grad():
            for group, (n, c_in, block) in zip(groups, shapes):
                if n == 0:
                    self.blocks.append(None)  # a QuantLinear group
                    continue
                view = self.buffer[offset : offset + n * c_in * block].view(n, c_in, block)
                weight = torch.cat([m.weight for m in group])  # (C_out, C_in)
                view.copy_(weight.t().reshape(c_in, n, block).permute(1, 0, 2))
                self.blocks.append(view)
                offset += n * c_in * block

    @staticmethod
    def key_of(weights: list[torch.Tensor]) -> tuple:
        return tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)

    def current(self, weights: list[torch.Tensor]) -> bool:
        """True when `weights` are still the very tensors, unmodified, this copy was made from,
        and torch's thread count (which sets the blocking) has not changed."""
        return (
            len(weights) == len(self.sources)
            and self.threads == torch.get_num_threads()
            and self.key_of(weights) == self.key
        )

    def _pointers(self, index: int) -> tuple[ctypes.Array, ctypes.Array]:
        # The kernel's view of group `index`: its weights' addresses and output rows (cached; the
        # tensors stay put while `current` holds).
        cached = self._pointer_cache.get(index)
        if cached is None:
            group = self.groups[index]
            pointers = (ctypes.c_void_p * len(group))(*[w.data_ptr() for w in group])
            rows = (ctypes.c_int64 * len(group))(*[w.shape[0] for w in group])
            cached = self._pointer_cache[index] = (pointers, rows)
        return cached

    def matmul(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Return x (B, C_in) times group `index`'s fused weight: (B, C_out)."""
        if isinstance(self.groups[index][0], QuantLinear):
            return decode_matmul(self.groups[index], x)
        b = x.shape[0]
        if self.kernel is not None:
            x = x.contiguous()
            y = x.new_empty(b, self.outs[index])
            pointers, rows = self._pointers(index)  # q, k, v (or gate, up) side by side in y
            self.kernel.fmforge_gemm_group(
                x.data_ptr(), pointers, rows, len(rows), y.data_ptr(), b, x.shape[1], y.shape[1],
                self.threads,
            )  # fmt: skip
            return y
        blocks = self.blocks[index]  # (n, C_in, C_out / n)
        n, c_in, block = blocks.shape
        y = torch.bmm(x.expand(n, b, c_in), blocks)  # (n, B, C_out / n)
        if b == 1:
            return y.view(1, n * block)
        return y.transpose(0, 1).reshape(b, n * block)


def plain_linear(module: nn.Module) -> bool:
    """True for an nn.Linear without bias, not wrapped or subclassed by an adapter, or a
    QuantLinear (model/quantize.py)."""
    return (type(module) is nn.Linear and module.bias is None) or type(module) is QuantLinear


def decode_source(module: nn.Module) -> torch.Tensor:
    """Return the tensor whose identity and version stand for a linear's weight in `current`:
    the weight, or a QuantLinear's int weight (its `.weight` is computed on each access)."""
    return module.qweight if isinstance(module, QuantLinear) else module.weight


class TorchOps:
    """A decode step's pieces besides the matmuls, in torch ops (any device and dtype).

    Notation: B rows (sequences), H query heads, K key/value heads, D head dim, S cache length.
    """

    def __init__(self, h: int, kv: int, d: int):
        self.h, self.kv, self.d = h, kv, d

    def rope(
        self, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return this step's RoPE rows from the (P, D) tables: cos, signed sin, (B or 1, 1, D)."""
        if position_ids is None:
            cos, sin = cos[slot], sin[slot]  # (D,)
        else:
            cos, sin = cos[position_ids[:, 0]], sin[position_ids[:, 0]]  # (B, D)
        half = self.d // 2  # rotate-half's sign folded into sin: see layers.apply_rope_one
        signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.view(-1, 1, self.d), signed_sin.view(-1, 1, self.d)

    def add_rmsnorm(
        self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm
    ) -> torch.Tensor:
        """Add the residual branch `delta` to x (B, C) in place; return norm(x)."""
        if delta is not None:
            x.add_(delta)
        return norm(x)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up (B, 2F) -> silu(gate) * up (B, F)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def attend(
        self,
        qkv: torch.Tensor,
        layer: int,
        cache: KVCache | CacheRows,
        slot: int,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Rotate q and k, write k and v to cache slot `slot`; return attention (B, H*D)."""
        h, kv, d = self.h, self.kv, self.d
        qkv = qkv.view(qkv.shape[0], h + 2 * kv, d)
        qk = apply_rope_one(qkv[:, : h + kv], *rope)  # (B, H + K, D), rotated together
        if isinstance(cache, CacheRows) and not cache.unique:
            return self._attend_runs(qk, qkv[:, h + kv :], layer, cache)
        k, v = cache.update(layer, slot, qk[:, h:, None], qkv[:, h + kv :, None])  # (B, K, S, D)
        if isinstance(cache, CacheRows):
            mask = cache.key_mask()  # each row reads up to its own position
        return decode_attention(qk[:, :h], k, v, mask)

    def _attend_runs(self, qk, v, layer: int, cache: CacheRows) -> torch.Tensor:
        # Rows sharing cache rows (prompt chunks): write all keys, then attend run by run on a
        # view of the run's cache row, instead of gathering a copy of it for every query.
        h, d = self.h, self.d
        cache.write(layer, qk[:, h:], v)
        positions = cache.positions
        out = []
        for row, lo, hi in cache.runs():
            end = int(positions[hi - 1]) + 1  # chunk rows are in position order
            keys = cache.k_layers[layer][row : row + 1, :, :end]  # (1, K, S, D)
            values = cache.v_layers[layer][row : row + 1, :, :end]
            columns = torch.arange(end, device=qk.device)
            mask = columns[None, :] <= positions[lo:hi, None]  # (T, S)
            q = qk[lo:hi, :h].transpose(0, 1)[None]  # (1, H, T, D)
            y = attention(q, keys, values, mask=mask[None, None])  # (1, H, T, D)
            out.append(y[0].transpose(0, 1).reshape(hi - lo, h * d))
        return torch.cat(out)


class NativeOps(TorchOps):
    """`TorchOps` as calls into the native kernels (fp32, CPU, contiguous tensors)."""

    def __init__(self, library, h: int, kv: int, d: int):
        super().__init__(h, kv, d)
        self.lib = library

    def rope(self, cos, sin, position_ids, slot):
        if position_ids is None:
            return cos[slot], sin[slot]  # (D,): one row for every sequence
        return cos[position_ids[:, 0]], sin[position_ids[:, 0]]  # (B, D)

    def add_rmsnorm(self, x, delta, norm):
        y = torch.empty_like(x)
        self.lib.fmforge_add_rmsnorm(
            x.data_ptr(),
            None if delta is None else delta.data_ptr(),
            norm.weight.data_ptr(),
            norm.eps,
            y.data_ptr(),
            x.shape[0],
            x.shape[1],
        )
        return y

    def silu_mul(self, gate_up):
        rows, f = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty(rows, f)
        self.lib.fmforge_silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, f)
        return out

    def attend(self, qkv, layer, cache, slot, rope, mask):
        rows_view = isinstance(cache, CacheRows)  # per-row cache rows and positions
        if mask is not None and not rows_view:  # a left-padded batch: the torch ops take masks
            cos, sin = rope
            half = self.d // 2
            signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            rope = cos.view(-1, 1, self.d), signed_sin.view(-1, 1, self.d)
            return super().attend(qkv, layer, cache, slot, rope, mask)
        if slot >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; asked to write {slot}")
        rows = qkv.shape[0]
        cos, sin = rope
        out = qkv.new_empty(rows, self.h * self.d)
        self.lib.fmforge_attend_rows(
            qkv.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            self.d if cos.dim() == 2 else 0,
            cache.k_layers[layer].data_ptr(),
            cache.v_layers[layer].data_ptr(),
            cache.index.data_ptr() if rows_view else None,
            cache.positions.data_ptr() if rows_view else None,
            out.data_ptr(),
            rows,
            self.h,
            self.kv,
            self.d,
            cache.max_len,
            slot,
            torch.get_num_threads(),
        )
        return out
