"""Maths shared verbatim by the model families: RMSNorm, rotary embeddings, attention.

Notation: B batch, T query length, S key length, H query heads, K key/value heads, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 like HF `LlamaRMSNorm`."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cache(
    max_positions: int, head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (cos, sin), each (max_positions, head_dim), for rotate-half RoPE (Su et al. 2021)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    )
    positions = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)  # (P, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (P, D): the rotate-half layout HF uses
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Return (-x2, x1) for x = (x1, x2) split on the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, D) by cos/sin broadcastable to it ((T, D) or (B, 1, T, D)).

    Equal to x * cos + rotate_half(x) * sin (the reference, tests/test_model_parity.py), computed
    by `_Rotary` in two fused passes each way, written out contiguous in (B, heads, T, D).
    Under torch.compile the reference formula runs instead: inductor fuses it into one pass each
    way, and `_Rotary`'s `out=` writes would break the compiled graph at every layer.
    """
    if torch.compiler.is_compiling():
        return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)
    return _Rotary.apply(x, cos, sin)


class _Rotary(torch.autograd.Function):
    """RoPE with its backward written out: the transpose of a rotation is the opposite rotation.

    With x = (x1, x2) halves and c, s the (duplicated) half-width cos and sin:
    forward  y1 = x1·c − x2·s,  y2 = x2·c + x1·s;
    backward g_x1 = g1·c + g2·s, g_x2 = g2·c − g1·s.
    Autograd of the reference formula runs chunk, neg, cat, two products and a sum each way,
    with zero-filled buffers for the chunk's backward; this is ~1.4x faster in training.
    """

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float):
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous (B, H, T, D)
        torch.mul(x[..., :half], c, out=out[..., :half])
        out[..., :half].addcmul_(x[..., half:], s, value=-sign)
        torch.mul(x[..., half:], c, out=out[..., half:])
        out[..., half:].addcmul_(x[..., :half], s, value=sign)
        return out

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _Rotary._rotate(x, cos.to(x.dtype), sin.to(x.dtype), 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _Rotary._rotate(grad, cos.to(grad.dtype), sin.to(grad.dtype), -1.0), None, None


def apply_rope_one(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` for one position per row: x (B, heads, D); cos, signed_sin (B or 1, 1, D).

    signed_sin is sin with its first half negated (rotate-half's sign), so
    rotate_half(x) * sin == roll(x, D/2) * signed_sin: one roll instead of chunk, neg and cat.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    eager: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q (B, H, T, D); k, v (B, K, S, D); mask bool (B or 1, 1, T, S), True = may attend.
    Returns (B, H, T, D). `eager=True` runs the readable reference maths instead of SDPA.
    """
    n_rep = q.shape[1] // k.shape[1]
    if not eager:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=n_rep > 1
        )
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(n_rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if causal and mask is None:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v  # (B, H, T, D)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention of one query per row, for decode steps: returns (B, H*D).

    q (B, H, D); k, v (B, K, S, D); mask bool (B, 1, 1, S), True = may attend, or None.
    The same maths as `attention` in four small ops: query heads are grouped under their key/value
    head (q viewed (B, K, H/K, D)) so no key is repeated, and a single query needs no causal mask.
    SDPA's fused kernel costs several times more than that for one query on CPU.
    """
    b, h, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    # (B*K) batches of (H/K, D) queries against (S, D) keys; k and v are views of the cache.
    q = q.reshape(b * kv, h // kv, d) * (1.0 / math.sqrt(d))
    scores = torch.bmm(q, k.reshape(b * kv, s, d).transpose(1, 2))  # (B*K, H/K, S)
    if mask is not None:
        scores = scores.view(b, kv, h // kv, s).masked_fill(~mask, float("-inf"))
        scores = scores.view(b * kv, h // kv, s)
    return torch.bmm(scores.softmax(dim=-1), v.reshape(b * kv, s, d)).view(b, h * d)
