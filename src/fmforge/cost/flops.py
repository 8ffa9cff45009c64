"""Parameter counts, FLOPs, KV-cache and training memory: pure functions of a `LlamaConfig`.

Notation (as in model/llama.py): V vocab, C hidden size, F intermediate (MLP) size, L layers,
H query heads, K key/value heads, D head dim, T sequence length, B batch size.

FLOPs follow the PaLM paper (Chowdhery et al. 2022, appendix B): a training token costs
6·N (forward 2·N, backward 4·N, N = parameters used in matmuls) plus 12·L·H·D·T for the attention
score and value products, counted over the full T×T square as PaLM does. MFU is model FLOPs
actually achieved per second divided by the hardware peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fmforge.errors import UserError
from fmforge.model.config import LlamaConfig

# Bytes per element for the dtype names used across fmforge's cost tools.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


def dtype_bytes(dtype: str) -> int:
    """Return bytes per element for a dtype name ("fp32", "bf16", ...)."""
    if dtype not in DTYPE_BYTES:
        raise UserError(f"dtype {dtype!r} is unknown (choose from {sorted(DTYPE_BYTES)})")
    return DTYPE_BYTES[dtype]


# ---------------------------------------------------------------------------------------------
# Parameter counts.
# ---------------------------------------------------------------------------------------------


def layer_params(config: LlamaConfig) -> int:
    """Return the parameters of one decoder block (attention, SwiGLU MLP, two RMSNorms)."""
    c, f = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * config.head_dim  # H·D
    kv_width = config.num_key_value_heads * config.head_dim  # K·D
    attention = c * q_width + 2 * c * kv_width + q_width * c  # q, k, v, o projections
    mlp = 3 * c * f  # gate, up, down
    norms = 2 * c
    return attention + mlp + norms


def num_params(config: LlamaConfig, include_embedding: bool = True) -> int:
    """Return the parameter count of `LlamaForCausalLM(config)`, tied weights counted once.

    include_embedding=False gives Kaplan et al.'s "non-embedding" count: the blocks and the final
    norm, without the token embedding and without the output head (lm_head).
    """
    body = config.num_hidden_layers * layer_params(config) + config.hidden_size  # + final norm
    if not include_embedding:
        return body
    embedding = config.vocab_size * config.hidden_size
    head = 0 if config.tie_word_embeddings else embedding
    return body + embedding + head


def matmul_params(config: LlamaConfig) -> int:
    """Return the parameters that take part in a matmul per token: the blocks plus lm_head.

    The embedding lookup is a gather (no FLOPs); the output head is a V×C matmul whether or not its
    weight is tied to the embedding. Norm weights are included (negligible).
    """
    return num_params(config, include_embedding=False) + config.vocab_size * config.hidden_size


# ---------------------------------------------------------------------------------------------
# FLOPs.
# ---------------------------------------------------------------------------------------------


def attention_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Return the forward FLOPs per token of QK^T and AV: 2·2·L·H·D·T (full T×T, as PaLM)."""
    q_width = config.num_attention_heads * config.head_dim
    return 4.0 * config.num_hidden_layers * q_width * seq_len


def training_flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Return training FLOPs per token (forward + backward): 6·N + 12·L·H·D·T (PaLM app. B).

    N is `matmul_params(config)`; T is the training sequence length.
    """
    if seq_len <= 0:
        raise UserError(f"seq_len must be positive, got {seq_len}")
    return 6.0 * matmul_params(config) + 3.0 * attention_flops_per_token(config, seq_len)


def inference_flops_per_token(config: LlamaConfig, context_len: int) -> float:
    """Return forward FLOPs for one token attending to `context_len` tokens: 2·N + 4·L·H·D·S."""
    if context_len < 0:
        raise UserError(f"context_len must be non-negative, got {context_len}")
    return 2.0 * matmul_params(config) + attention_flops_per_token(config, context_len)


def kv_cache_bytes_per_token(config: LlamaConfig, dtype: str = "bf16") -> int:
    """Return the KV-cache bytes one token occupies: 2 (K and V) · L · K · D · bytes."""
    kv_width = config.num_key_value_heads * config.head_dim
    return 2 * config.num_hidden_layers * kv_width * dtype_bytes(dtype)


class ImpossibleMFU(ValueError):
    """A computed MFU above 1: the peak or the FLOP count is wrong, so there is no figure."""


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Return model FLOPs utilisation: tokens/s · FLOPs/token / peak FLOP/s, a fraction in [0, 1].

    A reading above 1 is impossible (the model would beat the hardware's peak): it raises
    ImpossibleMFU instead of returning a figure nobody should print.
    """
    if peak_flops <= 0:
        raise UserError(f"peak FLOP/s must be positive, got {peak_flops}")
    value = tokens_per_second * flops_per_token / peak_flops
    if value > 1.0:
        raise ImpossibleMFU(
            f"MFU {value:.3f} > 1: {tokens_per_second:.1f} tokens/s x {flops_per_token:.4g} "
            f"FLOPs/token exceeds the peak {peak_flops:.4g} FLOP/s; the peak was measured too "
            "low or the FLOP count is wrong"
        )
    return value


# ---------------------------------------------------------------------------------------------
# Training memory.
# ---------------------------------------------------------------------------------------------


@dataclass
class MemoryTerm:
    """One line of a memory estimate: its size and the formula that gave it."""

    name: str
    bytes: float
    formula: str


@dataclass
class TrainingMemory:
    """A training-step memory estimate, term by term."""

    terms: list[MemoryTerm] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return sum(t.bytes for t in self.terms)

    def as_dict(self) -> dict[str, float]:
        return {t.name: t.bytes for t in self.terms} | {"total": self.total_bytes}


def lora_params(config: LlamaConfig, rank: int = 8) -> int:
    """Return the trainable parameters of LoRA rank `rank` on all seven linear projections."""
    c, f = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    per_layer = rank * ((c + q_width) + 2 * (c + kv_width) + (q_width + c) + 2 * (c + f) + (f + c))
    return config.num_hidden_layers * per_layer


def activation_elements_per_token(config: LlamaConfig, checkpointing: bool = False) -> dict:
    """Return the activation elements kept per token for backward, by part of the model.

    Per block (saved by autograd, fused attention so no T×T scores are kept): the block input and
    the normed input for attention (2C), q, k, v after RoPE (H·D + 2·K·D), the attention output and
    its reshaped copy (2·H·D), the normed input and input for the MLP (2C), and gate, silu(gate),
    up and their product (4F). With checkpointing only each block's input (C) is kept, plus one
    block recomputed at a time. The head keeps the final norm's input and output (2C); the loss
    keeps logits and log-probs and, at the backward peak, three V-wide gradient buffers (5V, fp32).
    Checked against the measured peak of a CPU training step in tests/test_cost.py.
    """
    c, f = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    block = 4 * c + 3 * q_width + 2 * kv_width + 4 * f
    n_layers = config.num_hidden_layers
    blocks = n_layers * c + block if checkpointing else n_layers * block
    return {"blocks": blocks, "block": block, "head": 2 * c, "loss": 5 * config.vocab_size}


def training_memory(
    config: LlamaConfig,
    batch_size: int,
    seq_len: int,
    dtype: str = "fp32",
    checkpointing: bool = False,
    lora_rank: int = 0,
) -> TrainingMemory:
    """Return the memory of one AdamW training step, term by term with formulas.

    dtype "fp32" trains in fp32; "bf16"/"fp16" is mixed precision as fmforge does it on GPU:
    fp32 master weights, gradients and AdamW state, activations in 16 bit (autocast). lora_rank > 0
    trains only LoRA adapters: gradients and optimizer state shrink to the adapters.
    Not counted: framework/CUDA context, allocator fragmentation, data-loader buffers.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if value <= 0:
            raise UserError(f"{name} must be positive, got {value}")
    act_bytes = dtype_bytes(dtype)
    n = num_params(config)
    trainable = lora_params(config, lora_rank) if lora_rank > 0 else n
    tokens = batch_size * seq_len
    act = activation_elements_per_token(config, checkpointing)
    weights = MemoryTerm(
        "weights",
        4.0 * (n + trainable if lora_rank > 0 else n),
        f"{n:,} params x 4 B (fp32 master weights)",
    )
    if lora_rank > 0:
        weights.formula += f" + {trainable:,} LoRA params x 4 B"
    grads = MemoryTerm("gradients", 4.0 * trainable, f"{trainable:,} trainable params x 4 B")
    optimizer = MemoryTerm(
        "optimizer", 8.0 * trainable, f"AdamW exp_avg + exp_avg_sq: {trainable:,} x 2 x 4 B"
    )
    c, f = config.hidden_size, config.intermediate_size
    layers_formula = (
        f"B*T x (L*C + one block) = {tokens:,} x {act['blocks']:,} elements x {act_bytes} B "
        "(checkpointing: block inputs kept, one block recomputed)"
        if checkpointing
        else f"B*T x L x (4C + 3HD + 2KD + 4F) = {tokens:,} x {config.num_hidden_layers} x "
        f"{act['block']:,} elements x {act_bytes} B (C={c}, F={f})"
    )
    activations = MemoryTerm(
        "activations", float(tokens * act["blocks"] * act_bytes), layers_formula
    )
    head = MemoryTerm(
        "logits",
        float(tokens * (act["head"] * act_bytes + act["loss"] * 4)),
        f"B*T x (2C x {act_bytes} B + 5V x 4 B) = {tokens:,} x "
        f"({act['head']:,} x {act_bytes} + {act['loss']:,} x 4) B "
        "(final norm; logits, log-probs and gradient buffers in fp32)",
    )
    return TrainingMemory([weights, grads, optimizer, activations, head])
