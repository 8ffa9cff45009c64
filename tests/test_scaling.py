"""Scaling-law presets, compute-optimal plans and fitting your own points."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fmforge.cli import main
from fmforge.cost.scaling import ChinchillaLaw, fit, get_law
from fmforge.errors import UserError


def chinchilla_loss(n, d):
    # Hoffmann et al. 2022, eq. 10 with the Approach 3 constants, written out by hand.
    return 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28


def test_chinchilla_closed_form_matches_hand_values_and_brute_force():
    c = 1e21
    # Hand computation: G = (0.34·406.4 / (0.28·410.7))^(1/0.62) = 1.3447;
    # N = G (C/6)^(0.28/0.62) ≈ 1.824e9; D = (C/6)^(0.34/0.62) / G ≈ 9.14e10; L ≈ 2.329.
    n, d = get_law("chinchilla").optimal(c)
    assert n == pytest.approx(1.824e9, rel=2e-3)
    assert d == pytest.approx(9.136e10, rel=2e-3)
    assert 6 * n * d == pytest.approx(c)
    assert get_law("chinchilla").loss(n, d) == pytest.approx(2.3289, abs=1e-3)
    # Brute force over N on the budget line agrees with the closed form.
    grid = np.logspace(8, 11, 30001)
    best = grid[np.argmin(chinchilla_loss(grid, c / (6 * grid)))]
    assert n == pytest.approx(best, rel=1e-3)


def test_scaling_plan_cli_json(capsys):
    code = main(["scaling", "plan", "--flops", "1e21", "--preset", "chinchilla", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert result["preset"] == "chinchilla"
    assert result["constants"] == {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
    assert result["params"] == pytest.approx(1.824e9, rel=2e-3)
    assert result["tokens"] == pytest.approx(9.136e10, rel=2e-3)
    assert result["loss"] == pytest.approx(chinchilla_loss(result["params"], result["tokens"]))
    rule = result["rule_of_thumb"]
    assert rule["tokens"] == pytest.approx(20 * rule["params"])
    assert rule["params"] == pytest.approx(math.sqrt(1e21 / 120))
    assert rule["loss"] >= result["loss"]  # the optimum is at least as good as the rule


def test_scaling_plan_human_output_names_preset_and_constants(capsys):
    assert main(["scaling", "plan", "--flops", "1e21", "--preset", "kaplan"]) == 0
    out = capsys.readouterr().out
    assert "preset kaplan" in out and "alpha_N 0.076" in out and "20 tokens/param" in out
    assert main(["scaling", "plan", "--params", "70e9", "--tokens", "1.4e12"]) == 0
    out = capsys.readouterr().out
    assert "preset chinchilla" in out and "E 1.69" in out and "A 406.4" in out


def test_kaplan_preset():
    law = get_law("kaplan")
    # Kaplan et al. 2020, Figure 14: N_opt = 1.3e9 · C^0.73 with C in PF-days.
    n, d = law.optimal(86400e15)
    assert n == pytest.approx(1.3e9)
    assert d == pytest.approx(86400e15 / (6 * 1.3e9))
    # Eq. 1.5 at D → ∞ reduces to L(N) = (N_c / N)^α_N.
    assert law.loss(1e9, 1e30) == pytest.approx((8.8e13 / 1e9) ** 0.076, rel=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--flops", "-1"], "positive"),
        (["--flops", "0"], "positive"),
        (["--flops", "1e21", "--params", "1e9"], "not both"),
        (["--params", "1e9"], "both --params and --tokens"),
        (["--flops", "1e21", "--preset", "chinchila"], "did you mean 'chinchilla'"),
    ],
)
def test_scaling_bad_input(capsys, argv, message):
    assert main(["scaling", "plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_fit_recovers_chinchilla_predictions(tmp_path, capsys):
    truth = ChinchillaLaw()
    rows = [(n, d) for n in (1e7, 3e7, 1e8, 3e8, 1e9) for d in (1e8, 1e9, 1e10, 1e11)]
    params, tokens = [n for n, _ in rows], [d for _, d in rows]
    losses = [truth.loss(n, d) for n, d in rows]
    result = fit(params, tokens, losses)
    assert result["max_abs_residual"] < 0.01
    law = result["law"]
    assert law.loss(7e10, 1.4e12) == pytest.approx(truth.loss(7e10, 1.4e12), rel=0.03)
    # The CLI reads CSV with a header.
    path = tmp_path / "runs.csv"
    path.write_text(
        "params,tokens,loss\n" + "".join(f"{n},{d},{loss}\n" for (n, d), loss in zip(rows, losses))
    )
    assert main(["scaling", "fit", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_residual"] < 0.01
    with pytest.raises(UserError, match="at least 5 points"):
        fit(params[:3], tokens[:3], losses[:3])
