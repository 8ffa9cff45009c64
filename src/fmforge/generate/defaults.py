"""Sampling defaults of `fmforge generate` and `fmforge chat`: the model's own, else fmforge's.

A model may ship recommended settings: an HF model dir in `generation_config.json` (temperature,
top_k, top_p, min_p, repetition_penalty; `do_sample: false` means greedy), a GGUF file in its
`general.sampling.*` metadata (temp, top_k, top_p, min_p, penalty_repeat). Whatever it does not
name comes from `DEFAULT_SAMPLING`, the values llama.cpp uses, so a model samples as people
expect from other local runtimes. Greedy decoding is one flag away (`--greedy`), and the Python
API (`fmforge.load(...).generate`) stays greedy unless asked otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DEFAULT_SAMPLING: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "repetition_penalty": 1.0,
}

_HF_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
_GGUF_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def shipped_sampling(source: str | os.PathLike | None) -> dict[str, Any]:
    """Return the sampling settings a model dir or GGUF file recommends ({} when none)."""
    if not source:
        return {}
    path = Path(source)
    if path.is_dir():
        file = path / "generation_config.json"
        if not file.is_file():
            return {}
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError):
            return {}
        found = {k: config[k] for k in _HF_KEYS if config.get(k) is not None}
        if config.get("do_sample") is False:
            found["temperature"] = 0.0
        return found
    if path.suffix == ".gguf" and path.is_file():
        try:
            import gguf

            reader = gguf.GGUFReader(str(path))
        except Exception:  # no gguf package or an unreadable file: the loader reports those
            return {}
        found = {}
        for key, name in _GGUF_KEYS.items():
            field = reader.fields.get(key)
            if field is not None:
                found[name] = field.contents()
        return found
    return {}


def sampling_defaults(loaded: Any) -> dict[str, Any]:
    """Return the sampling keyword defaults for `loaded`: its shipped ones over DEFAULT_SAMPLING."""
    provenance = getattr(loaded, "provenance", None) or {}
    shipped: dict[str, Any] = {}
    for source in (getattr(loaded, "source", None), provenance.get("source")):
        if source and (Path(source).is_dir() or str(source).endswith(".gguf")):
            shipped = shipped_sampling(source)
            break
    return {**DEFAULT_SAMPLING, **shipped}
