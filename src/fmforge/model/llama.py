"""Llama-family decoder-only transformer, top to bottom.

Papers: LLaMA (Touvron et al. 2023): pre-norm RMSNorm, rotary position embeddings (RoPE),
SwiGLU MLP; grouped-query attention (Ainslie et al. 2023). Reference implementation it is tested
against: `transformers.LlamaForCausalLM` (parameter names are identical, so state dicts load both
ways; tests/test_model_parity.py).

Notation: B batch, T query length, S key length (cached + new), C hidden size,
H query heads, K key/value heads, D head dim, V vocab, F intermediate (MLP) size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fmforge.model.config import LlamaConfig
from fmforge.model.decode import DecodeWeights, decode_source, plain_linear
from fmforge.model.kv_cache import CacheRows, KVCache
from fmforge.model.layers import (
    RMSNorm,
    apply_rope,
    attention,
    rope_cache,
)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        c, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(c, f, bias=False)
        self.up_proj = nn.Linear(c, f, bias=False)
        self.down_proj = nn.Linear(f, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaAttention(nn.Module):
    """Multi-head self-attention with RoPE and grouped key/value heads."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        c, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(c, self.n_head * d, bias=False)
        self.k_proj = nn.Linear(c, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(c, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_head * d, c, bias=False)
        self.eager = False  # True: the reference softmax(QK^T)V path instead of SDPA

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        start: int,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        h, kv, d = self.n_head, self.n_kv, self.head_dim
        q = self.q_proj(x).view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, kv, d).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(b, t, kv, d).transpose(1, 2)  # (B, K, T, D)
        # RoPE writes q and k out contiguous in (B, heads, T, D), the layout SDPA runs fastest on.
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start, k, v)  # (B, K, S, D)
        # Causal without a mask only when queries and keys are the same positions.
        causal = mask is None and k.shape[2] == t and t > 1
        y = attention(q, k, v, mask=mask, causal=causal, eager=self.eager)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin, mask, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, the stack of blocks and the final norm; returns hidden states (B, T, C)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Decoder-only language model: token ids (B, T) -> next-token logits (B, T, V)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_cache(config.max_position_embeddings, config.head_dim, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (P, D)
        self.register_buffer("rope_sin", sin, persistent=False)  # (P, D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) init; residual projections scaled by 1/sqrt(2 * layers)."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        position_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_hidden: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return logits (B, T, V) for token ids (B, T).

        cache/start: with a KV cache, the new tokens occupy cache slots start..start+T.
        position_ids (B, T): RoPE positions when they differ from the slots (left padding).
        mask bool (B, 1, T, S): True where a query may attend a key; None means causal.
        inputs_embeds (B, T, C): used instead of embedding `input_ids` (soft prompts).
        return_hidden: return the final normed hidden states (B, T, C) instead of logits.
        logits_at bool (B, T): return logits (K, V) only at the K True positions, in row-major
        order (training objectives that score a few tokens skip the vocabulary projection
        elsewhere).
        """
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        t = x.shape[1]
        if start + t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {start + t} tokens exceeds the model's context of "
                f"{self.config.max_position_embeddings}"
            )
        # RoPE tables broadcast over (B, heads, T, D): shaped (T, D) or (B, 1, T, D).
        if position_ids is None:
            cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        else:
            cos = self.rope_cos[position_ids].unsqueeze(1)  # (B, 1, T, D)
            sin = self.rope_sin[position_ids].unsqueeze(1)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, start)
        x = self.model.norm(x)
        if return_hidden:
            return x
        return self.lm_head(x if logits_at is None else x[logits_at])

    def decode_weights(self) -> DecodeWeights | None:
        """Return this model's weights laid out for `decode_step` (built once, kept while valid).

        None when gradients are on or a projection is not a plain bias-free nn.Linear (an adapter
        wraps it): `decode_step` then runs the ordinary forward.
        """
        if torch.is_grad_enabled():
            return None
        groups: list[tuple[nn.Linear, ...]] = []
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            groups += [
                (attn.q_proj, attn.k_proj, attn.v_proj),
                (attn.o_proj,),
                (mlp.gate_proj, mlp.up_proj),
                (mlp.down_proj,),
            ]
        groups.append((self.lm_head,))
        if not all(plain_linear(m) for group in groups for m in group):
            return None
        weights = [decode_source(m) for group in groups for m in group]
        c = self.config
        cached = self.__dict__.get("_decode_weights")  # a plain attribute: not in state_dict
        if cached is None or not cached.current(weights):
            self.__dict__.pop("_decode_weights", None)  # free the stale copy first
            heads = (c.num_attention_heads, c.num_key_value_heads, c.head_dim)
            cached = self.__dict__["_decode_weights"] = DecodeWeights(groups, heads)
        return cached

    def decode_step(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | CacheRows,
        slot: int,
        weights: DecodeWeights | None,
        position_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return next-token logits (B, V) for one new token per row, input_ids (B, 1).

        The token is written to cache slot `slot`; position_ids (B, 1) and mask (B, 1, 1, S) as in
        `forward`. With `CacheRows` each row writes at its own cache row and position (`slot` is
        then the largest). logit_rows (R,): compute only these rows' logits, (R, V).
        The same maths as `forward` in fewer ops, since a decode step is bound by
        weight reads and per-op overhead: `weights` (from `decode_weights`) fuses the q/k/v and
        gate/up projections into one product each, and its `ops` fuse each residual add into the
        next RMSNorm and RoPE, the cache write and one-query attention into one call (native
        kernels, else torch ops). weights=None runs `forward` instead.
        """
        if weights is None:
            logits = self(input_ids, cache=cache, start=slot, position_ids=position_ids, mask=mask)
            return logits[:, -1] if logit_rows is None else logits[logit_rows, -1]
        c = self.config
        b = input_ids.shape[0]
        if slot + 1 > c.max_position_embeddings:
            raise ValueError(
                f"sequence of {slot + 1} tokens exceeds the model's context of "
                f"{c.max_position_embeddings}"
            )
        ops = weights.ops  # native kernels or torch ops: see model/decode.py
        rope = ops.rope(self.rope_cos, self.rope_sin, position_ids, slot)
        x = self.model.embed_tokens(input_ids.view(b))  # (B, C), updated in place below
        delta = None  # the last residual branch, added to x by the next add_rmsnorm
        for i, layer in enumerate(self.model.layers):
            qkv = weights.matmul(4 * i, ops.add_rmsnorm(x, delta, layer.input_layernorm))
            y = ops.attend(qkv, i, cache, slot, rope, mask)  # (B, H*D)
            y = ops.add_rmsnorm(x, weights.matmul(4 * i + 1, y), layer.post_attention_layernorm)
            delta = weights.matmul(4 * i + 3, ops.silu_mul(weights.matmul(4 * i + 2, y)))
        y = ops.add_rmsnorm(x, delta, self.model.norm)
        if logit_rows is not None:
            y = y[logit_rows]  # (R, C)
        return weights.matmul(4 * len(self.model.layers), y)  # (B or R, V)

    def new_cache(
        self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """Return an empty KV cache sized for this model."""
        c = self.config
        weight = self.model.embed_tokens.weight  # lm_head may be quantised (model/quantize.py)
        return KVCache(
            c.num_hidden_layers,
            batch_size,
            c.num_key_value_heads,
            max_len or c.max_position_embeddings,
            c.head_dim,
            dtype=dtype or weight.dtype,
            device=weight.device,
        )

    def set_eager_attention(self, eager: bool = True) -> None:
        """Switch every attention layer to the eager reference path (or back to SDPA)."""
        for layer in self.model.layers:
            layer.self_attn.eager = eager
