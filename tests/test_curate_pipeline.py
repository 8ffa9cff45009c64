"""The curation runner end to end: layout, exact accounting, determinism across runs and worker
counts, idempotence, resume after kill -9, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fmforge.cli import main
from fmforge.data.curate_config import CurateConfig
from fmforge.data.pipeline import curate
from fmforge.errors import DataError

WORDS = (
    "the of and to in is was that for it with as his on be at by had are but from or have an "
    "they which one you were her all she there would their we him been has when who will more "
    "no if out so said what up its about into than them can only other new some could time "
    "these two may then do first any my now such like our over man me even most made after also "
    "did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long "
    "get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three"
).split()


def _english(rng: random.Random, sentences: int) -> str:
    lines = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(10, 16))]
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines)


def _near(text: str, rng: random.Random, swaps: int = 2) -> str:
    words = text.split(" ")
    for pos in rng.sample(range(len(words)), swaps):
        words[pos] = rng.choice(WORDS)
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Two jsonl files and a text file with planted duplicates, PII, Korean and short documents."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("corpus")
    docs = [_english(rng, rng.randint(8, 14)) for _ in range(150)]
    docs[10] = docs[3].upper()  # exact duplicates up to case and whitespace
    docs[40] = "  " + docs[3].replace(" ", "   ")
    docs[50] = _near(docs[20], rng)  # a near-duplicate
    docs[60] = docs[61] + "\nWrite to kim.minsu@naver.com or call 010-1234-5678."  # scrubbed, kept
    docs[70] = " ".join(f"user{i}@example.com" for i in range(30)) + " " + docs[71]  # too much PII
    docs[80] = "오늘은 날씨가 좋아서 공원에 산책을 갔습니다. " * 20  # not English
    docs[90] = "Too short to keep."
    docs[100] = docs[101] + "\n" + EVAL_ITEM  # contaminated
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        for doc in docs[:100]:
            f.write(json.dumps({"text": doc}) + "\n")
    with open(root / "b.jsonl", "w", encoding="utf-8") as f:
        for doc in docs[100:]:
            f.write(json.dumps({"text": doc}) + "\n")
    (root / "evalset.jsonl").write_text(json.dumps({"text": EVAL_ITEM}) + "\n", encoding="utf-8")
    return root


EVAL_ITEM = (
    "Question: which planet in the solar system has the largest number of known moons as of today?"
)


def _cfg(corpus: Path, **overrides) -> CurateConfig:
    values = dict(
        shard_docs=20,
        decontam_builtin=False,
        decontam_files=[str(corpus / "evalset.jsonl")],
        plots=False,
    )
    values.update(overrides)
    return CurateConfig(**values)


def _inputs(corpus: Path) -> list[str]:
    return [str(corpus / "a.jsonl"), str(corpus / "b.jsonl")]


def _read(paths) -> list[dict]:
    rows = []
    for path in sorted(paths):
        rows += pq.read_table(path).to_pylist()
    return rows


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*.parquet"))
        if p.is_file()
    }


def _stable_report(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    report.pop("created")
    report.pop("seconds")
    return report


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "one"
    curate(_inputs(corpus), out, _cfg(corpus, plots=True))
    return out


def test_layout_and_exact_accounting(first_run):
    out = first_run
    report = json.loads((out / "report.json").read_text())
    for measure in ("documents", "bytes", "tokens"):
        removed = sum(r[measure] for r in report["removed"].values())
        assert report["in"][measure] == report["kept"][measure] + removed
    assert report["in"]["documents"] == 150
    kept = _read((out / "kept").glob("*.parquet"))
    assert {"id", "text"} <= set(kept[0]) and len(kept) == report["kept"]["documents"]
    assert sum(r["bytes"] for r in kept) == report["kept"]["bytes"]
    for reason, counts in report["removed"].items():
        rows = _read((out / "removed" / reason).glob("*.parquet"))
        assert len(rows) == counts["documents"]
        assert sum(r["tokens"] for r in rows) == counts["tokens"]
        assert all(r["stage"] and r["detail"] and r["text"] for r in rows)
    expected = {"dedup_exact", "dedup_near", "pii", "langid", "gopher_min_words", "decontam"}
    assert expected <= set(report["removed"])
    assert report["removed"]["dedup_exact"]["documents"] == 2
    ids = [r["id"] for r in kept] + [
        r["id"] for p in (out / "removed").rglob("*.parquet") for r in pq.read_table(p).to_pylist()
    ]
    assert len(ids) == len(set(ids)) == 150
    assert not (out / "work").exists() and not list(out.rglob("*.tmp-*"))
    for name in ("report.md", "signals.png", "clusters.png", "lsh.png"):
        assert (out / name).stat().st_size > 0


def test_removed_documents_say_why(first_run):
    rows = _read((first_run / "removed" / "pii").glob("*.parquet"))
    assert rows[0]["detail"].startswith("30 spans > 20") and "user0@" not in rows[0]["text"]
    (row,) = _read((first_run / "removed" / "decontam").glob("*.parquet"))
    assert row["detail"] == "overlaps evalset.jsonl:1"
    exact = _read((first_run / "removed" / "dedup_exact").glob("*.parquet"))
    kept_ids = {r["id"] for r in _read((first_run / "kept").glob("*.parquet"))}
    keeper = {r["detail"].rsplit(" ", 1)[1] for r in exact}
    assert len(keeper) == 1 and keeper <= kept_ids  # one survivor, and the smallest id
    assert min(keeper | {r["id"] for r in exact}) == next(iter(keeper))


def test_pii_is_scrubbed_in_kept_text(first_run):
    text = "\n".join(r["text"] for r in _read((first_run / "kept").glob("*.parquet")))
    assert "<EMAIL>" in text and "<KR_PHONE>" in text and "kim.minsu" not in text


def test_deterministic_across_runs_and_workers(corpus, first_run, tmp_path):
    second = tmp_path / "two"
    curate(_inputs(corpus), second, _cfg(corpus, workers=2))
    assert _files(second) == _files(first_run)
    assert _stable_report(second) == _stable_report(first_run)
    # Another input order: different shards, the same kept documents.
    third = tmp_path / "three"
    curate(list(reversed(_inputs(corpus))), third, _cfg(corpus))
    kept = {r["id"] for r in _read((third / "kept").glob("*.parquet"))}
    assert kept == {r["id"] for r in _read((first_run / "kept").glob("*.parquet"))}


def test_curating_curated_output_changes_nothing(corpus, first_run, tmp_path):
    again = tmp_path / "again"
    report = curate([str(first_run / "kept")], again, _cfg(corpus))
    assert report["removed"] == {}
    assert _files(again) == {k: v for k, v in _files(first_run).items() if k.startswith("kept")}


def test_resume_after_kill_is_byte_identical(corpus, first_run, tmp_path):
    out = tmp_path / "killed"
    evalset = f"[{corpus / 'evalset.jsonl'}]"
    args = [*_inputs(corpus), "--out", str(out), "--shard_docs", "20", "--plots", "false",
            "--decontam_builtin", "false", "--decontam_files", evalset]  # fmt: skip
    command = [sys.executable, "-m", "fmforge.cli", "data", "curate", *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = random.Random(1).randint(1, 4)  # stop after this many shards are done
    stages = out / "work" / "stages"
    while process.poll() is None:
        if stages.is_dir() and len(list(stages.glob("*.done"))) >= target:
            os.kill(process.pid, signal.SIGKILL)
            break
        os.sched_yield()
    assert process.wait() == -signal.SIGKILL, process.stderr.read().decode()
    assert not (out / "report.json").exists()
    assert main(["data", "curate", *args, "--resume", "--workers", "2"]) == 0
    assert _files(out) == _files(first_run)
    assert _stable_report(out) == _stable_report(first_run)
    assert not list(out.rglob("*.tmp-*")) and not (out / "work").exists()


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_one_line_and_leaves_nothing(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bad"
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    err = _error(capsys, ["data", "curate", str(broken), "--out", str(out)])
    assert "broken.parquet" in err and "fix or remove" in err and not out.exists()
    err = _error(
        capsys,
        ["data", "curate", *_inputs(corpus), "--out", str(out), "--filters", '{"gopher_words": 1}'],
    )
    assert "unknown filter 'gopher_words'" in err and not out.exists()
    err = _error(
        capsys,
        ["data", "curate", *_inputs(corpus), "--out", str(out),
         "--filters", '{"gopher_alpha_words": 1.5}'],
    )  # fmt: skip
    assert "out of range" in err and not out.exists()
    config = tmp_path / "curate.yaml"
    config.write_text("profile: en\nfilters:\n  no_such_filter: 3\n", encoding="utf-8")
    err = _error(capsys, ["data", "curate", *_inputs(corpus), "--out", str(out), "--config",
                          str(config)])  # fmt: skip
    assert "no_such_filter" in err and not out.exists()

    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "ray" else real_find_spec(n, *a)
    )
    err = _error(capsys, ["data", "curate", *_inputs(corpus), "--out", str(out), "--executor",
                          "ray"])  # fmt: skip
    assert "pip install 'fmforge[ray]'" in err and not out.exists()


def test_unreadable_file_is_a_data_error(corpus, tmp_path, monkeypatch):
    out = tmp_path / "unreadable"
    original = Path.read_bytes

    def refuse(self):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    locked = tmp_path / "locked.txt"
    locked.write_text("text", encoding="utf-8")
    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(DataError, match="locked.txt.*Permission denied.*permissions"):
        curate([str(locked)], out, _cfg(corpus))
    assert not out.exists()


def test_ray_executor_matches_local(corpus, first_run, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'fmforge[ray]'")
    out = tmp_path / "ray"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        curate(_inputs(corpus), out, _cfg(corpus, executor="ray", workers=2))
    finally:
        ray.shutdown()
    assert _files(out) == _files(first_run)
    assert _stable_report(out) == _stable_report(first_run)
