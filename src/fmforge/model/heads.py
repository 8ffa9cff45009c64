"""Heads on top of an encoder: the masked-LM head, mean pooling, a projection, `BertForMaskedLM`.

Parameter names follow HF (`cls.predictions.transform.dense`, `cls.predictions.bias`, the decoder
tied to the word embeddings), so `transformers.BertForMaskedLM` loads an fmforge MLM dir unchanged.
Mean pooling is sentence-transformers' `Pooling(pooling_mode_mean_tokens=True)`; the projection
is its `Dense` (identity activation), saved in `2_Dense/` beside the encoder, never in it, so
`transformers.BertModel` still loads the dir with no unexpected keys.

Notation: B batch, T sequence length, C hidden size, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmforge.model.bert import BertConfig, BertModel, init_bert_weights


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return the mean of `hidden` (B, T, C) over positions where attention_mask (B, T) is 1."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    summed = (hidden * weights).sum(dim=1)  # (B, C)
    return summed / weights.sum(dim=1).clamp(min=1e-9)


class Projection(nn.Module):
    """A linear map of pooled sentence vectors (B, C) -> (B, D): sentence-transformers' `Dense`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(pooled)  # (B, D)


def add_projection(model: nn.Module, out_features: int) -> nn.Module:
    """Attach a fresh projection head to an encoder as `model.projection`; return the model."""
    config = model.config
    projection = Projection(config.hidden_size, out_features)
    init_bert_weights(projection.linear, config.initializer_range)
    model.projection = projection
    return model


def embedding_width(model: nn.Module) -> int:
    """Return the width of the model's sentence vectors (its projection's, else hidden size)."""
    projection = getattr(model, "projection", None)
    return model.config.hidden_size if projection is None else projection.linear.out_features


def sentence_embedding(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Return (B, D) sentence vectors: mean-pooled hidden states, then the projection if any."""
    pooled = mean_pool(model.encode(input_ids, attention_mask), attention_mask)  # (B, C)
    projection = getattr(model, "projection", None)
    return pooled if projection is None else projection(pooled)


def normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """Return rows scaled to unit L2 norm (cosine similarity becomes a dot product)."""
    return F.normalize(embeddings, p=2, dim=-1)


class BertPredictionHeadTransform(nn.Module):
    """dense -> GELU -> LayerNorm, applied to every position before the vocabulary projection."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """Vocabulary logits: decoder (tied to the word embeddings) plus a per-token bias."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias  # (B, T, V)


class BertOnlyMLMHead(nn.Module):
    """HF's wrapper module (`cls.predictions`)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)


class BertForMaskedLM(nn.Module):
    """Masked-LM encoder: token ids (B, T) -> vocabulary logits (B, T, V) at every position."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        init_bert_weights(self.cls.predictions.transform.dense, config.initializer_range)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the encoder's last hidden states (B, T, C)."""
        return self.bert(input_ids, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return logits (B, T, V); with `positions` (a bool (B, T) mask) only those rows (N, V)."""
        hidden = self.bert(input_ids, attention_mask)  # (B, T, C)
        if positions is not None:
            hidden = hidden[positions]  # (N, C): the vocabulary projection only where scored
        return self.cls.predictions(hidden)

    def set_eager_attention(self, eager: bool = True) -> None:
        """Switch every attention layer to the eager reference path (or back to SDPA)."""
        self.bert.set_eager_attention(eager)
