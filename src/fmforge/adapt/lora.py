"""LoRA (Hu et al. 2021): a low-rank update B @ A beside frozen linear weights, as model surgery.

`apply_lora(model, targets, r, alpha, dropout)` swaps each targeted `nn.Linear` (matched by the last
part of its name: q_proj, v_proj, ...) for a `LoRALinear` that shares the original weight, so the
base parameter names do not change and the new ones are `<module>.lora_A.weight` /
`<module>.lora_B.weight`, exactly PEFT's layout. `merge_lora` folds B @ A * alpha / r into the
weights (identical logits, no extra latency), `unmerge_lora` takes it back out, `remove_lora`
restores plain linears. Adapters are saved as PEFT does (`adapter_config.json` +
`adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`), so
`peft.PeftModel.from_pretrained(transformers_model, dir)` loads them (tests/test_lora.py).

Notation: I input features, O output features, r rank.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fmforge.errors import UserError

DEFAULT_TARGETS = ("q_proj", "v_proj")
PEFT_PREFIX = "base_model.model."
FMFORGE_ADAPTER_FILE = "fmforge_adapter.json"


class LoRALinear(nn.Linear):
    """y = x W^T + dropout(x) A^T B^T * (alpha / r); W frozen and shared with the base model."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight  # the same Parameter: the base model's name keeps pointing to it
        self.bias = base.bias
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device)  # (r, I)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device)  # (O, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT does
        nn.init.zeros_(self.lora_B.weight)  # so the adapted model starts equal to the base
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """Return the low-rank update B @ A * scaling, shaped like the weight (O, I)."""
        return self.lora_B.weight @ self.lora_A.weight * self.scaling

    def merge(self) -> None:
        with torch.no_grad():
            if not self.merged:
                self.weight += self.delta_weight()
                self.merged = True

    def unmerge(self) -> None:
        with torch.no_grad():
            if self.merged:
                self.weight -= self.delta_weight()
                self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(
    model: nn.Module,
    targets: tuple[str, ...] | list[str] = DEFAULT_TARGETS,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Inject LoRA into every linear whose name ends in a target; freeze all else; return names."""
    if r < 1:
        raise UserError(f"--rank must be >= 1, got {r}")
    targets = tuple(targets)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and not isinstance(module, LoRALinear)
        and name.split(".")[-1] in targets
        and name != "lm_head"
    ]
    if not names:
        linears = sorted(
            {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise UserError(
            f"LoRA targets {list(targets)} match no linear layer; choose from {linears}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Return the injected LoRA layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the trainable LoRA matrices (A and B of every injected layer)."""
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (logits unchanged, adapter kept for unmerge)."""
    for module in lora_modules(model).values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Subtract every merged adapter from its base weight again."""
    for module in lora_modules(model).values():
        module.unmerge()


def remove_lora(model: nn.Module) -> None:
    """Replace LoRA layers by plain linears holding their (merged or not) weights."""
    for name, module in lora_modules(model).items():
        plain = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
        plain.weight, plain.bias = module.weight, module.bias
        _set_module(model, name, plain)


# --- saving and loading in PEFT's layout ------------------------------------------------------


def base_fingerprint(model: nn.Module, tokenizer: Any = None) -> str:
    """Return a short hash that identifies a base model: its config, tokenizer and weights."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_hf_dict"):
        hf = {
            k: v
            for k, v in config.to_hf_dict().items()
            if k not in ("bos_token_id", "eos_token_id", "pad_token_id")
        }
        digest.update(json.dumps(hf, sort_keys=True).encode())
    if tokenizer is not None and hasattr(tokenizer, "sha256"):
        digest.update(tokenizer.sha256.encode())
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        sample = p.detach().flatten()[:64].to("cpu", torch.float32)
        digest.update(name.encode() + sample.numpy().round(5).tobytes())
    return digest.hexdigest()[:16]


def save_lora_adapter(
    model: nn.Module,
    out: str | Path,
    base_name: str,
    fingerprint: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout) + fmforge metadata."""
    from safetensors.torch import save_file

    from fmforge.artifacts import write_json_atomic

    modules = lora_modules(model)
    if not modules:
        raise UserError("the model has no LoRA layers to save")
    first = next(iter(modules.values()))
    targets = sorted({name.split(".")[-1] for name in modules})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, module in modules.items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach().cpu()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach().cpu()
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    write_json_atomic(
        out / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_name,
            "r": first.r,
            "lora_alpha": first.alpha,
            "lora_dropout": dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "use_rslora": False,
            "use_dora": False,
        },
    )
    write_json_atomic(
        out / FMFORGE_ADAPTER_FILE, {"base_fingerprint": fingerprint, **(extra or {})}
    )
    return out


def load_lora_adapter(model: nn.Module, directory: str | Path, fingerprint: str) -> dict:
    """Inject and load a saved adapter into `model`; UserError if it was made for another base."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{directory}: no adapter_config.json; is this a LoRA adapter dir?")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise UserError(f"{config_file}: peft_type {config.get('peft_type')!r} is not LORA")
    meta_file = directory / FMFORGE_ADAPTER_FILE
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    saved = meta.get("base_fingerprint")
    if saved is not None and saved != fingerprint:
        raise UserError(
            f"{directory}: this adapter was trained on a different base model "
            f"({config.get('base_model_name_or_path')!r}; fingerprint {saved} != {fingerprint})"
        )
    apply_lora(model, config["target_modules"], config["r"], config["lora_alpha"])
    state = load_file(str(directory / "adapter_model.safetensors"))
    modules = lora_modules(model)
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        module_name, _, part = name.rpartition(".lora_")
        if module_name not in modules:
            raise UserError(f"{directory}: adapter tensor {key} has no matching layer in the base")
        target = (
            modules[module_name].lora_A if part.startswith("A") else modules[module_name].lora_B
        )
        if target.weight.shape != tensor.shape:
            raise UserError(
                f"{directory}: {key} has shape {tuple(tensor.shape)}, the base needs "
                f"{tuple(target.weight.shape)}: the adapter is for a different base"
            )
        with torch.no_grad():
            target.weight.copy_(tensor)
    return meta
