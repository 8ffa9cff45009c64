"""Data parallelism on CPU (Gloo): DDP and FSDP2 ranks give the one-process gradients and losses."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from batches import unequally_masked
from fmforge.config import TrainSection
from fmforge.model.config import preset_config
from fmforge.model.llama import LlamaForCausalLM
from fmforge.train.objectives import causal_lm_loss
from fmforge.train.trainer import Trainer

TESTS = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(parallel: str, out: Path, world_size: int = 2) -> dict:
    """Start `world_size` ranks of dist_worker.py as torchrun would; return rank 0's result."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        )
        cmd = [sys.executable, str(TESTS / "dist_worker.py"), parallel, str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    return torch.load(out, weights_only=True)


def _one_process_grads(tmp_path) -> tuple[dict, float]:
    """All 8 rows in one batch on one process: the reference gradients and loss."""
    config = preset_config("tiny", tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    x, y = unequally_masked(config.vocab_size)

    class All:
        def next_batch(self):
            return x, y

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    cfg = TrainSection(
        max_steps=1, batch_size=8, warmup_steps=0, eval_every=0, checkpoint_every=0, lr=1e-2
    )
    trainer = Trainer(model, cfg, tmp_path / "one", All(), causal_lm_loss, progress=False)
    grads = {}
    trainer.optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
    )
    trainer.fit()
    return grads, trainer.history[0]["loss"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_with_unequal_scored_tokens_match_one_process(parallel, tmp_path):
    reference, reference_loss = _one_process_grads(tmp_path)
    result = _run_ranks(parallel, tmp_path / f"{parallel}.pt")
    assert result["grads"].keys() == reference.keys()
    for name, grad in reference.items():
        assert torch.allclose(result["grads"][name], grad, atol=1e-6, rtol=1e-4), name
    assert result["loss"] == pytest.approx(reference_loss, rel=1e-6)
    # Rank 1 scores 3x the targets of rank 0: averaging the two ranks' means would differ.
    assert abs(result["loss"] - reference_loss) < 1e-5


# ---- FSDP2 through the CLI under torchrun ----------------------------------------------------


def _torchrun() -> str:
    local = Path(sys.executable).with_name("torchrun")
    if local.exists():
        return str(local)
    found = shutil.which("torchrun")
    if found is None:
        pytest.skip("torchrun not found")
    return found


def _pretrain_args(shards_dir, out, batch_size, *extra):
    return [
        "-m", "fmforge.cli", "pretrain", "--data.shards", str(shards_dir),
        "--model.preset", "tiny", "--train.max_steps", "12", "--train.warmup_steps", "2",
        "--train.batch_size", str(batch_size), "--train.seq_len", "32",
        "--train.eval_every", "6", "--train.eval_batches", "2", "--train.checkpoint_every", "4",
        "--train.log_every", "1", "--runtime.threads", "1", "--out", str(out), *extra,
    ]  # fmt: skip


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _fsdp(shards_dir, out, *extra, env=None):
    cmd = [
        _torchrun(), "--nproc-per-node", "2", "--master-port", str(_free_port()),
        *_pretrain_args(shards_dir, out, 4, "--runtime.parallel", "fsdp", *extra),
    ]  # fmt: skip
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


@pytest.mark.slow
def test_fsdp_under_torchrun_trains_resumes_and_exports(shards_dir, tmp_path):
    from fmforge.train.checkpoint import FAULT_ENV

    single = tmp_path / "single"
    proc = subprocess.run(
        [sys.executable, *_pretrain_args(shards_dir, single, 8)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    straight = tmp_path / "fsdp"
    proc = _fsdp(shards_dir, straight)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Two ranks of 4 windows each see the 8 windows of the one-process batch, in another
    # summation order: equal to float32 rounding, amplified a little by Adam over 12 steps.
    assert _losses(straight) == pytest.approx(_losses(single), rel=2e-4)
    assert len(list((straight / "checkpoints" / "step-12").glob("*.distcp"))) == 2

    # SIGKILL rank 0 halfway through writing the step-8 checkpoint, then resume.
    killed = tmp_path / "killed"
    proc = _fsdp(shards_dir, killed, env={FAULT_ENV: "8"})
    assert proc.returncode != 0
    proc = _fsdp(shards_dir, killed, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step-4" in proc.stderr
    assert _losses(killed) == _losses(straight)  # bitwise: same ranks, same order

    # The final dir is a plain HF-format model dir: transformers loads it with equal logits.
    import transformers

    from fmforge.model.load import load_model_dir

    final = straight / "final"
    ours = load_model_dir(final).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(final)
    assert set(load_file(str(final / "model.safetensors"))) <= set(hf.state_dict())
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-5)

    # Resuming the sharded run on one process, or on DDP, is refused with the way to resume.
    proc = subprocess.run(
        [sys.executable, *_pretrain_args(shards_dir, killed, 8, "--resume", "auto")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--nproc-per-node 2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_parallel_without_torchrun_is_a_one_line_error(shards_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    proc = subprocess.run(
        [sys.executable, *_pretrain_args(shards_dir, tmp_path / "x", 4, "--runtime.parallel",
                                         "fsdp")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "torchrun" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_ddp(shards_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [_torchrun(), "--nproc-per-node", "2", "--master-port", str(_free_port()),
           *_pretrain_args(shards_dir, out, 4)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[-1]["tokens"] == 12 * 2 * 4 * 32  # steps x ranks x batch x seq_len
    assert (out / "final" / "model.safetensors").is_file()
