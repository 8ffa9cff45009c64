"""Cost tools: parameter counts, FLOPs, the catalog, the calculator and the memory planner.

Published estimates are regression tests; each names its source and its inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from fmforge.cli import main
from fmforge.cost import flops
from fmforge.cost.calculator import (
    catalog_costs,
    estimate_cost,
    plan_memory,
    total_training_flops,
)
from fmforge.cost.hardware import get_gpu, gpu_names
from fmforge.errors import UserError
from fmforge.model.config import PRESETS, preset_config
from fmforge.model.llama import LlamaForCausalLM


def run_cli(capsys, command: str) -> tuple[int, str, str]:
    code = main(command.split())
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# Parameter counts and FLOPs.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("tied", [True, False])
def test_num_params_equals_built_model(name, tied):
    config = preset_config(name, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    assert flops.num_params(config) == sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    head = 0 if tied else model.lm_head.weight.numel()
    assert flops.num_params(config, include_embedding=False) == (
        flops.num_params(config) - embedding - head
    )


def test_training_flops_per_token_is_6n_plus_palm_attention_term():
    config = preset_config("124m")
    n = flops.num_params(config, include_embedding=False) + config.vocab_size * config.hidden_size
    expected = 6 * n + 12 * 12 * 768 * 1024  # 12 · L · H·D · T (PaLM appendix B)
    assert flops.training_flops_per_token(config, 1024) == pytest.approx(expected)
    # Forward is a third of training: 2N + 4·L·H·D·T.
    assert flops.inference_flops_per_token(config, 1024) == pytest.approx(expected / 3)


def test_kv_cache_and_mfu():
    config = preset_config("small")  # 4 layers, 2 KV heads of 64
    assert flops.kv_cache_bytes_per_token(config, "bf16") == 2 * 4 * 2 * 64 * 2
    assert flops.kv_cache_bytes_per_token(config, "fp32") == 2 * 4 * 2 * 64 * 4
    assert flops.mfu(1000.0, 1e9, 4e12) == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------
# Catalog.
# ---------------------------------------------------------------------------------------------


def test_catalog_has_required_accelerators_and_did_you_mean():
    for name in ("v100", "a100-40gb", "a100-80gb", "h100-sxm", "h200", "rtx-4090", "l4", "tpu-v3"):
        gpu = get_gpu(name)
        assert gpu.peak_flops(gpu.default_dtype()) > 1e13
        assert gpu.memory_gb > 0 and gpu.price_per_hour > 0 and gpu.price_note
    assert get_gpu("h100-sxm").peak_flops("bf16") == pytest.approx(989.4e12)
    assert get_gpu("H100").name == "h100-sxm"
    assert "cpu" in gpu_names()
    with pytest.raises(UserError, match="did you mean a100-40gb or a100-80gb"):
        get_gpu("a100")


def test_this_cpu_is_measured():
    cpu = get_gpu("cpu")
    assert 1e8 < cpu.peak_flops("fp32") < 1e14
    with pytest.raises(UserError, match="no bf16 peak"):
        cpu.peak_flops("bf16")


# ---------------------------------------------------------------------------------------------
# Published estimates.
# ---------------------------------------------------------------------------------------------


def test_lambda_gpt3_estimate(capsys):
    # Lambda Labs, "OpenAI's GPT-3 Language Model: A Technical Overview" (2020): 3.14e23 FLOPs at a
    # sustained 28 TFLOPS per V100 is 355 GPU-years and at least $4.6M at their lowest 3-year
    # reserved cloud price (about $1.5 per GPU-hour).
    code, out, _ = run_cli(
        capsys, "cost --flops 3.14e23 --gpu v100 --tflops 28 --price-per-hour 1.5 --json"
    )
    assert code == 0
    result = json.loads(out)
    assert result["gpu_years"] == pytest.approx(355, rel=0.01)
    assert 4.5e6 <= result["cost_usd"] <= 4.8e6
    for key in ("total_flops", "gpu_hours", "gpu_years", "wall_hours", "cost_usd", "energy_kwh"):
        assert key in result
    assert "28 TFLOP/s sustained" in result["assumptions"]["rate"]


def test_gpt3_paper_flops_and_pf_days(capsys):
    # Brown et al. 2020 (GPT-3), Table D.1: 175B params, 300B tokens, 3.14e23 FLOPs = 3,640
    # PF-days. 6ND gives 3.15e23.
    code, out, _ = run_cli(
        capsys, "cost --params 175e9 --tokens 300e9 --gpu v100 --tflops 28 --json"
    )
    assert code == 0
    assert json.loads(out)["total_flops"] == pytest.approx(3.15e23, rel=0.01)
    result = estimate_cost(3.14e23, gpu="v100", tflops=28)
    assert result["pf_days"] == pytest.approx(3640, rel=0.01)


def test_llm_c_gpt2_124m_reproduction():
    # Karpathy, llm.c discussion #481 (2024), "Reproducing GPT-2 (124M) in llm.c in 90 minutes for
    # $20": 124M params, 10B FineWeb tokens, one 8x A100 80GB SXM node at about $14/h ($1.75 per
    # GPU-hour). The MFU (60% of the bf16 peak) is our assumption for that well-tuned run.
    total, _ = total_training_flops(params=124e6, tokens=10e9)
    result = estimate_cost(total, gpu="a100-80gb", mfu=0.6, gpus=8, price_per_hour=14 / 8)
    assert result["wall_hours"] * 60 == pytest.approx(90, rel=0.15)
    assert result["cost_usd"] == pytest.approx(20, rel=0.15)


def test_llama2_70b_gpu_hours_and_chinchilla_budget():
    # Touvron et al. 2023 (Llama 2), Table 2: the 70B model took 1,720,320 A100-80GB GPU-hours for
    # 2T tokens, at 400 W per GPU. At the default 40% MFU of the bf16 peak the calculator lands
    # within 10% of that, and the energy uses the same 400 W.
    total, _ = total_training_flops(params=70e9, tokens=2e12)
    result = estimate_cost(total, gpu="a100-80gb")
    assert result["mfu"] == 0.4 and result["dtype"] == "bf16"
    assert result["gpu_hours"] == pytest.approx(1_720_320, rel=0.10)
    assert result["energy_kwh"] == pytest.approx(result["gpu_hours"] * 0.4)
    # Hoffmann et al. 2022 (Chinchilla): 70B params on 1.4T tokens used Gopher's budget of 5.76e23
    # FLOPs; 6ND agrees within 3%.
    chinchilla, _ = total_training_flops(params=70e9, tokens=1.4e12)
    assert chinchilla == pytest.approx(5.76e23, rel=0.03)


# ---------------------------------------------------------------------------------------------
# Calculator details and bad input.
# ---------------------------------------------------------------------------------------------


def test_preset_tokens_and_human_output_states_assumptions(capsys):
    code, out, _ = run_cli(capsys, "cost --preset 124m --tokens 1e9 --gpu h100 --gpus 8")
    assert code == 0
    assert "40% MFU (default" in out and "bf16" in out
    assert "$3 per GPU-hour (catalog" in out
    assert "700 W per GPU" in out and "8 GPU(s)" in out
    per_token = flops.training_flops_per_token(preset_config("124m"), 1024)
    result = estimate_cost(per_token * 1e9, gpu="h100-sxm", gpus=8)
    assert f"{result['total_flops']:.3g}" in out


def test_model_config_file(tmp_path, capsys):
    config = preset_config("small")
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    argv = ["cost", "--model-config", str(tmp_path), "--tokens", "1e6", "--gpu", "l4"]
    code = main([*argv, "--mfu", "0.3", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    expected = flops.training_flops_per_token(config, 512) * 1e6
    assert json.loads(out)["total_flops"] == pytest.approx(expected)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--flops", "-1", "--gpu", "v100"], "must be a positive number"),
        (["--flops", "0", "--gpu", "v100"], "must be a positive number"),
        (["--flops", "1e20", "--gpu", "h10"], "did you mean h100-sxm"),
        (["--flops", "1e20", "--gpu", "v100", "--tflops", "20", "--mfu", "0.3"], "not both"),
        (["--flops", "1e20", "--params", "1e9", "--tokens", "1e9", "--gpu", "v100"], "exactly one"),
        (["--params", "1e9", "--gpu", "v100"], "--tokens is needed"),
        (["--flops", "1e20", "--gpu", "v100", "--mfu", "1.5"], "fraction of peak"),
        (["--flops", "1e20", "--gpu", "l4", "--gpus", "0"], "--gpus must be"),
        (["--flops", "1e20", "--gpu", "tpu-v3", "--dtype", "fp32"], "no fp32 peak"),
        (["--flops", "1e20"], "give --gpu"),
        (["--memory", "--preset", "small"], "--batch-size"),
        (["--memory", "--preset", "small", "--batch-size", "4", "--flops", "1e20"], "do not apply"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, message):
    code = main(["cost", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Memory planner.
# ---------------------------------------------------------------------------------------------


def test_memory_planner_explains_terms_and_suggests_fixes(capsys):
    code, out, _ = run_cli(
        capsys, "cost --memory --preset 124m --batch-size 64 --seq-len 1024 --gpu rtx-4090"
    )
    assert code == 0
    for term in ("weights", "gradients", "optimizer", "activations", "logits"):
        assert term in out
    assert "B*T x L x (4C + 3HD + 2KD + 4F)" in out
    assert "does NOT fit on rtx-4090" in out
    assert "gradient-accumulation steps" in out and "activation checkpointing" in out
    assert "bf16 mixed precision" in out  # the assumption, in words
    plan = plan_memory(preset_config("124m"), 8, 1024, gpu="h100-sxm")
    assert plan["fits"] is True and plan["suggestions"] == []
    smaller = plan_memory(preset_config("124m"), 8, 1024, gpu="h100-sxm", checkpointing=True)
    assert smaller["total_bytes"] < plan["total_bytes"]
    lora = plan_memory(preset_config("124m"), 8, 1024, gpu="h100-sxm", lora_rank=8)
    assert lora["terms"][2]["bytes"] < plan["terms"][2]["bytes"] / 50  # optimizer state


MEASURE_STEP = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.nn.functional as F
    from fmforge.model.config import preset_config
    from fmforge.model.llama import LlamaForCausalLM

    torch.set_num_threads(1)

    def status_mib(field):
        # /proc, not getrusage: ru_maxrss is inherited from the (large) pytest parent.
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith(field + ":"))
        return int(line.split()[1]) / 1024  # kB

    def train_step(config, batch, seq):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ids = torch.randint(0, config.vocab_size, (batch, seq + 1))
        for _ in range(2):  # the second step runs with the AdamW state already allocated
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del logits, loss

    train_step(preset_config("tiny"), 1, 8)  # one-time kernel and thread-pool allocations
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = status_mib("VmRSS")
    train_step(preset_config("small"), int(sys.argv[1]), int(sys.argv[2]))
    print(json.dumps({"peak_growth_mib": status_mib("VmHWM") - base}))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_memory_planner_matches_measured_cpu_step():
    """The `small` preset's AdamW step at batch 8 x 128 on CPU: estimate within 25% of peak RSS."""
    batch, seq = 8, 128
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_STEP, str(batch), str(seq)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    measured = json.loads(done.stdout.strip().splitlines()[-1])["peak_growth_mib"] * 2**20
    plan = plan_memory(preset_config("small"), batch, seq)
    assert plan["dtype"] == "fp32"
    assert plan["total_bytes"] == pytest.approx(measured, rel=0.25), (plan["total_bytes"], measured)


def test_catalog_costs_for_run_reports():
    # What a run's FLOPs would cost on every catalog GPU (used by training reports).
    rows = catalog_costs(1e20, mfu=0.4)
    assert {r["gpu"] for r in rows} >= {"v100", "a100-80gb", "h100-sxm", "tpu-v3"}
    h100 = next(r for r in rows if r["gpu"] == "h100-sxm")
    assert h100["gpu_hours"] == pytest.approx(1e20 / (0.4 * 989.4e12) / 3600)
    assert h100["cost_usd"] == pytest.approx(h100["gpu_hours"] * 3.0)
