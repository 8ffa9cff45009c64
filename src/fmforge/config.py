"""Typed run configs: flat dataclasses per section, YAML in and out, cross-field checks.

The command line parses these with jsonargparse (`--config FILE`, dotted overrides such as
`--train.lr=3e-4`, `--print-config`); this module owns the schema and the checks that run before
any model is built. Nothing here imports torch, so `fmforge --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fmforge.errors import ConfigError


@dataclass
class ModelSection:
    """Which architecture to build."""

    preset: str = "small"  # a name from fmforge.model.config.PRESETS: tiny, small, 124m
    vocab_size: int | None = None  # None: taken from the tokenizer of the token shards
    max_position_embeddings: int | None = None  # None: the preset's context length
    # Width and depth overrides of the preset (None keeps the preset's value).
    hidden_size: int | None = None  # d_model
    intermediate_size: int | None = None  # SwiGLU hidden width
    num_hidden_layers: int | None = None  # blocks
    num_attention_heads: int | None = None  # query heads
    num_key_value_heads: int | None = None  # key/value heads
    init_from: str | None = None  # a model dir or built-in name to start from instead of random
    dropout: float | None = None  # encoders only: BERT hidden + attention dropout (None: 0.1)
    init_std: float | None = None  # fresh encoders only: std of BERT's init (None: 0.02)
    projection: int | None = None  # contrastive encoders: a Dense head to N dims after pooling


@dataclass
class DataSection:
    """Where the training tokens come from."""

    shards: str = ""  # a directory written by `fmforge data prepare`
    # --objective contrastive only: a .jsonl of {"anchor": ..., "positive": ...} records trains on
    # supervised pairs (the tokenizer: model.init_from's); empty: unsupervised SimCSE on shards.
    pairs: str = ""


@dataclass
class TrainSection:
    """Optimisation, schedule, evaluation and checkpointing."""

    max_steps: int = 300  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # tokens per sequence
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decay on matrices (not on norms/biases/embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_every: int = 100  # steps between validation passes; 0 disables
    eval_batches: int = 20  # validation batches per pass
    checkpoint_every: int = 100  # steps between checkpoints (and the last step); 0: none
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 10  # steps between metrics.jsonl records
    seed: int = 1337  # seeds init, data order and sampling


# Keys that moved from `train` to `runtime`; old configs get a message naming the new key.
MOVED_TO_RUNTIME = ("device", "dtype", "compile", "threads")
PARALLEL_CHOICES = ("auto", "none", "ddp", "fsdp")


@dataclass
class RuntimeSection:
    """Where and how a run computes; read only by the runtime set-up (train/distributed.py)."""

    device: str = "auto"  # auto, cpu, cuda
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 autocast on CUDA), float32, bfloat16
    compile: str = "auto"  # auto (on for CUDA), true, false
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    parallel: str = "auto"  # auto (ddp under torchrun), none, ddp, fsdp (FSDP2, needs torchrun)


@dataclass
class PretrainConfig:
    """Everything `fmforge pretrain` needs; written as `config.yaml` in every run dir."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain nested dicts."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> PretrainConfig:
        """Build from nested dicts, naming the source and dotted key of any unknown key."""
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ConfigError(_unknown_key_message(source, sorted(unknown)[0], list(sections)))
        kwargs = {}
        for name, section_cls in (
            ("model", ModelSection),
            ("data", DataSection),
            ("train", TrainSection),
            ("runtime", RuntimeSection),
        ):
            values = d.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: {name} must be a mapping, got {values!r}")
            known = [f.name for f in dataclasses.fields(section_cls)]
            for key in values:
                if name == "train" and key in MOVED_TO_RUNTIME:
                    raise ConfigError(
                        f"{source}: train.{key} moved to runtime.{key}; "
                        f"write --runtime.{key} (or `{key}:` under `runtime:` in YAML)"
                    )
                if key not in known:
                    raise ConfigError(
                        _unknown_key_message(
                            source, f"{name}.{key}", [f"{name}.{k}" for k in known]
                        )
                    )
            kwargs[name] = section_cls(**values)
        return cls(**kwargs)


def _unknown_key_message(source: str, key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else f" (allowed: {', '.join(allowed)})"
    return f"{source}: unknown key {key}{hint}"


def validate(cfg: PretrainConfig) -> None:
    """Check values and their consistency; raise ConfigError naming the dotted key."""
    t = cfg.train
    positive = (
        "max_steps",
        "batch_size",
        "grad_accum",
        "seq_len",
        "eval_batches",
        "keep_checkpoints",
        "log_every",
    )
    for name in positive:
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be > 0, got {getattr(t, name)}")
    for name in ("eval_every", "checkpoint_every", "warmup_steps", "weight_decay", "grad_clip"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if not t.lr > 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if t.warmup_steps > t.max_steps:
        raise ConfigError(
            f"train.warmup_steps={t.warmup_steps} is larger than train.max_steps={t.max_steps}; "
            "lower the warmup or raise max_steps"
        )
    validate_runtime(cfg.runtime)
    from fmforge.model.config import PRESETS  # light: no torch

    if cfg.model.preset not in PRESETS:
        close = difflib.get_close_matches(cfg.model.preset, PRESETS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"model.preset={cfg.model.preset!r} is not one of {sorted(PRESETS)}{hint}"
        )
    if not cfg.data.shards and not cfg.data.pairs:
        raise ConfigError(
            "data.shards is empty; pass --data.shards DIR from `fmforge data prepare`"
        )
    if cfg.data.shards and not Path(cfg.data.shards).is_dir():
        raise ConfigError(f"data.shards={cfg.data.shards} is not a directory")
    if cfg.data.pairs and not Path(cfg.data.pairs).is_file():
        raise ConfigError(f"data.pairs={cfg.data.pairs} is not a file")


def validate_runtime(runtime: RuntimeSection) -> None:
    """Check the runtime section's choices; raise ConfigError naming the dotted key."""
    choices = {
        "device": ("auto", "cpu", "cuda"),
        "dtype": ("auto", "float32", "bfloat16"),
        "compile": ("auto", "true", "false"),
        "parallel": PARALLEL_CHOICES,
    }
    for name, allowed in choices.items():
        value = str(getattr(runtime, name)).lower()
        if value not in allowed:
            raise ConfigError(
                f"runtime.{name}={getattr(runtime, name)!r} is not one of {list(allowed)}"
            )
    if runtime.threads < 0:
        raise ConfigError(f"runtime.threads must be >= 0, got {runtime.threads}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; refuse tags that could build objects."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such config file") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"{path}: invalid or unsafe YAML ({first})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def dump_yaml(cfg: PretrainConfig) -> str:
    """Return the resolved config as YAML that `--config` reads back unchanged."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
