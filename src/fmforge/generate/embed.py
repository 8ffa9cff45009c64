"""Sentence embeddings from an encoder: tokenize, batch by length, mean-pool, L2-normalise.

Matches `sentence_transformers.SentenceTransformer.encode` for Transformer + mean Pooling
(+ Normalize) models: inputs framed as [CLS] text [SEP], cut at the model's `max_seq_length`
(special tokens included), padding excluded from the mean. Inputs are sorted by length and
batched, so a batch pads little; results come back in input order, equal to one-at-a-time
encoding (tests/test_minilm.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fmforge.errors import UserError
from fmforge.model.heads import embedding_width, normalize, sentence_embedding


def encode_texts(loaded: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Return each text's ids framed by [CLS] ... [SEP] and cut to `max_length`."""
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise UserError(f"{loaded.source or 'this model'} has no tokenizer; cannot embed text")
    return [tokenizer.frame(ids, max_length) for ids in tokenizer.encode_batch(list(texts))]


def pad_batch(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (input_ids, attention_mask), each (B, T_max), right-padded with `pad_id`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def max_input_tokens(loaded: Any) -> int:
    """Return the longest input (special tokens included) the encoder reads."""
    spec = getattr(loaded, "sentence", None)
    if spec is not None:
        return spec.max_seq_length
    return loaded.config.max_position_embeddings


@torch.no_grad()
def embed_ids(
    loaded: Any, rows: Sequence[list[int]], batch_size: int = 32, normalize_rows: bool = True
) -> np.ndarray:
    """Return (N, C) float32 embeddings of framed id rows, in input order."""
    model = loaded.model
    device = next(model.parameters()).device
    pad_id = loaded.tokenizer.pad_id if loaded.tokenizer.pad_id is not None else 0
    out = np.zeros((len(rows), embedding_width(model)), dtype=np.float32)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # longest first
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        ids, mask = pad_batch([rows[i] for i in index], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        pooled = sentence_embedding(model, ids, mask)  # (B, D)
        if normalize_rows:
            pooled = normalize(pooled)
        out[index] = pooled.float().cpu().numpy()
    return out


def embed_texts(
    loaded: Any,
    texts: str | Sequence[str],
    batch_size: int = 32,
    normalize_rows: bool | None = None,
) -> np.ndarray:
    """Return (N, C) float32 sentence embeddings of `texts` (L2-normalised unless the model isn't).

    A single string gives a (1, C) array. Empty input lists are refused.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise UserError("nothing to embed: the input list is empty")
    if not all(isinstance(t, str) for t in texts):
        raise UserError("every input to embed must be a string")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    spec = getattr(loaded, "sentence", None)
    if normalize_rows is None:
        normalize_rows = spec.normalize if spec is not None else True
    rows = encode_texts(loaded, texts, max_input_tokens(loaded))
    return embed_ids(loaded, rows, batch_size, normalize_rows)


def read_texts(path: str) -> list[str]:
    """Return the texts of a file: one per line (.txt), or each record's "text" (.jsonl)."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--input {path}: no such file")
    lines = file.read_text(encoding="utf-8").splitlines()
    if file.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    from fmforge.data.sources import iter_jsonl

    texts = []
    for number, record in iter_jsonl(file):
        if not isinstance(record.get("text"), str):
            raise UserError(f'{path}:{number}: expected an object with a "text" string')
        texts.append(record["text"])
    return texts


def embed_file(
    loaded: Any, input_path: str, out: str, batch_size: int = 32, overwrite: bool = False
) -> dict[str, Any]:
    """Embed the texts of `input_path` into `out` (.npy array, or .parquet text + embedding)."""
    import os

    if not out.endswith((".npy", ".parquet")):
        raise UserError(f"--out {out}: use a .npy or .parquet file name")
    if os.path.exists(out) and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it")
    texts = read_texts(input_path)
    vectors = embed_texts(loaded, texts, batch_size=batch_size)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.tmp")
    if out.endswith(".npy"):
        with open(tmp, "wb") as f:
            np.save(f, vectors)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        pq.write_table(pa.table({"text": texts, "embedding": column}), tmp)
    os.replace(tmp, out)  # readers never see a half-written file
    return {"out": out, "count": len(texts), "dimensions": int(vectors.shape[1])}
