"""The scaling experiment's pieces: held-out fit score, compute-optimal choice, budgets, xz."""

from __future__ import annotations

import json
import math

import pytest

from fmforge.cli import main
from fmforge.cost.scaling import ChinchillaLaw, fit, read_points
from fmforge.errors import UserError
from fmforge.experiments import scaling

LAW = ChinchillaLaw(E=1.2, A=60.0, B=300.0, alpha=0.35, beta=0.3, name="t", source="test")


def _points(noise: float = 0.0) -> list[dict]:
    """The sweep's 15 (N, D) points with losses from LAW, multiplied by a fixed ripple."""
    points = []
    for i, shape in enumerate(scaling.SIZES):
        for j, tokens in enumerate(scaling.TOKEN_BUDGETS):
            n = scaling.params_of(shape)
            ripple = 1 + noise * math.sin(7 * i + 3 * j)
            points.append({"params": n, "tokens": tokens, "val_loss": LAW.loss(n, tokens) * ripple})
    return points


def test_leave_one_out_r2_is_high_for_a_law_and_low_for_noise():
    r2, predictions = scaling.leave_one_out_r2(_points())
    assert r2 > 0.999
    assert predictions[0] == pytest.approx(_points()[0]["val_loss"], rel=1e-3)
    noisy = [dict(p, val_loss=3.0 + 0.3 * math.sin(5 * i)) for i, p in enumerate(_points())]
    assert scaling.leave_one_out_r2(noisy)[0] < 0.5


def test_every_family_shape_builds_with_even_head_dims():
    for shape in scaling.family():
        config = shape.config()
        assert config.head_dim % 2 == 0 and config.hidden_size % config.num_attention_heads == 0


def test_compute_optimal_is_the_family_minimum_and_grows_with_compute():
    flops = 1e13
    shape, tokens, loss = scaling.compute_optimal(LAW, flops)
    brute = min(
        LAW.loss(scaling.params_of(s), int(flops / scaling.flops_per_token(s)))
        for s in scaling.family()
    )
    assert loss == pytest.approx(brute)
    assert tokens == int(flops / scaling.flops_per_token(shape))
    bigger, _, bigger_loss = scaling.compute_optimal(LAW, 16 * flops)
    assert scaling.params_of(bigger) > scaling.params_of(shape) and bigger_loss < loss


def test_flops_to_beat_finds_the_frontier_crossing():
    target = scaling.frontier(LAW, 1e14)
    found = scaling.flops_to_beat(LAW, target, 1e10, 1e18)
    assert found == pytest.approx(1e14, rel=0.25)
    assert scaling.frontier(LAW, found) < target
    assert scaling.flops_to_beat(LAW, 1.1, 1e10, 1e18) is None  # below E: never


def test_xz_bits_per_byte_of_repetitive_and_random_text():
    import random

    assert scaling.xz_bits_per_byte(b"def f(x):\n    return x\n" * 2000) < 0.1
    rng = random.Random(0)
    noise = bytes(rng.getrandbits(8) for _ in range(20000))
    assert scaling.xz_bits_per_byte(noise) > 7.9


def test_budget_planning_scales_tokens_and_refuses_too_small_budgets():
    rates = {s.name: 10_000.0 for s in scaling.SIZES}
    scale, minutes = scaling.plan_budgets(30, rates)
    assert 0 < scale and minutes == pytest.approx(30, abs=0.5)
    assert scaling.plan_budgets(60, rates)[0] > scale
    with pytest.raises(UserError, match="too small"):
        scaling.plan_budgets(0.5, rates)


def test_too_small_budget_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(scaling, "measure_throughput", lambda shape: 1000.0)
    code = main(["experiment", "scaling", "--out", str(tmp_path / "s"), "--budget-minutes", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "too small" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "s").exists()  # nothing half-written


def test_scaling_fit_reads_the_sweep_results(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"points": _points(), "alpha": 0.3}))
    params, tokens, losses = read_points(str(path))
    assert len(params) == 15 and losses[0] == _points()[0]["val_loss"]
    assert main(["scaling", "fit", str(path), "--json"]) == 0
    constants = json.loads(capsys.readouterr().out)["constants"]
    assert constants["alpha"] == pytest.approx(0.35, abs=0.01)
    assert constants["beta"] == pytest.approx(0.3, abs=0.01)
    direct = fit(params, tokens, losses)["constants"]
    assert direct["E"] == pytest.approx(constants["E"])
