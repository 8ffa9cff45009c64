"""Data-parallel pretraining under torchrun on CPU (Gloo): two ranks, one run dir."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_torchrun_two_ranks(shards_dir, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and shutil.which("torchrun") is None:
        pytest.skip("torchrun not found")
    out = tmp_path / "run"
    cmd = [
        str(torchrun if torchrun.exists() else "torchrun"), "--nproc_per_node", "2",
        "-m", "fmforge.cli", "pretrain", "--data.shards", str(shards_dir),
        "--model.preset", "tiny", "--train.max_steps", "4", "--train.warmup_steps", "1",
        "--train.batch_size", "4", "--train.seq_len", "32", "--train.eval_every", "2",
        "--train.eval_batches", "1", "--train.checkpoint_every", "2", "--train.log_every", "1",
        "--train.threads", "1", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["tokens"] == 4 * 2 * 4 * 32  # steps x ranks x batch x seq_len
    assert (out / "final" / "model.safetensors").is_file()
