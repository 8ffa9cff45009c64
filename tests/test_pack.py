"""Token shards round trip, deterministic splits, and the resumable sampler."""

import json

import numpy as np
import pytest
import torch

from fmforge.data.pack import (
    BatchSampler,
    TokenShards,
    iter_eval_batches,
    prepare_shards,
    token_dtype,
)
from fmforge.errors import DataError, UserError
from fmforge.tokenizer import train_tokenizer

TEXTS = [f"Document number {i}: {'lorem ipsum dolor ' * (i % 7 + 1)}\nend {i}." for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS, vocab_size=320, min_frequency=1).save(path)
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus, tokenizer_dir):
    out = tmp_path_factory.mktemp("shards") / "out"
    prepare_shards([corpus], tokenizer_dir, str(out), val_fraction=0.2, seed=3)
    return TokenShards.open(out)


def test_shards_round_trip(shards):
    tokenizer = shards.tokenizer()
    decoded = []
    for split in ("train", "val"):
        tokens, offsets = shards.split(split), shards.doc_offsets(split)
        assert tokens.dtype == np.uint16 and offsets[-1] == len(tokens)
        for start, end in zip(offsets[:-1], offsets[1:]):
            assert tokens[end - 1] == tokenizer.eos_id
            decoded.append(tokenizer.decode(tokens[start : end - 1]))
    assert sorted(decoded) == sorted(TEXTS)
    meta = shards.meta
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 60
    assert meta["splits"]["val"]["bytes"] == sum(
        len(tokenizer.decode(shards.split("val")[s : e - 1]).encode())
        for s, e in zip(shards.doc_offsets("val")[:-1], shards.doc_offsets("val")[1:])
    )
    assert meta["tokenizer_sha256"] == tokenizer.sha256 and meta["seed"] == 3


def test_split_is_deterministic(tmp_path, corpus, tokenizer_dir, shards):
    prepare_shards([corpus], tokenizer_dir, str(tmp_path / "a"), val_fraction=0.2, seed=3)
    again = TokenShards.open(tmp_path / "a")
    for split in ("train", "val"):
        assert np.array_equal(again.split(split), shards.split(split))
    prepare_shards([corpus], tokenizer_dir, str(tmp_path / "b"), val_fraction=0.2, seed=4)
    other = TokenShards.open(tmp_path / "b")
    assert not np.array_equal(other.doc_offsets("val"), shards.doc_offsets("val"))


def test_prepare_errors(tmp_path, corpus, tokenizer_dir):
    with pytest.raises(DataError, match="val split is empty"):
        prepare_shards([corpus], tokenizer_dir, str(tmp_path / "x"), val_fraction=1e-9)
    assert not (tmp_path / "x").exists()  # atomic: nothing half-written is left
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        prepare_shards([corpus], tokenizer_dir, str(tmp_path / "full"))
    with pytest.raises(UserError, match="--val-fraction"):
        prepare_shards([corpus], tokenizer_dir, str(tmp_path / "y"), val_fraction=0)


def test_open_detects_damage(tmp_path, corpus, tokenizer_dir):
    out = tmp_path / "s"
    prepare_shards([corpus], tokenizer_dir, str(out), val_fraction=0.2)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="train.bin: expected"):
        TokenShards.open(out)
    (out / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt meta.json"):
        TokenShards.open(out)
    with pytest.raises(DataError, match="no meta.json"):
        TokenShards.open(tmp_path)


def test_token_dtype():
    assert token_dtype(256) == np.uint16 and token_dtype(65_535) == np.uint16
    assert token_dtype(65_536) == np.uint32 and token_dtype(200_000) == np.uint32


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_windows_and_determinism():
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=4, seq_len=16, seed=0)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1) and bool((x[:, 0] % 16 == 0).all())
    a = take(BatchSampler(tokens, 4, 16, seed=1), 40)  # 62 windows: crosses epoch boundaries
    b = take(BatchSampler(tokens, 4, 16, seed=1), 40)
    c = take(BatchSampler(tokens, 4, 16, seed=2), 40)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))
    # One epoch covers each window exactly once.
    first_epoch = torch.cat([x for x, _ in take(BatchSampler(tokens, 2, 16, seed=5), 31)])
    assert sorted(first_epoch[:, 0].tolist()) == list(range(0, 62 * 16, 16))


def test_sampler_resume_equals_uninterrupted():
    tokens = np.arange(1000, dtype=np.uint16)
    straight = take(BatchSampler(tokens, 3, 16, seed=7), 50)
    first = BatchSampler(tokens, 3, 16, seed=7)
    take(first, 23)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BatchSampler(tokens, 3, 16, seed=7)
    resumed.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(straight[23:], take(resumed, 27)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(DataError, match="seq_len"):
        BatchSampler(tokens, 3, 8, seed=7).load_state_dict(state)


def test_sampler_ranks_are_disjoint():
    tokens = np.arange(2000, dtype=np.uint16)
    ranks = [BatchSampler(tokens, 4, 16, seed=0, rank=r, world_size=3) for r in range(3)]
    per_rank = [{int(s) for x, _ in take(r, 10) for s in x[:, 0]} for r in ranks]  # 1 epoch
    assert sum(len(s) for s in per_rank) == 120
    assert not (per_rank[0] & per_rank[1] or per_rank[0] & per_rank[2] or per_rank[1] & per_rank[2])


def test_sampler_too_few_tokens():
    with pytest.raises(DataError, match=r"train split has 16 tokens.*train.seq_len=16"):
        BatchSampler(np.arange(16, dtype=np.uint16), 1, 16, seed=0)


def test_eval_batches():
    tokens = np.arange(100, dtype=np.uint16)
    batches = list(iter_eval_batches(tokens, batch_size=4, seq_len=10))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 1]
    assert batches[0][0][1, 0] == 10 and torch.equal(batches[2][1], batches[2][0] + 1)
    assert len(list(iter_eval_batches(tokens, 4, 10, max_batches=2))) == 2
