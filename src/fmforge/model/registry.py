"""Model families: `config.json`'s `model_type` -> the family that builds the model.

Everything above `model/` asks this table which family a dir holds (a decoder that generates, or
an encoder that embeds and fills blanks) instead of inspecting one family's modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from fmforge.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """One architecture family: its HF `model_type`s and whether it decodes or encodes."""

    name: str  # "llama" or "bert"
    kind: str  # "decoder" (generate, chat) or "encoder" (embed, fill)
    model_types: tuple[str, ...]  # config.json model_type values it reads


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "decoder", ("llama", "mistral", "qwen2")),
    "bert": Family("bert", "encoder", ("bert",)),
}


def family_of(hf_config: dict[str, Any]) -> Family:
    """Return the family of an HF `config.json` dict (no model_type: an fmforge Llama dir)."""
    model_type = hf_config.get("model_type", "llama")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ConfigError(f"config.json model_type={model_type!r} is not supported (known: {known})")


def build_model(hf_config: dict[str, Any]) -> tuple[nn.Module, Any]:
    """Return (randomly initialised model, typed config) for an HF `config.json` dict.

    A bert dir whose `architectures` names `BertForMaskedLM` gets the masked-LM head; any other
    bert dir is a plain `BertModel` (with HF's pooler, so the weights round-trip).
    """
    family = family_of(hf_config)
    if family.name == "bert":
        from fmforge.model.bert import BertConfig, BertModel
        from fmforge.model.heads import BertForMaskedLM

        config = BertConfig.from_hf_dict(hf_config)
        if "BertForMaskedLM" in (hf_config.get("architectures") or []):
            return BertForMaskedLM(config), config
        return BertModel(config), config
    from fmforge.model.config import LlamaConfig
    from fmforge.model.llama import LlamaForCausalLM

    config = LlamaConfig.from_hf_dict(hf_config)
    return LlamaForCausalLM(config), config


def family_of_model(model: nn.Module) -> Family:
    """Return the family of a built model (by its config's type)."""
    from fmforge.model.bert import BertConfig

    return FAMILIES["bert" if isinstance(getattr(model, "config", None), BertConfig) else "llama"]
