"""The transfer experiment: the steps-to-target arithmetic, and (slow) a whole run."""

from __future__ import annotations

import json

import pytest

from fmforge.experiments.transfer import steps_to_reach


def test_steps_to_reach_first_step_at_or_below_target():
    curve = [(10, 5.0), (20, 4.0), (30, 3.5), (40, 3.6)]
    assert steps_to_reach(curve, 3.5) == 30
    assert steps_to_reach(curve, 4.5) == 20
    assert steps_to_reach(curve, 1.0) is None


@pytest.mark.slow
def test_transfer_experiment_reports_speedup(tmp_path):
    from fmforge.cli import main

    out = tmp_path / "transfer"
    assert main(["experiment", "transfer", "--out", str(out), "--steps", "60"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["speedup"] >= 2
    assert (out / "curves.png").is_file() and (out / "report.md").is_file()
