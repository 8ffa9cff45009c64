"""BERT encoder (bidirectional transformer), top to bottom.

Paper: BERT (Devlin et al. 2019): learned absolute position and token-type embeddings, post-norm
LayerNorm blocks, GELU MLP, bidirectional self-attention over the non-padding tokens. Reference
implementation it is tested against: `transformers.BertModel` / `BertForMaskedLM` (parameter names
are identical, so state dicts load both ways; tests/test_bert.py). The heads (masked LM, pooling,
projection) live in `model/heads.py`.

Notation: B batch, T sequence length, C hidden size, H heads, D head dim, V vocab,
F intermediate (MLP) size.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fmforge.errors import ConfigError
from fmforge.model.layers import attention


@dataclass
class BertConfig:
    """BERT hyperparameters, named as in HF `BertConfig`."""

    vocab_size: int = 8192  # tokens in the WordPiece vocabulary
    hidden_size: int = 256  # d_model: width of the residual stream
    intermediate_size: int = 1024  # GELU MLP hidden width
    num_hidden_layers: int = 4  # transformer blocks
    num_attention_heads: int = 4  # attention heads
    max_position_embeddings: int = 512  # learned absolute positions
    type_vocab_size: int = 2  # token-type (segment) embeddings
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon
    hidden_dropout_prob: float = 0.1  # dropout on embeddings and residual branches
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities
    initializer_range: float = 0.02  # std of the normal init for linear and embedding weights
    pad_token_id: int = 0  # padding id (never attended to)
    head_dim: int = dataclasses.field(init=False, default=0)  # derived: hidden_size // heads

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        self.head_dim = self.hidden_size // self.num_attention_heads

    def to_hf_dict(self, architecture: str = "BertModel") -> dict[str, Any]:
        """Return the HF `config.json` dict for `BertModel` or `BertForMaskedLM`."""
        d = dataclasses.asdict(self)
        d.pop("head_dim")
        d.update(
            architectures=[architecture],
            model_type="bert",
            hidden_act="gelu",
            position_embedding_type="absolute",
            tie_word_embeddings=True,
            torch_dtype="float32",
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> BertConfig:
        """Build from an HF `config.json` dict, refusing what this file does not implement."""
        if d.get("model_type") != "bert":
            raise ConfigError(f"config.json model_type={d.get('model_type')!r} is not bert")
        if d.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(f"config.json hidden_act={d['hidden_act']!r}: only gelu is supported")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError("config.json position_embedding_type must be absolute")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


# Presets (`tiny` is for tests). `small` (~0.8M non-embedding parameters) is sized for 2 shared
# CPU cores; `124m` is BERT-base.
BERT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4
    ),
    "124m": dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
    ),
}


class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, c, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, c)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, c)
        self.LayerNorm = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device)  # (T,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, T, C)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]  # every token in segment 0
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head attention projections: query, key, value (with biases)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = config.hidden_size
        self.n_head, self.head_dim = config.num_attention_heads, config.head_dim
        self.query = nn.Linear(c, c)
        self.key = nn.Linear(c, c)
        self.value = nn.Linear(c, c)
        self.dropout_p = config.attention_probs_dropout_prob
        self.eager = False  # True: the reference softmax(QK^T)V path instead of SDPA

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, c = x.shape
        h, d = self.n_head, self.head_dim
        q = self.query(x).view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
        k = self.key(x).view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
        v = self.value(x).view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
        p = self.dropout_p if self.training else 0.0
        if p > 0.0 and not self.eager:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        elif p > 0.0:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # (B, H, T, T)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = F.dropout(scores.softmax(-1), p) @ v
        else:
            y = attention(q, k, v, mask=mask, eager=self.eager)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(b, t, c)  # (B, T, C)


class BertSelfOutput(nn.Module):
    """Post-norm residual after attention: LayerNorm(x + dropout(dense(y)))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dropout(self.dense(y)))


class BertAttention(nn.Module):
    """Self-attention and its residual (HF nests them as `attention.self` / `attention.output`)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    """MLP up-projection with exact (erf) GELU."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # (B, T, F)


class BertOutput(nn.Module):
    """MLP down-projection and post-norm residual: LayerNorm(x + dropout(dense(h)))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(x + self.dropout(self.dense(h)))


class BertLayer(nn.Module):
    """Post-norm block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """The stack of blocks."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertPooler(nn.Module):
    """tanh(dense(h_[CLS])): kept so HF `BertModel` loads an fmforge dir with no missing keys."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, C)


class BertModel(nn.Module):
    """Token ids (B, T) + attention mask (B, T) -> hidden states (B, T, C)."""

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(lambda m: init_bert_weights(m, config.initializer_range))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the last hidden states (B, T, C); attention_mask (B, T) is 1 on real tokens."""
        t = input_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {t} tokens exceeds the model's {self.config.max_position_embeddings}"
                " positions"
            )
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys that may be seen
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the last hidden states (B, T, C) (the same as calling the model)."""
        return self(input_ids, attention_mask)

    def set_eager_attention(self, eager: bool = True) -> None:
        """Switch every attention layer to the eager reference path (or back to SDPA)."""
        for layer in self.encoder.layer:
            layer.attention.self.eager = eager


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's init: Normal(0, std) linears and embeddings, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def init_sinusoidal_positions(model: nn.Module) -> None:
    """Overwrite a fresh BERT's learned position embeddings with sinusoids (Vaswani et al. 2017).

    They stay learned parameters (the HF layout is unchanged); only their starting point moves
    from noise to sin/cos waves scaled to the init std, so position i's vector is already a fixed
    rotation of position i-1's. Attention can then find "the previous word" from the start,
    which a small encoder otherwise spends much of a CPU budget discovering.
    """
    embeddings = next(m for m in model.modules() if isinstance(m, BertEmbeddings))
    weight = embeddings.position_embeddings.weight
    n, c = weight.shape
    position = torch.arange(n, dtype=torch.float32)[:, None]  # (P, 1)
    frequency = torch.exp(-math.log(10000.0) * torch.arange(0, c, 2, dtype=torch.float32) / c)
    waves = torch.zeros(n, c)
    waves[:, 0::2] = torch.sin(position * frequency)  # (P, C/2)
    waves[:, 1::2] = torch.cos(position * frequency)[:, : c // 2]
    std = getattr(getattr(model, "config", None), "initializer_range", 0.02)
    weight.copy_(waves * (std / waves.std()))
