"""Token shards (flat memmaps + document offsets + meta.json) and the resumable batch sampler.

A shards dir holds, per split (`train`, `val`):
  `<split>.bin`      the tokens of every document, each followed by EOS, as one flat uint16 array
                     (uint32 when the vocabulary has more than 65,535 ids)
  `<split>.idx.npy`  int64 start offset of each document, plus a final end offset (docs + 1)
and `meta.json` (dtype, tokenizer hash, counts, sources, skips) and `tokenizer/` (a copy).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fmforge.artifacts import atomic_dir, check_output_dir, write_json_atomic
from fmforge.data.sources import SkipLog, corpus_provenance, iter_documents
from fmforge.errors import DataError, UserError
from fmforge.tokenizer import Tokenizer

SPLITS = ("train", "val")
SHARDS_FORMAT = "fmforge-token-shards"
SHARDS_VERSION = 1
# Documents per encode_batch call: large enough to keep the Rust thread pool busy, small enough
# that one batch of texts and ids stays far below memory limits.
_ENCODE_BATCH_DOCS = 256


def token_dtype(vocab_size: int) -> np.dtype:
    """Return the smallest unsigned dtype for the ids: uint16, or uint32 above 65,535 ids."""
    return np.dtype(np.uint32) if vocab_size > 65_535 else np.dtype(np.uint16)


def _batched(documents, size: int):
    batch = []
    for document in documents:
        batch.append(document)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare_shards(
    inputs: list[str],
    tokenizer_dir: str,
    out: str,
    val_fraction: float = 0.01,
    seed: int = 0,
    overwrite: bool = False,
    max_skip_fraction: float = 0.05,
) -> dict:
    """Tokenise `inputs` into train/val token shards in `out`; return the meta dict."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive)")
    check_output_dir(out, overwrite)  # refuse before reading any data
    tokenizer = Tokenizer.load(tokenizer_dir)
    eos_id = tokenizer.eos_id
    if eos_id is None:
        raise DataError(f"{tokenizer_dir}: tokenizer has no eos token to separate documents")
    dtype = token_dtype(tokenizer.vocab_size)
    started = time.perf_counter()
    skips = SkipLog()
    rng = np.random.default_rng(seed)
    counts = {s: {"tokens": 0, "documents": 0, "bytes": 0} for s in SPLITS}
    offsets: dict[str, list[int]] = {s: [0] for s in SPLITS}

    with atomic_dir(out, overwrite) as tmp:
        with contextlib.ExitStack() as stack:
            files = {s: stack.enter_context(open(tmp / f"{s}.bin", "wb")) for s in SPLITS}
            for batch in _batched(iter_documents(inputs, skips), _ENCODE_BATCH_DOCS):
                encoded = tokenizer.encode_batch([d.text for d in batch])
                # One draw per document in document order: the split depends only on the seed
                # and the corpus, never on batching or thread timing.
                is_val = rng.random(len(batch)) < val_fraction
                chunks: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
                for document, ids, val in zip(batch, encoded, is_val):
                    split = "val" if val else "train"
                    ids.append(eos_id)
                    chunks[split].append(np.asarray(ids, dtype=dtype))
                    counts[split]["tokens"] += len(ids)
                    counts[split]["documents"] += 1
                    counts[split]["bytes"] += len(document.text.encode("utf-8"))
                    offsets[split].append(counts[split]["tokens"])
                for split, arrays in chunks.items():
                    if arrays:
                        np.concatenate(arrays).tofile(files[split])
        skips.check(max_skip_fraction)
        for split in SPLITS:
            if counts[split]["documents"] == 0:
                total = sum(c["documents"] for c in counts.values())
                raise DataError(
                    f"{split} split is empty ({total} documents, val_fraction {val_fraction}); "
                    "add documents or change --val-fraction"
                )
            np.save(tmp / f"{split}.idx.npy", np.asarray(offsets[split], dtype=np.int64))
        tokenizer.save(tmp / "tokenizer")
        meta = {
            "format": SHARDS_FORMAT,
            "version": SHARDS_VERSION,
            "dtype": dtype.name,
            "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": eos_id,
            "splits": counts,
            "sources": corpus_provenance(inputs),
            "skips": skips.to_dict(),
            "seed": seed,
            "val_fraction": val_fraction,
            "seconds": round(time.perf_counter() - started, 3),
        }
        write_json_atomic(tmp / "meta.json", meta)
    return meta


class TokenShards:
    """A read-only view of a shards dir written by `prepare_shards`."""

    def __init__(self, directory: Path, meta: dict) -> None:
        self.directory = directory
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"])

    @classmethod
    def open(cls, directory: str | Path) -> TokenShards:
        """Open and validate a shards dir; DataError names what is missing or truncated."""
        directory = Path(directory)
        meta_file = directory / "meta.json"
        hint = "recreate it with `fmforge data prepare`"
        if not meta_file.is_file():
            raise DataError(f"{directory}: not a token-shards dir (no meta.json); {hint}")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            dtype = np.dtype(meta["dtype"])
            splits = meta["splits"]
            sizes = {s: int(splits[s]["tokens"]) for s in SPLITS}
            documents = {s: int(splits[s]["documents"]) for s in SPLITS}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{meta_file}: corrupt meta.json ({e!r}); {hint}") from e
        for split in SPLITS:
            data = directory / f"{split}.bin"
            expected = sizes[split] * dtype.itemsize
            actual = data.stat().st_size if data.is_file() else None
            if actual != expected:
                raise DataError(
                    f"{data}: expected {expected} bytes ({sizes[split]} tokens), found "
                    f"{'no file' if actual is None else actual}; {hint}"
                )
            index = directory / f"{split}.idx.npy"
            try:
                offsets = np.load(index, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise DataError(f"{index}: unreadable document index ({e}); {hint}") from e
            if len(offsets) != documents[split] + 1 or int(offsets[-1]) != sizes[split]:
                raise DataError(f"{index}: does not match meta.json; {hint}")
        return cls(directory, meta)

    def split(self, name: str) -> np.memmap:
        """Return the flat token array of split `name` as a read-only memmap."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        tokens = self.meta["splits"][name]["tokens"]
        return np.memmap(self.directory / f"{name}.bin", dtype=self.dtype, mode="r", shape=tokens)

    def doc_offsets(self, name: str) -> np.ndarray:
        """Return the int64 document start offsets of split `name`, plus the final end offset."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return np.load(self.directory / f"{name}.idx.npy")

    def tokenizer(self) -> Tokenizer:
        """Return the tokenizer the shards were made with, checked against meta's hash."""
        tokenizer = Tokenizer.load(self.directory / "tokenizer")
        if tokenizer.sha256 != self.meta["tokenizer_sha256"]:
            raise DataError(f"{self.directory}/tokenizer does not match meta.json's hash")
        return tokenizer


def _window_count(tokens: np.ndarray, seq_len: int, split: str) -> int:
    if seq_len < 1:
        raise UserError(f"train.seq_len must be >= 1, got {seq_len}")
    # Each window needs seq_len + 1 tokens: inputs and the targets shifted by one.
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise DataError(
            f"{split} split has {len(tokens)} tokens, too few for one window of "
            f"train.seq_len={seq_len} (+1); lower train.seq_len or add data"
        )
    return windows


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int):
    index = starts[:, None] + np.arange(seq_len + 1)  # (B, T+1)
    windows = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))  # (B, T+1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T), (B, T)


class BatchSampler:
    """Seeded, stateful sampler of (x, y) windows over a flat token stream; resumes exactly.

    Epoch e visits the windows starting at multiples of seq_len in the order of a permutation
    drawn from `default_rng([seed, e])`; rank r takes every world_size-th window of it, after
    trimming so every rank gets the same count. Batches run across epoch boundaries.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
    ) -> None:
        if batch_size < 1:
            raise UserError(f"train.batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_windows = _window_count(tokens, seq_len, split)
        self.windows_per_rank = self.num_windows // world_size
        if self.windows_per_rank < 1:
            raise DataError(
                f"{split} split has {self.num_windows} windows of train.seq_len={seq_len}, "
                f"fewer than the {world_size} ranks; lower train.seq_len or add data"
            )
        self.epoch = 0
        self.position = 0  # windows of this rank already consumed in the current epoch
        self._order_epoch: int | None = None
        self._order = np.empty(0, dtype=np.int64)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            used = perm[: self.windows_per_rank * self.world_size]
            self._order = used[self.rank :: self.world_size]
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the next (x, y) int64 batch, each (batch_size, seq_len)."""
        starts = []
        while len(starts) < self.batch_size:
            order = self._epoch_order()
            take = min(self.batch_size - len(starts), len(order) - self.position)
            starts.extend(order[self.position : self.position + take])
            self.position += take
            if self.position == len(order):
                self.epoch += 1
                self.position = 0
        return _gather(self.tokens, np.asarray(starts, dtype=np.int64) * self.seq_len, self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Return the JSON-serialisable position (plus what must match on resume)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "num_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by `state_dict`; the same data and settings are required."""
        for key, ours in (
            ("seed", self.seed),
            ("seq_len", self.seq_len),
            ("world_size", self.world_size),
            ("num_tokens", len(self.tokens)),
        ):
            if state.get(key) != ours:
                raise DataError(
                    f"cannot resume the sampler: checkpoint has {key}={state.get(key)}, "
                    f"this run has {ours}; resume with the same data and settings"
                )
        # Positions are per rank, and every rank advances in lockstep, so any rank's state fits.
        position = int(state["position"])
        if not 0 <= position < self.windows_per_rank:
            raise DataError(f"cannot resume the sampler: position {position} is out of range")
        self.epoch = int(state["epoch"])
        self.position = position


def iter_eval_batches(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    split: str = "val",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) int64 batches of consecutive non-overlapping windows, the last one smaller."""
    windows = _window_count(tokens, seq_len, split)
    starts = np.arange(windows, dtype=np.int64) * seq_len
    for number, first in enumerate(range(0, windows, batch_size)):
        if max_batches is not None and number >= max_batches:
            return
        yield _gather(tokens, starts[first : first + batch_size], seq_len)
