"""The one training loop: gradient accumulation, schedule, checkpoints, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from batches import FixedBatches, unequally_masked
from fmforge.config import RuntimeSection, TrainSection
from fmforge.model.llama import LlamaForCausalLM
from fmforge.train.distributed import setup_runtime
from fmforge.train.objectives import causal_lm_loss
from fmforge.train.optim import lr_at
from fmforge.train.trainer import Trainer
from polling import wait_until


def _first_step_grads(config, x, y, tmp_path, batch_size, grad_accum):
    """Run one optimizer step through the Trainer; return the gradients it stepped with."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    cfg = TrainSection(
        max_steps=1,
        batch_size=batch_size,
        grad_accum=grad_accum,
        warmup_steps=0,
        eval_every=0,
        checkpoint_every=0,
        lr=1e-2,
        grad_clip=1.0,
    )
    trainer = Trainer(
        model, cfg, tmp_path, FixedBatches(x, y, batch_size), causal_lm_loss, progress=False
    )
    grads = {}
    trainer.optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
    )
    trainer.fit()
    return grads


def _max_diff(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_unequal_masked_micro_batches_accumulate_like_one_batch(tiny_config, tmp_path):
    x, y = unequally_masked(tiny_config.vocab_size)
    big = _first_step_grads(tiny_config, x, y, tmp_path / "big", batch_size=8, grad_accum=1)
    acc = _first_step_grads(tiny_config, x, y, tmp_path / "acc", batch_size=2, grad_accum=4)
    assert big.keys() == acc.keys()
    for name in big:
        # Same maths (clipped gradient of the per-target mean), different summation order:
        # equal to float32 rounding, 1e-6 absolute on gradients of order 1e-2.
        assert torch.allclose(big[name], acc[name], atol=1e-6, rtol=1e-4), name

    # The data can tell the two weightings apart: the mean of per-micro-batch means differs.
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config)
    for i in range(0, 8, 2):
        loss, scored = causal_lm_loss(model, (x[i : i + 2], y[i : i + 2]))
        (loss / scored / 4).backward()
    per_batch_mean = {n: p.grad for n, p in model.named_parameters()}
    norm = torch.cat([g.flatten() for g in per_batch_mean.values()]).norm()
    per_batch_mean = {n: g * min(1.0, 1.0 / norm.item()) for n, g in per_batch_mean.items()}
    assert _max_diff(per_batch_mean, big) > 100 * _max_diff(acc, big)


def test_window_without_scored_targets_is_an_error(tiny_config, tmp_path):
    from fmforge.errors import DataError

    x = torch.randint(0, tiny_config.vocab_size, (2, 8))
    y = torch.full((2, 8), -100)
    with pytest.raises(DataError, match="no scored targets"):
        _first_step_grads(tiny_config, x, y, tmp_path, batch_size=2, grad_accum=1)


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


# ---- exact resume through the CLI, with SIGKILL -------------------------------------------


def _pretrain_cmd(shards_dir, out, max_steps=40):
    return [
        sys.executable,
        "-m",
        "fmforge.cli",
        "pretrain",
        "--data.shards",
        str(shards_dir),
        "--model.preset",
        "tiny",
        "--train.max_steps",
        str(max_steps),
        "--train.batch_size",
        "8",
        "--train.seq_len",
        "64",
        "--train.warmup_steps",
        "4",
        "--train.checkpoint_every",
        "3",
        "--train.keep_checkpoints",
        "2",
        "--train.log_every",
        "1",
        "--train.eval_every",
        "10",
        "--train.eval_batches",
        "2",
        "--runtime.threads",
        "1",
        "--out",
        str(out),
    ]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "FMFORGE_FAULT_KILL_DURING_CHECKPOINT"}
    return {**env, **extra}


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _signature(run: Path):
    records = _records(run)
    weights = load_file(str(run / "final" / "model.safetensors"))
    return (
        [(r["step"], r["loss"], r["lr"], r["tokens"], r.get("val_loss")) for r in records],
        weights,
    )


@pytest.fixture(scope="module")
def uninterrupted(shards_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(_pretrain_cmd(shards_dir, run), check=True, env=_env(), capture_output=True)
    return _signature(run)


def _assert_same(run: Path, reference):
    records, weights = _signature(run)
    ref_records, ref_weights = reference
    assert [r[0] for r in records] == list(range(1, 41))  # no step skipped or repeated
    assert records == ref_records  # losses, LR, tokens and val losses bit for bit
    assert weights.keys() == ref_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], ref_weights[key]), key


def test_resume_after_sigkill_mid_run_and_mid_checkpoint(shards_dir, tmp_path, uninterrupted):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        _pretrain_cmd(shards_dir, run),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics = run / "metrics.jsonl"
    wait_until(
        lambda: (
            proc.poll() is not None or (metrics.exists() and metrics.read_text().count("\n") >= 8)
        ),
        timeout=120,
        interval=0.005,
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # Second kill: SIGKILL inside the write of the step-24 checkpoint (a test hook).
    killed = subprocess.run(
        [*_pretrain_cmd(shards_dir, run), "--resume", "auto"],
        env=_env(FMFORGE_FAULT_KILL_DURING_CHECKPOINT="24"),
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / ".tmp-step-24").exists()  # the half-written one
    done = subprocess.run(
        [*_pretrain_cmd(shards_dir, run), "--resume", "auto"],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stderr and "step-21" in done.stderr
    _assert_same(run, uninterrupted)


def test_corrupt_newest_checkpoint_is_skipped(shards_dir, tmp_path, uninterrupted):
    run = tmp_path / "run"
    cmd = _pretrain_cmd(shards_dir, run)
    first = subprocess.run(
        cmd, env=_env(FMFORGE_FAULT_KILL_DURING_CHECKPOINT="30"), capture_output=True
    )
    assert first.returncode == -signal.SIGKILL
    newest = run / "checkpoints" / "step-27" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated: sha256 and size fail
    done = subprocess.run([*cmd, "--resume", "auto"], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "skipping checkpoint" in done.stderr and "step-27" in done.stderr
    assert "resumed from" in done.stderr and "step-24" in done.stderr
    _assert_same(run, uninterrupted)


@pytest.mark.slow
def test_compiled_objective_trains_like_eager(tiny_config, tmp_path):
    """runtime.compile=true compiles forward + loss whole; the gradients match eager closely."""
    x = torch.randint(0, tiny_config.vocab_size, (4, 16))
    y = torch.randint(0, tiny_config.vocab_size, (4, 16))
    eager = _first_step_grads(tiny_config, x, y, tmp_path / "eager", batch_size=4, grad_accum=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config)
    cfg = TrainSection(
        max_steps=1,
        batch_size=4,
        warmup_steps=0,
        eval_every=0,
        checkpoint_every=0,
        lr=1e-2,
    )
    runtime = setup_runtime(RuntimeSection(compile="true"))
    batches = FixedBatches(x, y, 4)
    trainer = Trainer(
        model, cfg, tmp_path / "compiled", batches, causal_lm_loss, runtime=runtime, progress=False
    )
    grads = {}
    trainer.optimizer.register_step_pre_hook(
        lambda *_: grads.update({n: p.grad.clone() for n, p in model.named_parameters()})
    )
    trainer.fit()
    for name in eager:
        assert torch.allclose(eager[name], grads[name], atol=1e-5, rtol=1e-3), name


def test_quickstart_tiny_reports_samples_and_an_honest_mfu(corpus_file, tmp_path):
    from fmforge.quickstart import SAMPLE_PROMPTS, quickstart

    result = quickstart(
        out=str(tmp_path / "qs"), max_steps=6, preset="tiny", corpus=str(corpus_file)
    )
    assert [s["prompt"] for s in result["samples"]] == list(SAMPLE_PROMPTS)
    assert result["completion"].startswith(SAMPLE_PROMPTS[0])
    report = (tmp_path / "qs" / "run" / "report.md").read_text()
    assert "## Samples" in report and "temperature 0.8" in report
    assert result["mfu"] is None or 0 < result["mfu"] <= 1
    assert result["peak_flops"] > 0
    # Sampled with seeds: a second completion with the same seed is identical.
    from fmforge.api import load_decoder
    from fmforge.generate.defaults import sampling_defaults

    loaded = load_decoder(tmp_path / "qs" / "run" / "final")
    again = loaded.generate(
        SAMPLE_PROMPTS[0], max_new_tokens=64, seed=0, **sampling_defaults(loaded)
    )
    assert again == result["samples"][0]["completion"]


def test_compile_auto_on_cpu_is_decided_from_the_planned_work(tiny_config, tmp_path):
    from fmforge.train.distributed import COMPILE_SECONDS, compile_pays_off

    peak = 100e9
    assert not compile_pays_off(1e12, peak)  # ~17 s of eager steps: compiling costs more
    assert compile_pays_off(1e15, peak)  # ~4.6 hours: compile
    x = torch.randint(0, tiny_config.vocab_size, (4, 16))
    cfg = TrainSection(max_steps=2, batch_size=4, warmup_steps=0, eval_every=0)
    runtime = setup_runtime(RuntimeSection(compile="auto"))
    assert runtime.compile is None  # undecided until the trainer knows the plan
    trainer = Trainer(
        LlamaForCausalLM(tiny_config), cfg, tmp_path, FixedBatches(x, x, 4), causal_lm_loss,
        flops_per_token=1e6, runtime=runtime, progress=False,
    )  # fmt: skip
    summary = trainer.fit()
    assert summary["compiled"] is False and COMPILE_SECONDS > 0
    state = json.loads((tmp_path / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["compile"] is False  # recorded, so a resumed run computes the same way


def test_mfu_above_one_is_an_error_never_a_figure(tiny_config, monkeypatch, capsys):
    from fmforge.cost import hardware
    from fmforge.cost.flops import ImpossibleMFU, mfu
    from fmforge.train.trainer import PeakFlops

    assert mfu(500.0, 1e9, 1e12) == pytest.approx(0.5)
    with pytest.raises(ImpossibleMFU, match="exceeds the peak"):
        mfu(2000.0, 1e9, 1e12)  # a step 2x faster than the hardware can go
    # The trainer's peak: re-measured when a reading would exceed it, else no figure at all.
    readings = iter([1e9, 5e9, 5e9])
    monkeypatch.setattr(hardware, "measure_peak_flops", lambda *a, **k: next(readings))
    peak = PeakFlops(LlamaForCausalLM(tiny_config), 64, setup_runtime())
    assert peak.mfu(2.0, 1e9) == pytest.approx(0.4)  # 2e9 > 1e9: re-measured to 5e9
    assert peak.value == 5e9
    assert peak.mfu(10.0, 1e9) is None  # 1e10 > 5e9 even after re-measuring
    assert "no MFU reported" in capsys.readouterr().err


def test_peak_is_measured_at_the_model_gemm_shapes(tiny_config):
    from fmforge.train.trainer import model_gemm_shapes

    shapes = model_gemm_shapes(LlamaForCausalLM(tiny_config), 128)
    c, f, v = tiny_config.hidden_size, tiny_config.intermediate_size, tiny_config.vocab_size
    kv = tiny_config.num_key_value_heads * tiny_config.head_dim
    assert {(128, c, c), (128, c, kv), (128, c, f), (128, f, c), (128, c, v)} <= set(shapes)
