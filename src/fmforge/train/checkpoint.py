"""Checkpoints that are complete or invisible.

A checkpoint is written into `checkpoints/.tmp-step-N/`, every file fsynced, then `manifest.json`
(sizes + sha256 of every file) is written last and the directory is renamed to `step-N`. A reader
trusts only a directory whose manifest verifies, so a kill at any moment leaves either the previous
checkpoint or the new one, never a half-written one that is used. Rotation deletes old checkpoints
only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from fmforge.artifacts import fsync_dir, sha256_file, write_json_atomic

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Test hook: SIGKILL this process halfway through writing the checkpoint of step N.
FAULT_ENV = "FMFORGE_FAULT_KILL_DURING_CHECKPOINT"


def save_checkpoint(
    checkpoint_root: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step-N` atomically (weights, optimizer, RNG, counters); return its path."""
    from safetensors.torch import save_file

    checkpoint_root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_root / f"step-{step}"
    tmp = checkpoint_root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in weights.items()},
        str(tmp / "model.safetensors"),
        metadata={"format": "pt"},
    )
    if os.environ.get(FAULT_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    write_json_atomic(tmp / "state.json", state)
    return _publish(checkpoint_root, tmp, final, step, keep)


def _publish(checkpoint_root: Path, tmp: Path, final: Path, step: int, keep: int) -> Path:
    """fsync every file, write the manifest last, rename tmp -> final, rotate; return final."""
    files = {}
    for f in sorted(tmp.iterdir()):
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
        files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    write_json_atomic(tmp / MANIFEST, {"step": step, "files": files})
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(checkpoint_root)
    _rotate(checkpoint_root, keep)
    return final


def _rng_state() -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save_sharded_checkpoint(
    checkpoint_root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    runtime: Any,
) -> Path:
    """Write checkpoint `step-N` of an FSDP2 run: every rank writes its shards, then one manifest.

    The model and optimizer go through torch distributed checkpoint (one `.distcp` file per rank
    plus `.metadata`), each rank's RNG state to `rng-rank{R}.pt`, and `state.json` records the
    world size. All ranks must call this; rank 0 publishes the directory atomically as usual.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoint_root / f"step-{step}"
    tmp = checkpoint_root / f".tmp-step-{step}"
    if runtime.is_main:
        checkpoint_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    runtime.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng-rank{runtime.rank}.pt")
    runtime.barrier()
    if runtime.is_main:
        if os.environ.get(FAULT_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        write_json_atomic(tmp / "state.json", state)
        _publish(checkpoint_root, tmp, final, step, keep)
    runtime.barrier()
    return final


def is_sharded(path: Path) -> bool:
    """Return True for a checkpoint written by `save_sharded_checkpoint`."""
    return (path / ".metadata").is_file()


def load_sharded_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int
) -> dict[str, Any]:
    """Load an FSDP2 checkpoint into the sharded `model` and `optimizer` in place.

    Returns this rank's RNG state and the saved state dict.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=str(path))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optimizer"],
    )
    return {
        "rng": torch.load(path / f"rng-rank{rank}.pt", weights_only=True),
        "state": json.loads((path / "state.json").read_text(encoding="utf-8")),
    }


def _rotate(checkpoint_root: Path, keep: int) -> None:
    for old in list_checkpoints(checkpoint_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(checkpoint_root: Path) -> list[Path]:
    """Return `step-N` dirs sorted by N (oldest first), whether or not they verify."""
    if not checkpoint_root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in checkpoint_root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> str | None:
    """Return None if the checkpoint's manifest verifies, else the reason it does not."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return "no manifest (the write did not finish)"
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        return "unreadable manifest"
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, manifest says {info['bytes']}"
        if sha256_file(f) != info["sha256"]:
            return f"{name} fails its sha256 check"
    return None


def latest_valid_checkpoint(checkpoint_root: Path) -> Path | None:
    """Return the newest checkpoint that verifies; say on stderr which ones were skipped and why."""
    for path in reversed(list_checkpoints(checkpoint_root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        print(f"fmforge: skipping checkpoint {path}: {problem}", file=sys.stderr)
    return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Return weights, optimizer state, RNG states and the saved state dict of a checkpoint."""
    from safetensors.torch import load_file

    return {
        "weights": load_file(str(path / "model.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "rng": torch.load(path / "rng.pt", weights_only=True),
        "state": json.loads((path / "state.json").read_text(encoding="utf-8")),
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Put back the torch (and CUDA) RNG states saved with a checkpoint."""
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
