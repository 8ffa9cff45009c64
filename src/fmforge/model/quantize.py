"""Weight-only quantisation as model surgery: `quantize_model(model, bits=8|4)` swaps every
bias-free nn.Linear (the lm_head included) for a `QuantLinear` that keeps its weight as int8 or
int4 blocks and multiplies without ever writing an fp32 copy of it.

One rule for both widths, asymmetric blocks with fp16 scale and minimum (llama.cpp's Q4_1 block,
and its 8-bit analogue): per group of 32 inputs, w = s * q + m with m = the group's minimum,
s = (max - min) / LEVELS and q = round((w - m) / s), an unsigned integer in [0, LEVELS]:
- int8, groups of 32 (default): LEVELS = 240, q one byte each; 9 bits per weight;
- int8, per output channel (group_size=0): one (s, m) per row, the same rule over the whole row;
- int4, groups of 32: LEVELS = 15, two q per byte (see native/quant.c); 5 bits per weight.
The minimum costs half a bit per weight over llama.cpp's symmetric Q8_0/Q4_0 blocks (q = round(w /
s), s = max|w| / (2^(bits-1) - 1)) and buys accuracy on weights that come from Q4_1 blocks of 32,
as SmolLM2's GGUF does: int4 reproduces them exactly, and so does int8, because 240 = 16 * 15
makes its scale d / 16 for a Q4_1 scale d (q = 16 q4), which fp16 holds exactly (255 levels would
need d / 17, rounded in fp16); symmetric blocks re-round them. Measured on SmolLM2: symmetric int4
raised perplexity by 24%; the first 16 greedy tokens of 20 chat answers matched fp32's for 17
with symmetric int8, 18 with 255-level asymmetric int8 (docs/quantize.md has the current figure).
Any q in [0, 255] loads; 240 is the quantiser's choice (a 6% coarser step than 255 elsewhere).
Rows whose width is not a multiple of 32 are padded with zero inputs. Embeddings and norms stay
fp32 (an embedding is gathered one row per token, so it is never a decode step's cost); a tied
lm_head gets its own quantised copy. With the default head_bits, int4 models keep the lm_head at
int8, as llama.cpp keeps its output matrix at higher precision: the logits are the most sensitive
product of the network.

A quantised model dir is an ordinary model dir whose config.json has
`"quantization_config": {"quant_method": "fmforge", "format_version": 2, "bits", "group_size",
"head_bits"}` and whose model.safetensors holds, for each quantised linear `NAME`, `NAME.qweight`
(uint8: (out, in_padded) for int8, (out, in_padded / 2) for int4), `NAME.scales` and `NAME.mins`
(fp16 (out, groups)) instead of `NAME.weight`. `fmforge.load` rebuilds the QuantLinears from that
key before reading the weights. Format 1 (no `format_version`: fmforge before 2026-12) stored
int8 layers symmetrically (int8 q in [-127, 127], no mins); such dirs still load, converted
exactly on load (q + 128 with m = -128 s).

The products run in native/quant.c when it builds: int8 weights widened to fp32 in registers
against fp32 activations; int4 with activations quantised to int8 per block of 32 and integer dot
products, like llama.cpp. Otherwise, or while gradients flow to the input, the weight is
dequantised in torch and F.linear runs: slower, same maths up to the int4 activation rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fmforge.errors import ConfigError, UserError
from fmforge.model.native import quant as native_quant

BLOCK = 32
QUANT_METHOD = "fmforge"
FORMAT_VERSION = 2  # 1: symmetric int8 layers (int8 q, no mins); read and converted on load
# int8 products widen the weights to fp32 in registers and keep the activations unrounded: on
# SmolLM2, int8 activations (llama.cpp's way) changed the first 16 greedy tokens of 11 of 20 chat
# answers (+0.40% perplexity, against 2 of 20 and +0.01%); the int4 kernel rounds activations
# to int8 per block, as llama.cpp does.
FLOAT_ACTIVATIONS_INT8 = True
BITS = (8, 4)
# q's largest value: 15 for int4 (Q4_1's grid), 240 = 16 * 15 for int8, so that an int8 block
# holds a Q4_1 block (SmolLM2's GGUF) exactly, its scale a power-of-two fraction of Q4_1's
LEVELS = {8: 240, 4: 15}


def _padded(in_features: int) -> int:
    return -(-in_features // BLOCK) * BLOCK


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = BLOCK):
    """Return (qweight, scales, mins) for an fp weight (out, in): the layouts in the module
    docstring (w = scales * q + mins per group)."""
    if bits not in BITS or group_size not in (0, BLOCK) or (bits == 4 and group_size != BLOCK):
        raise ConfigError(
            f"bits={bits}, group_size={group_size}: supported are 8 (32 or 0), 4 (32)"
        )
    out, cols = weight.shape
    kp = _padded(cols)
    w = torch.zeros(out, kp, dtype=torch.float32, device=weight.device)
    w[:, :cols] = weight.detach().float()
    group = kp if group_size == 0 else group_size
    blocks = w.view(out, kp // group, group)  # (out, groups, G)
    low, high = blocks.amin(-1), blocks.amax(-1)
    levels = LEVELS[bits]
    mins, scales = low.half(), ((high - low) / levels).half()  # (out, groups), rounded as stored
    divisor = scales.float().masked_fill(scales == 0, 1.0).unsqueeze(-1)
    q = torch.round((blocks - mins.float().unsqueeze(-1)) / divisor).clamp_(0, levels)
    q = q.to(torch.uint8)
    if bits == 8:
        return q.view(out, kp), scales, mins
    packed = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)  # (out, groups, 16)
    return packed.reshape(out, kp // 2), scales, mins


def dequantize_weight(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    in_features: int,
    mins: torch.Tensor,
) -> torch.Tensor:
    """Return the fp32 weight (out, in_features) that (qweight, scales, mins) stand for."""
    out, groups = scales.shape
    if bits == 8:
        q = qweight.float().view(out, groups, qweight.shape[1] // groups)
    else:
        packed = qweight.view(out, groups, BLOCK // 2)  # (out, groups, 16)
        q = torch.cat((packed & 0x0F, packed >> 4), dim=-1).float()  # (out, groups, 32)
    w = q * scales.float().unsqueeze(-1) + mins.float().unsqueeze(-1)
    return w.reshape(out, -1)[:, :in_features]


class QuantLinear(nn.Module):
    """A bias-free linear with an int8 or int4 weight: x (..., in) -> (..., out).

    legacy=True (int8 only) builds the empty layer a format-1 dir's symmetric int8 tensors load
    into; loading converts them to the current layout."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = BLOCK,
        legacy: bool = False,
    ):
        super().__init__()
        if bits not in BITS or (bits == 4 and group_size != BLOCK) or group_size not in (0, BLOCK):
            raise ConfigError(
                f"bits={bits}, group_size={group_size}: supported are 8 (32 or 0), 4 (32)"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.legacy = legacy and bits == 8
        kp = _padded(in_features)
        groups = 1 if group_size == 0 else kp // BLOCK
        width = kp if bits == 8 else kp // 2
        dtype = torch.int8 if self.legacy else torch.uint8
        self.register_buffer("qweight", torch.zeros(out_features, width, dtype=dtype))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16))
        mins = None if self.legacy else torch.zeros(out_features, groups, dtype=torch.float16)
        self.register_buffer("mins", mins)  # None (legacy) is left out of the state dict

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = BLOCK) -> QuantLinear:
        """Return the quantised twin of a bias-free nn.Linear."""
        module = cls(linear.in_features, linear.out_features, bits, group_size)
        module.qweight, module.scales, module.mins = quantize_weight(
            linear.weight, bits, group_size
        )
        return module.to(linear.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised fp32 weight (out, in): computed on each access, never stored."""
        w = dequantize_weight(self.qweight, self.scales, self.bits, self.in_features, self.mins)
        return w

    def extra_repr(self) -> str:
        group = "per channel" if self.group_size == 0 else f"groups of {self.group_size}"
        return f"{self.in_features}, {self.out_features}, int{self.bits}, {group}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native_ready(x, self) and not (torch.is_grad_enabled() and x.requires_grad):
            rows = x.reshape(-1, self.in_features)
            return grouped_matmul([self], rows).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, dtype in (
            ("qweight", self.qweight.dtype),
            ("scales", torch.float16),
            ("mins", torch.float16),
        ):
            tensor = state_dict.get(prefix + name)
            if tensor is not None and tensor.dtype != dtype:
                raise UserError(
                    f"{prefix}{name} is {tensor.dtype}, a quantised int{self.bits} layer needs "
                    f"{dtype}; the quantised model dir is corrupted: quantize it again"
                )
        for name in ("scales", "mins"):
            tensor = state_dict.get(prefix + name)
            if tensor is not None and not torch.isfinite(tensor).all():
                raise UserError(
                    f"{prefix}{name} holds NaN or infinite values; the quantised model dir is "
                    "corrupted: quantize it again"
                )
        qweight = state_dict.get(prefix + "qweight")
        if qweight is not None and self.legacy and qweight.numel() and qweight.min() < -127:
            raise UserError(f"{prefix}qweight holds -128, outside int8's [-127, 127]: corrupted")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.legacy and prefix + "qweight" in state_dict:
            # format 1: w = s * q, q in [-127, 127] is s * (q + 128) - 128 s, exactly
            self.qweight = (self.qweight.to(torch.int16) + 128).to(torch.uint8)
            self.mins = (self.scales.float() * -128).half()
            self.legacy = False


def native_ready(x: torch.Tensor, module: QuantLinear) -> bool:
    """True when the native kernels can run this product (CPU, fp32 input, library built)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and module.qweight.device.type == "cpu"
        and native_quant.library() is not None
    )


def grouped_matmul(modules: list[QuantLinear], x: torch.Tensor) -> torch.Tensor:
    """Return x (B, C_in) times the group's weights, outputs side by side: (B, sum C_out).

    The modules share their input (q/k/v, gate/up), so x is quantised once for all of them, and
    one kernel call with one thread team covers up to 3 of them. Needs `native_ready`; decode
    steps call this through model/decode.py.
    """
    lib = native_quant.library()
    x = x.contiguous()
    rows, k = x.shape
    first = modules[0]
    if len(modules) > 3 or any(
        (m.bits, m.group_size) != (first.bits, first.group_size) for m in modules
    ):
        return torch.cat([grouped_matmul([m], x) for m in modules], dim=-1)
    kp = first.qweight.shape[1] * (1 if first.bits == 8 else 2)
    per_scale = kp // BLOCK // first.scales.shape[1]
    y = torch.empty(rows, sum(m.out_features for m in modules), dtype=torch.float32)
    args = []
    for i in range(3):
        m = modules[i] if i < len(modules) else first
        args += [m.qweight.data_ptr(), m.scales.data_ptr(), m.mins.data_ptr(), m.out_features]
    lib.fmforge_quant_group(
        x.data_ptr(), rows, k, kp, first.bits, per_scale, len(modules), *args,
        y.data_ptr(), int(first.bits == 8 and FLOAT_ACTIVATIONS_INT8), torch.get_num_threads(),
    )  # fmt: skip
    return y


def decode_matmul(modules: list[QuantLinear], x: torch.Tensor) -> torch.Tensor:
    """Return x (B, C_in) times the group's weights side by side, (B, sum C_out): the native
    kernels when they run here, else the dequantised weights in torch."""
    if native_ready(x, modules[0]):
        return grouped_matmul(modules, x)
    return torch.cat([F.linear(x, m.weight.to(x.dtype)) for m in modules], dim=-1)


def parse_quantize(value: str | int | None) -> int | None:
    """Return the bit width named by 'int8'/'int4'/'8'/'4' (None passes through)."""
    if value is None:
        return None
    text = str(value).lower().removeprefix("int")
    if text not in ("8", "4"):
        raise ConfigError(f"quantize={value!r}: use int8 or int4 (bits 8 or 4)")
    return int(text)


def quantization_config(bits: int, group_size: int, head_bits: int) -> dict[str, Any]:
    """Return the `quantization_config` entry a quantised model dir's config.json carries."""
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": bits,
        "group_size": group_size,
        "head_bits": head_bits,
    }


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child.bias is None:
                found.append((parent, name, child))
    return found


def quantize_model(
    model: nn.Module,
    bits: int | str,
    group_size: int = BLOCK,
    head_bits: int | None = None,
) -> nn.Module:
    """Replace every bias-free nn.Linear of `model` by a QuantLinear, in place; return model.

    bits 8 or 4 (or 'int8'/'int4'); group_size 32, or 0 for one int8 scale per output row;
    head_bits: the lm_head's width (default: 8 for int4 models, else `bits`).
    """
    bits = parse_quantize(bits)
    if bits == 4 and group_size != BLOCK:
        raise ConfigError("int4 is quantised in groups of 32 only (group_size=32)")
    if group_size not in (0, BLOCK):
        raise ConfigError(f"group_size={group_size}: use 32, or 0 for one scale per output row")
    if getattr(model, "quantization_config", None):
        raise UserError("this model is already quantised; quantise the fp32 model instead")
    head_bits = head_bits or (8 if bits == 4 else bits)
    with torch.no_grad():
        for parent, name, linear in _targets(model):
            width = head_bits if name == "lm_head" else bits
            group = group_size if width == 8 else BLOCK
            setattr(parent, name, QuantLinear.from_linear(linear, width, group))
    model.quantization_config = quantization_config(bits, group_size, head_bits)
    model.__dict__.pop("_decode_weights", None)  # built from the fp32 weights
    return model


def prepare_quantized(model: nn.Module, config: Any, source: str = "config.json") -> None:
    """Swap empty QuantLinears in for the linears a quantised dir's `quantization_config` names,
    so that its model.safetensors loads into `model` (a freshly built fp32 model)."""
    if not isinstance(config, dict) or config.get("quant_method") != QUANT_METHOD:
        method = config.get("quant_method") if isinstance(config, dict) else config
        raise UserError(
            f"{source}: quantization_config quant_method {method!r} is not fmforge's; "
            "fmforge loads only the dirs `fmforge quantize` writes"
        )
    try:
        bits, group_size = int(config["bits"]), int(config["group_size"])
        head_bits = int(config.get("head_bits", bits))
        version = int(config.get("format_version", 1))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: quantization_config lacks a valid {e}") from e
    if version not in (1, FORMAT_VERSION):
        raise UserError(
            f"{source}: quantization_config format_version={version}; this fmforge reads 1 and "
            f"{FORMAT_VERSION}: upgrade fmforge or quantize the model again"
        )
    for value, allowed, what in ((bits, BITS, "bits"), (head_bits, BITS, "head_bits")):
        if value not in allowed:
            raise UserError(f"{source}: quantization_config {what}={value}: use 8 or 4")
    if group_size not in (0, BLOCK):
        raise UserError(f"{source}: quantization_config group_size={group_size}: use 32 or 0")
    for parent, name, linear in _targets(model):
        width = head_bits if name == "lm_head" else bits
        group = group_size if width == 8 else BLOCK
        layer = QuantLinear(linear.in_features, linear.out_features, width, group, version == 1)
        setattr(parent, name, layer)
    model.quantization_config = quantization_config(bits, group_size, head_bits)


def quantized_bytes(model: nn.Module) -> int:
    """Return the bytes of every parameter and buffer (quantised weights and scales included)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
