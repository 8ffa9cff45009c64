"""Model configs: the Llama family as a flat dataclass, presets, HF config.json both ways."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fmforge.errors import ConfigError


@dataclass
class LlamaConfig:
    """Decoder-only Llama-family hyperparameters, named as in HF `LlamaConfig`."""

    vocab_size: int = 4096  # tokens in the vocabulary (embedding rows)
    hidden_size: int = 256  # d_model: width of the residual stream
    intermediate_size: int = 688  # SwiGLU hidden width
    num_hidden_layers: int = 4  # transformer blocks
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 2  # key/value heads (GQA when < num_attention_heads)
    head_dim: int = 0  # per-head width; 0 means hidden_size // num_attention_heads
    max_position_embeddings: int = 1024  # longest sequence the model is trained and served at
    rope_theta: float = 10000.0  # RoPE base frequency
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_word_embeddings: bool = True  # share the input embedding with the output projection
    initializer_range: float = 0.02  # std of the normal init for linear and embedding weights
    bos_token_id: int | None = None  # set from the tokenizer when saved
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"model.hidden_size={self.hidden_size} is not divisible by "
                    f"model.num_attention_heads={self.num_attention_heads}; set model.head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"model.num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for RoPE")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")

    def to_hf_dict(self) -> dict[str, Any]:
        """Return the HF `config.json` dict for `LlamaForCausalLM`."""
        d = dataclasses.asdict(self)
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_act="silu",
            attention_bias=False,
            attention_dropout=0.0,
            mlp_bias=False,
            torch_dtype="float32",
            use_cache=True,
            rope_scaling=None,
        )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from an HF `config.json` dict, ignoring keys this family does not use."""
        if d.get("model_type", "llama") not in ("llama", "mistral", "qwen2") and "model_type" in d:
            raise ConfigError(
                f"config.json model_type={d['model_type']!r} is not a Llama-family decoder"
            )
        if d.get("rope_scaling"):
            raise ConfigError("config.json rope_scaling is not supported yet; remove it or use 0")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            kwargs["rope_theta"] = d["rope_parameters"].get("rope_theta", 10000.0)
        kwargs.setdefault("num_key_value_heads", d.get("num_attention_heads", 4))
        if isinstance(kwargs.get("eos_token_id"), list):
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)


# Presets. `tiny` is for tests; `small` is sized to learn the most in a few CPU minutes (a
# ~3M-parameter model sees ~1M tokens in ~6 minutes at 40 GFLOP/s); `124m` is GPT-2-small size.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "small": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    "124m": dict(
        vocab_size=50304,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=1024,
    ),
}


def preset_config(name: str, **overrides: Any) -> LlamaConfig:
    """Return the named preset's config, with `overrides` (e.g. vocab_size) applied."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model.preset={name!r} is unknown (choose from {sorted(PRESETS)}){hint}")
    values = dict(PRESETS[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return LlamaConfig(**values)
