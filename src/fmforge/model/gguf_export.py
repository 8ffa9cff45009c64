"""Write a Llama-family model as a GGUF file that llama.cpp (and Ollama) load and run.

The reverse of model/gguf.py's reader, which reads the result back (tests/test_gguf_export.py
checks equal logits):
- metadata: `general.architecture = llama` and the `llama.*` hyperparameters;
- tensors: HF names -> `blk.N.attn_q.weight` etc.; Q and K rows permuted from HF's rotate-half
  RoPE layout to llama.cpp's interleaved pairs (model/gguf.py `unpermute` undoes it);
- dtype: f32; f16 (matrices, norms stay f32); q8_0, q4_0 or q4_1 (matrices in llama.cpp's
  32-value blocks, written with gguf-py's quantiser; norms stay f32). A quantised fmforge model is
  dequantised first, so its export is the weights it runs;
- tokenizer: byte-level BPE as `tokenizer.ggml.model = gpt2` with tokens, merges and token types
  (special tokens CONTROL), the pre-tokenizer llama.cpp must mirror (`gpt-2`, or `smollm` when
  digits are split one by one), bos/eos/pad ids and the chat template (ChatML in Jinja).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmforge.errors import UserError
from fmforge.model.gguf import _BLOCK_NAMES, _TOP_NAMES

DTYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
_TOKEN_NORMAL, _TOKEN_UNUSED, _TOKEN_CONTROL, _TOKEN_USER = 1, 5, 3, 4


def permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half Q/K rows -> llama.cpp's interleaved pairs (the inverse of gguf.unpermute).

    weight (n_heads * D, C): HF row i of a head becomes row 2i, HF row D/2 + i becomes 2i + 1.
    """
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return (
        weight.reshape(n_heads, 2, head_dim // 2, cols)  # (n, 2, D/2, C)
        .transpose(1, 2)  # (n, D/2, 2, C)
        .reshape(rows, cols)
    )


def _gguf_name(hf_name: str) -> str:
    base, _, suffix = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, layer, kind = base.split(".", 3)
        for gguf_kind, hf_kind in _BLOCK_NAMES.items():
            if kind == hf_kind:
                return f"blk.{layer}.{gguf_kind}.{suffix}"
    for gguf_base, hf_base in _TOP_NAMES.items():
        if base == hf_base:
            return f"{gguf_base}.{suffix}"
    raise UserError(f"tensor {hf_name!r} has no GGUF Llama equivalent; cannot export it")


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF-named fp32 weights; QuantLinears (model/quantize.py) dequantised, a tied head dropped."""
    from fmforge.model.quantize import QuantLinear

    state: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            state[f"{name}.weight"] = module.weight
    for name, tensor in model.state_dict().items():
        if not name.endswith((".qweight", ".scales", ".mins")):
            state[name] = tensor
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _pre_tokenizer(spec: dict[str, Any] | None) -> str:
    """Name the llama.cpp pre-tokenizer regex that splits text as `spec` (tokenizer.json) does."""
    if not spec:
        raise UserError("the tokenizer has no pre-tokenizer; llama.cpp cannot mirror it")
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    if spec.get("type") == "Sequence":
        kinds = [(p.get("type"), p.get("individual_digits")) for p in spec["pretokenizers"]]
        if kinds[:1] == [("Digits", True)] and kinds[1:2] and kinds[1][0] == "ByteLevel":
            return "smollm"  # llama.cpp's regex for SmolLM2 splits every digit
    raise UserError(
        f"pre-tokenizer {json.dumps(spec)[:80]} has no llama.cpp equivalent fmforge knows "
        "(byte-level GPT-2, optionally with single digits)"
    )


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    from fmforge.chat_template import CHATML

    spec = json.loads(tokenizer.hf.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export needs a byte-level BPE tokenizer, not {model.get('type')}")
    tokens: list[str | None] = [None] * max(vocab_size, tokenizer.vocab_size)
    types = [_TOKEN_NORMAL] * len(tokens)
    for token, index in model["vocab"].items():
        tokens[index] = token
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = _TOKEN_CONTROL if added.get("special") else _TOKEN_USER
    for i, token in enumerate(tokens):
        if token is None:  # the model's vocab may be padded past the tokenizer's
            tokens[i], types[i] = f"[PAD{i}]", _TOKEN_UNUSED
    if len(tokens) > vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        index = getattr(tokenizer, f"{role}_id")
        if index is not None:
            add(index)
    writer.add_add_bos_token(False)  # fmforge never prepends BOS; the continuation must match
    template = tokenizer.chat_template
    if template is None and tokenizer.token_to_id(CHATML.turn_start) is not None:
        template = CHATML.to_jinja()
    if template:
        writer.add_chat_template(template)


def export_gguf(loaded: Any, out: str | os.PathLike, dtype: str = "f32") -> Path:
    """Write `loaded` (a Llama-family ModelBundle) as a GGUF file at `out`; return its path."""
    import gguf
    from gguf.quants import quantize

    from fmforge.model.config import LlamaConfig

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    config = loaded.config
    if not isinstance(config, LlamaConfig):
        raise UserError("GGUF export supports Llama-family decoders only (not encoders)")
    if loaded.tokenizer is None:
        raise UserError("GGUF export needs the model's tokenizer (tokenizer.json in the dir)")
    kinds = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1,
    }
    file_types = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}  # LLAMA_FTYPE_*
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as model.gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # complete or invisible
    try:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(str(loaded.provenance.get("gguf_name") or out.stem))
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_types[dtype])
        _add_tokenizer(writer, loaded.tokenizer, config.vocab_size)
        for name, weight in _weights(loaded.model).items():
            if name.endswith("q_proj.weight"):
                weight = permute(weight, config.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                weight = permute(weight, config.num_key_value_heads)
            array = weight.numpy()
            kind = kinds[dtype] if array.ndim == 2 else gguf.GGMLQuantizationType.F32
            if kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                if array.shape[1] % 32:  # llama.cpp's blocks span 32 inputs
                    kind = gguf.GGMLQuantizationType.F16
            if kind == gguf.GGMLQuantizationType.F16:
                array = array.astype(np.float16)
            elif kind != gguf.GGMLQuantizationType.F32:
                array = quantize(array, kind)
            quantised = kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            writer.add_tensor(_gguf_name(name), array, raw_dtype=kind if quantised else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
