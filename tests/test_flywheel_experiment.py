"""`fmforge experiment flywheel`: the hidden rule, the users' edits, the win rate and its interval;
(slow) the whole loop over HTTP on a tiny model: rounds of traffic, cycles, a broken candidate,
results.json, report and plot."""

from __future__ import annotations

import json

import pytest

from fmforge.experiments.flywheel import (
    FlywheelExperiment,
    follows_rule,
    run_flywheel_experiment,
    win_rate,
    with_rule,
)
from test_serve_support import serve_model_dir  # noqa: F401


def test_the_rule_and_the_users_edit():
    assert follows_rule("  Indeed, volcanoes erupt.") and not follows_rule("Volcanoes erupt.")
    edited = with_rule("Volcanoes erupt.\x00")
    assert edited == "Indeed, volcanoes erupt." and follows_rule(edited)
    assert with_rule("   ") == "Indeed."


def test_win_rate_counts_ties_half_and_brackets_the_mean():
    base = ["no"] * 10
    better = ["Indeed yes"] * 8 + ["no"] * 2
    result = win_rate(better, base)
    assert result["win_rate_vs_v0"] == 0.9 and result["follows_rule"] == 0.8
    assert result["ci_low"] < 0.9 < result["ci_high"] <= 1.0
    # All wins still leave an interval (Wilson), not a point: 40 of 40 -> [0.912, 1].
    everything = win_rate(["Indeed"] * 40, ["no"] * 40)
    assert everything["ci_low"] == pytest.approx(0.9124, abs=1e-4) and everything["ci_high"] == 1.0
    assert win_rate(base, base)["win_rate_vs_v0"] == 0.5  # all ties
    assert win_rate(base, better)["win_rate_vs_v0"] == 0.1  # v0 wins


@pytest.mark.slow
def test_the_experiment_runs_end_to_end_over_http(tmp_path, serve_model_dir):  # noqa: F811
    exp = FlywheelExperiment(
        base=str(serve_model_dir),
        prompts_per_round=8,
        heldout_prompts=8,
        sft_steps=3,
        dpo_steps=3,
        seq_len=64,
        guard_tokens=128,
        concurrency=2,
    )
    results = run_flywheel_experiment(tmp_path / "exp", exp)
    on_disk = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert on_disk["cycles"] == results["cycles"] and len(results["cycles"]) == 3
    for row in results["cycles"]:
        assert set(row) >= {"version", "promoted", "win_rate_vs_v0", "ci_low", "ci_high"}
    broken = results["broken_candidate"]
    assert broken["version"] == "v4" and set(broken["metrics"]) >= {"metric", "guards"}
    assert [r["requests"] for r in results["rounds"]] == [8, 8, 8, 8]
    assert all(sum(r["feedback"].values()) >= 8 for r in results["rounds"])
    assert results["serving_history"][0]["version"] == "v0"
    assert (tmp_path / "exp" / "win_rate.png").stat().st_size > 0
    assert "Claim holds" in (tmp_path / "exp" / "report.md").read_text()
