"""Data curation throughput: the whole `fmforge data curate` pipeline, and MinHash signatures alone
against datatrove's MinHash signature stage on the same documents, same core count.

The corpus is synthetic English (sentences of common words, so language id keeps it) with 5%
exact and 5% near duplicates planted, written as jsonl; `--mb` sets its size. The pipeline runs
once with `--workers` processes and reports documents/s, MB/s and the peak resident memory of the
run (parent and the largest worker). The signature comparison runs in this process (one core):
fmforge's `MinHasher` with 14 bands x 8 rows = 112 hashes and datatrove's
`MinhashDedupSignature` with its default 14 x 8, both on whitespace words (datatrove's English
tokenizer needs spaCy, so it gets a whitespace tokenizer: the same shingles for both; its xxh64
call gets UTF-8 bytes, which xxhash >= 4 requires). Sides
alternate for `--repeats` rounds and medians are compared.

Last line: `ratio=` fmforge signatures/s / datatrove signatures/s (or a reason when datatrove is
not installed: it is a dev-only peer, `pip install datatrove`).

    .venv/bin/python bench/curate.py [--mb 20] [--workers 2] [--repeats 3] [--sig-docs 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

WORDS = (
    "the of and to in is was that for it with as his on be at by had are but from or have an "
    "they which one you were her all she there would their we him been has when who will more no "
    "if out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just those "
    "people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three"
).split()


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """Write synthetic English documents to `path` (jsonl); return (documents, UTF-8 bytes)."""
    rng = random.Random(seed)
    target = int(megabytes * 1_000_000)
    written = documents = 0
    recent: list[str] = []
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            roll = rng.random()
            if roll < 0.05 and recent:
                text = rng.choice(recent).upper()  # exact duplicate up to case
            elif roll < 0.10 and recent:
                words = rng.choice(recent).split(" ")
                for pos in rng.sample(range(len(words)), 2):
                    words[pos] = rng.choice(WORDS)
                text = " ".join(words)  # near duplicate
            else:
                sentences = [
                    " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize()
                    + "."
                    for _ in range(rng.randint(6, 40))
                ]
                text = "\n".join(sentences)
                recent = (recent + [text])[-200:]
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text.encode("utf-8"))
            documents += 1
    return documents, written


def bench_pipeline(corpus: Path, out: Path, workers: int) -> dict:
    from fmforge.data.curate_config import CurateConfig
    from fmforge.data.pipeline import curate

    start = time.perf_counter()
    cpu_start = time.process_time()
    report = curate([str(corpus)], out, CurateConfig(workers=workers, decontam_builtin=False))
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "seconds": seconds,
        "parent_cpu_seconds": time.process_time() - cpu_start,
        "worker_cpu_seconds": children.ru_utime + children.ru_stime,
        "documents": report["in"]["documents"],
        "bytes": report["in"]["bytes"],
        "kept_documents": report["kept"]["documents"],
        "removed": {k: v["documents"] for k, v in report["removed"].items()},
        "peak_rss_parent_mb": own.ru_maxrss / 1024,
        "peak_rss_largest_worker_mb": children.ru_maxrss / 1024,
    }


def read_texts(corpus: Path, limit: int) -> list[str]:
    texts = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) >= limit:
                break
    return texts


def datatrove_signer():
    """Return a function text -> signature using datatrove's stage, or a reason string."""
    try:
        from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
        from datatrove.utils.word_tokenizers import WordTokenizer
    except ImportError:
        return "datatrove is not installed (a dev-only peer: pip install datatrove)"

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    import xxhash

    stage = MinhashDedupSignature(
        tempfile.mkdtemp(prefix="dt-sig-"), MinhashConfig(), language=Whitespace()
    )
    # datatrove 0.10 passes str to xxhash, which xxhash >= 4 refuses; encode as xxhash 3 did.
    stage._hash_func = lambda text: xxhash.xxh64_intdigest(text.encode("utf-8"))
    return lambda text: stage.get_signature(stage.get_shingles(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="corpus size in MB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sig-docs", type=int, default=2000, help="documents for signatures")
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()

    from fmforge.data.dedup import MinHasher

    with tempfile.TemporaryDirectory(prefix="bench-curate-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        documents, nbytes = make_corpus(corpus, args.mb)
        print(f"corpus: {documents:,} documents, {nbytes / 1e6:.1f} MB (synthetic English)")
        if not args.skip_pipeline:
            result = bench_pipeline(corpus, Path(tmp) / "out", args.workers)
            print(
                f"pipeline ({args.workers} workers): {result['seconds']:.1f} s wall, "
                f"{result['documents'] / result['seconds']:.0f} docs/s, "
                f"{result['bytes'] / 1e6 / result['seconds']:.2f} MB/s; CPU "
                f"{result['parent_cpu_seconds']:.1f} s parent + "
                f"{result['worker_cpu_seconds']:.1f} s workers; peak RSS parent "
                f"{result['peak_rss_parent_mb']:.0f} MB, largest worker "
                f"{result['peak_rss_largest_worker_mb']:.0f} MB"
            )
            print(f"pipeline: kept {result['kept_documents']:,}; removed {result['removed']}")
        texts = read_texts(corpus, args.sig_docs)
        sig_bytes = sum(len(t.encode("utf-8")) for t in texts)
        ours = MinHasher(14 * 8, seed=1)
        theirs = datatrove_signer()
        sides = {"fmforge": ours.signature}
        if not isinstance(theirs, str):
            sides["datatrove"] = theirs
        times: dict[str, list[float]] = {name: [] for name in sides}
        for fn in sides.values():  # warm-up
            fn(texts[0])
        for _ in range(args.repeats):
            for name, fn in sides.items():
                start = time.perf_counter()
                for text in texts:
                    fn(text)
                times[name].append(time.perf_counter() - start)
        rates = {}
        for name, samples in times.items():
            median = statistics.median(samples)
            rates[name] = len(texts) / median
            print(
                f"signatures {name}: {rates[name]:.0f} docs/s, "
                f"{sig_bytes / 1e6 / median:.2f} MB/s (median of {args.repeats}, 1 core)"
            )
        if isinstance(theirs, str):
            print(f"ratio=skipped: {theirs}")
        else:
            print(f"ratio={rates['fmforge'] / rates['datatrove']:.2f}")


if __name__ == "__main__":
    main()
