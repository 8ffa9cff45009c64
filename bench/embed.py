"""Sentence embeddings: `fmforge embed` (minilm-l6) vs `SentenceTransformer.encode`, same weights.

The same 1,000 sentences (the STS Benchmark train split when ../shared/data/stsb is present, else
sentences built from a fixed vocabulary), batch 32, the same torch threads; after a warm-up the
two alternate for `--repeats` timed runs each and medians are compared. Both return L2-normalised
float32 arrays, checked equal (<= 1e-5) before timing. Absolute times are noisy on a shared CPU;
the ratio of medians from one alternating run is the figure. Last line: `ratio=X`
(SentenceTransformer time / fmforge time: above 1 means fmforge is faster).

    .venv/bin/python bench/embed.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

SENTENCES = 1000
BATCH = 32
STSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb" / "sts-train.csv"


def sentences(n: int = SENTENCES) -> list[str]:
    """Return n fixed sentences: STS-B train sentences, or seeded synthetic ones."""
    if STSB.is_file():
        rows = [line.split("\t") for line in STSB.read_text(encoding="utf-8").splitlines()]
        texts = [t for r in rows if len(r) >= 7 for t in (r[5], r[6])]
        return texts[:n]
    rng = np.random.default_rng(0)
    words = "the a river teacher heard news from old mill town market story book city".split()
    return [" ".join(rng.choice(words, rng.integers(5, 30))) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    import fmforge
    from fmforge.model.load import BUILTINS, package_dir

    texts = sentences()
    ours = fmforge.load("minilm-l6")
    builtin = BUILTINS["minilm-l6"]
    theirs = SentenceTransformer(
        str(package_dir(builtin.package, builtin.install) / "model"), device="cpu"
    )

    def run_ours() -> np.ndarray:
        return ours.embed(texts, batch_size=BATCH)

    def run_theirs() -> np.ndarray:
        return theirs.encode(texts, batch_size=BATCH, convert_to_numpy=True)

    difference = float(np.abs(run_ours() - run_theirs()).max())  # also the warm-up
    print(f"sentences={len(texts)} batch={BATCH} threads={torch.get_num_threads()}")
    print(f"max_abs_difference={difference:.2e}")
    times: dict[str, list[float]] = {"fmforge": [], "sentence_transformers": []}
    for _ in range(args.repeats):
        for name, fn in (("fmforge", run_ours), ("sentence_transformers", run_theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name}: median {median:.3f} s ({len(texts) / median:.0f} sentences/s)")
    ratio = statistics.median(times["sentence_transformers"]) / statistics.median(times["fmforge"])
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
