"""The one-line Python API: `fmforge.load(MODEL)` -> a typed loaded model.

A decoder (`LoadedModel`) generates: `.generate(prompt)`, `.chat(messages)`. An encoder
(`LoadedEncoder`) embeds and fills blanks: `.embed(texts)`, `.fill("I heard [MASK] ...")`.
Which one you get is decided by the model dir's `config.json` `model_type` (`model/registry.py`).
This module sits above `model/` and `generate/`, so `model/` never imports upward.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from fmforge.model.load import ModelBundle, load_bundle


class LoadedModel(ModelBundle):
    """A decoder with its tokenizer: `.model` maps ids (B, T) to next-token logits (B, T, V)."""

    def generate(self, prompt: str, **kwargs: Any) -> str | Iterator[str]:
        """Return the continuation of `prompt` (or, with stream=True, an iterator of deltas)."""
        from fmforge.generate.engine import generate_text

        return generate_text(self, prompt, **kwargs)

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> str | Iterator[str]:
        """Return the assistant's reply to chat `messages` (role/content dicts)."""
        from fmforge.generate.engine import chat_text

        return chat_text(self, messages, **kwargs)


class LoadedEncoder(ModelBundle):
    """An encoder with its tokenizer: `.model.encode` maps ids (B, T) to hidden states (B, T, C)."""

    def embed(self, texts: str | Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Return (N, hidden) float32 sentence embeddings, L2-normalised rows, in input order."""
        from fmforge.generate.embed import embed_texts

        return embed_texts(self, texts, batch_size=batch_size)

    def fill(self, text: str, top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Return the top_k fillers of each [MASK] in `text` (needs a masked-LM head)."""
        from fmforge.generate.fill import fill_mask

        return fill_mask(self, text, top_k=top_k)


def typed(bundle: ModelBundle) -> LoadedModel | LoadedEncoder:
    """Return `bundle` as the loaded type of its family (decoder or encoder)."""
    cls = LoadedEncoder if bundle.kind == "encoder" else LoadedModel
    return cls(**vars(bundle))


def load(
    model: str | os.PathLike, device: str | torch.device = "cpu", quantize: str | None = None
) -> LoadedModel | LoadedEncoder:
    """Load a model dir, a .gguf file or a built-in name (see `fmforge models`).

    quantize "int8" or "int4" quantises a decoder's weights in memory (docs/quantize.md).
    """
    return typed(load_bundle(model, device=device, quantize=quantize))


def load_decoder(
    model: str | os.PathLike, device: str | torch.device = "cpu", quantize: str | None = None
) -> LoadedModel:
    """Load a model that generates text; an encoder gets a one-line error."""
    bundle = load_bundle(model, device=device, kind="decoder", quantize=quantize)
    return LoadedModel(**vars(bundle))


def load_encoder(model: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedEncoder:
    """Load a model that embeds text; a decoder gets a one-line error."""
    return LoadedEncoder(**vars(load_bundle(model, device=device, kind="encoder")))
