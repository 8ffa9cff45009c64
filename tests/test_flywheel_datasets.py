"""Curated datasets from feedback: each kind becomes the right record, PII is scrubbed, duplicates
are removed, the frozen eval split never overlaps training, and a re-export is byte-identical."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from fmforge.flywheel.datasets import (
    FILES,
    NothingToLearn,
    build_dataset,
    in_eval_split,
    prompt_text,
    write_dataset,
)
from fmforge.flywheel.store import FeedbackStore


def _chat(store: FeedbackStore, gen_id: str, question: str, *answers: str) -> None:
    store.record_generation(
        {
            "id": gen_id,
            "endpoint": "chat",
            "model": "m",
            "model_version": "v0",
            "params": {},
            "messages": [{"role": "user", "content": question}],
            "prompt": None,
            "outputs": list(answers),
            "finish_reasons": ["stop"] * len(answers),
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "latency_s": 0.1,
        }
    )


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture
def store(tmp_path):
    store = FeedbackStore(str(tmp_path / "fb.db"))
    yield store
    store.close()


def test_each_feedback_kind_becomes_the_right_record(store):
    _chat(store, "g-thumbs", "capital of France?", "Paris.")
    store.add_feedback("g-thumbs", "thumbs", "up")
    _chat(store, "g-edit", "2 + 2?", "5")
    store.add_feedback("g-edit", "edit", "4")
    _chat(store, "g-pair", "greet me", "hi", "Hello there!")
    store.add_feedback("g-pair", "pairwise", {"chosen": 1, "rejected": 0})
    _chat(store, "g-rate-a", "a colour?", "blue")
    _chat(store, "g-rate-b", "a colour?", "zzzz")
    store.add_feedback("g-rate-a", "rating", 5)
    store.add_feedback("g-rate-b", "rating", 1)
    _chat(store, "g-down", "say nothing", "blah")
    store.add_feedback("g-down", "thumbs", "down")
    store.add_feedback("g-down", "comment", "meh")
    files, manifest = build_dataset(store, None, time.time() + 1, eval_percent=0)
    sft = files["train_sft.jsonl"]
    dpo = files["train_dpo.jsonl"]
    assert {"messages": _user("capital of France?") + _answer("Paris.")} in sft  # thumbs up
    assert {"messages": _user("2 + 2?") + _answer("4")} in sft  # edit: the edit is the answer
    assert {"messages": _user("a colour?") + _answer("blue")} in sft  # rating 5
    assert len(sft) == 3  # thumbs down, rating 1 and the comment give no SFT example
    pair = {"prompt": _user("2 + 2?"), "chosen": _answer("4"), "rejected": _answer("5")}
    assert pair in dpo  # edit: chosen = edit, rejected = original
    pair = {
        "prompt": _user("greet me"),
        "chosen": _answer("Hello there!"),
        "rejected": _answer("hi"),
    }
    assert pair in dpo  # pairwise: its pair
    pair = {"prompt": _user("a colour?"), "chosen": _answer("blue"), "rejected": _answer("zzzz")}
    assert pair in dpo  # ratings within one prompt: the higher rated is chosen
    assert len(dpo) == 3
    assert manifest["feedback_counts"] == {
        "comment": 1,
        "edit": 1,
        "pairwise": 1,
        "rating": 2,
        "thumbs": 2,
    }
    assert files["eval_sft.jsonl"] == files["eval_dpo.jsonl"] == []


def test_pii_becomes_placeholders_and_duplicates_are_removed(store, tmp_path):
    _chat(store, "g-1", "mail me at kim@example.com", "Sent to kim@example.com, call 010-1234-5678")
    store.add_feedback("g-1", "thumbs", "up")
    _chat(store, "g-2", "mail me at lee@example.org", "Sent to lee@example.org, call 010-9876-5432")
    store.add_feedback("g-2", "thumbs", "up")
    _chat(store, "g-3", "hello", "Hello  World")
    _chat(store, "g-4", "HELLO", "hello world")
    store.add_feedback("g-3", "thumbs", "up")
    store.add_feedback("g-4", "thumbs", "up")
    manifest = write_dataset(store, tmp_path / "ds", None, time.time() + 1, eval_percent=0)
    raw = (tmp_path / "ds" / "train_sft.jsonl").read_text(encoding="utf-8")
    records = [json.loads(line) for line in raw.splitlines()]
    assert "example.com" not in raw and "1234" not in raw and "example.org" not in raw
    scrubbed = _user("mail me at <EMAIL>") + _answer("Sent to <EMAIL>, call <KR_PHONE>")
    assert records.count({"messages": scrubbed}) == 1  # two raw rows, one record after scrubbing
    hellos = [r for r in records if r["messages"][0]["content"].lower() == "hello"]
    assert len(hellos) == 1  # equal after case and whitespace normalisation
    assert len(records) == 2
    assert manifest["pii_placeholders"] == {"<EMAIL>": 4, "<KR_PHONE>": 2}
    assert manifest["duplicates_removed"] == 2


def _many(store: FeedbackStore, start: int, n: int) -> None:
    for i in range(start, start + n):
        _chat(store, f"g-{i}", f"question number {i}?", f"answer {i}", f"wrong {i}")
        store.add_feedback(f"g-{i}", "pairwise", {"chosen": 0, "rejected": 1})
        store.add_feedback(f"g-{i}", "thumbs", "up")


def test_eval_split_is_frozen_and_never_enters_training(store):
    _many(store, 0, 40)
    first_end = max(f["created"] for f in store.list_feedback())
    while time.time() <= first_end:  # the next rows must fall after the first window's end
        pass
    _many(store, 40, 40)
    files, manifest = build_dataset(store, first_end, time.time() + 1, eval_percent=25)
    train = files["train_sft.jsonl"] + files["train_dpo.jsonl"]
    evals = files["eval_sft.jsonl"] + files["eval_dpo.jsonl"]
    train_prompts = {prompt_text(r) for r in train}
    eval_prompts = {prompt_text(r) for r in evals}
    assert train_prompts and eval_prompts
    assert train_prompts.isdisjoint(eval_prompts)  # overlap 0
    numbers = {int(p.split()[-1].rstrip("?")) for p in train_prompts}
    assert numbers <= set(range(40, 80))  # training: only the window's feedback
    eval_numbers = {int(p.split()[-1].rstrip("?")) for p in eval_prompts}
    assert eval_numbers & set(range(40)) and eval_numbers & set(range(40, 80))  # all logs
    assert manifest["held_out_to_eval"] == 2 * len(eval_numbers & set(range(40, 80)))
    # Frozen: the first window's eval prompts stay eval prompts once more data arrives.
    early, _ = build_dataset(store, None, first_end, eval_percent=25)
    early_eval = {prompt_text(r) for r in early["eval_dpo.jsonl"]}
    assert early_eval and early_eval <= eval_prompts
    assert all(in_eval_split(r, 25) for r in evals)


def test_reexport_is_byte_identical_and_the_id_is_the_content_hash(store, tmp_path):
    _many(store, 0, 30)
    end = time.time() + 1
    a = write_dataset(store, tmp_path / "a", None, end, eval_percent=20)
    b = write_dataset(FeedbackStore(store.url), tmp_path / "b", None, end, eval_percent=20)
    assert a == b
    digest = hashlib.sha256()
    for name in FILES:
        data_a = (tmp_path / "a" / name).read_bytes()
        assert data_a == (tmp_path / "b" / name).read_bytes()
        digest.update(f"{name}\0{len(data_a)}\0".encode() + data_a)
    assert a["dataset_id"] == "sha256:" + digest.hexdigest()
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (
        tmp_path / "b" / "manifest.json"
    ).read_bytes()
    store.add_feedback("g-3", "edit", "a better answer 3")
    c = write_dataset(store, tmp_path / "c", None, time.time() + 1, eval_percent=20)
    assert c["dataset_id"] != a["dataset_id"]


def test_an_empty_window_has_nothing_to_learn(store, tmp_path):
    with pytest.raises(NothingToLearn, match="no feedback"):
        write_dataset(store, tmp_path / "ds", None, time.time())
    _chat(store, "g-1", "hi", "there")
    store.add_feedback("g-1", "thumbs", "down")
    with pytest.raises(NothingToLearn, match="give no training record"):
        write_dataset(store, tmp_path / "ds", None, time.time() + 1)
    assert not (tmp_path / "ds").exists()  # nothing half-written


def test_blank_answers_are_dropped(store):
    _chat(store, "g-1", "say something", "   ", "words")
    store.add_feedback("g-1", "pairwise", {"chosen": 1, "rejected": 0})
    store.add_feedback("g-1", "thumbs", "up", choice_index=0)
    store.add_feedback("g-1", "thumbs", "up", choice_index=1)
    files, manifest = build_dataset(store, None, time.time() + 1, eval_percent=0)
    assert files["train_sft.jsonl"] == [{"messages": _user("say something") + _answer("words")}]
    assert files["train_dpo.jsonl"] == []
    assert manifest["duplicates_removed"] == 2
