"""/v1/embeddings and /v1/search: an encoder served beside the decoder (`serve --embeddings`).

`/v1/embeddings` follows OpenAI's API: `input` is a string, a list of strings, or token arrays;
`encoding_format` "float" or "base64" (little-endian float32, the official client's default);
`dimensions` must equal the model's width (these encoders are not Matryoshka-trained); `usage`
counts the tokens the encoder read ([CLS] and [SEP] included). Inputs longer than the encoder's
`max_seq_length` are cut there, as sentence-transformers does. The vectors are those of
`fmforge embed` (the same function). `/v1/search` queries a search index built with that encoder.
Errors are OpenAI-shaped (serve/errors.py).
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter
from pydantic import Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool

from fmforge.serve.errors import APIError
from fmforge.serve.schemas import EmbeddingRequest, _Body

MAX_SEARCH_K = 100


@dataclass
class Embedder:
    """The encoder behind /v1/embeddings: a loaded encoder bundle, its name, an optional index."""

    loaded: Any  # a ModelBundle of kind "encoder"
    name: str  # the `model` clients send
    index: Any | None = None  # a fmforge.search.index.SearchIndex built with this encoder
    decoder_name: str | None = None  # the decoder served beside it (a 400, not a 404)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()  # one forward pass at a time: torch uses every core


class SearchRequest(_Body):
    """POST /v1/search (fmforge extension)."""

    query: StrictStr = Field(min_length=1)
    k: StrictInt = Field(10, ge=1, le=MAX_SEARCH_K)
    model: StrictStr | None = None


def _check_model(embedder: Embedder, name: str | None) -> None:
    if name == embedder.name:
        return
    if name is not None and name == embedder.decoder_name:
        raise APIError(
            400,
            f"The model `{name}` does not provide embeddings (it is a decoder-only language "
            f"model); use `{embedder.name}`.",
            "model",
            "model_does_not_support_embeddings",
        )
    shown = "" if name is None else name[:100]
    raise APIError(
        404,
        f"The model `{shown}` does not exist" if name else "you must provide a model",
        "model",
        "model_not_found",
    )


def _rows(embedder: Embedder, items: Any) -> list[list[int]]:
    """Return the framed id rows of the request's inputs (strings or token arrays)."""
    from fmforge.generate.embed import encode_texts, max_input_tokens

    loaded = embedder.loaded
    limit = max_input_tokens(loaded)
    if isinstance(items, str):
        return encode_texts(loaded, [items], limit)
    if items and isinstance(items[0], int):
        items = [items]  # one token array
    if items and isinstance(items[0], str):
        return encode_texts(loaded, items, limit)
    vocab = loaded.tokenizer.vocab_size
    rows = []
    for i, ids in enumerate(items):
        if not ids or any(t < 0 or t >= vocab for t in ids):
            raise APIError(400, f"input[{i}] holds token ids outside [0, {vocab})", "input")
        rows.append(loaded.tokenizer.frame(list(ids), limit))
    return rows


def embeddings_router(embedder: Embedder) -> APIRouter:
    """Return the routes of `embedder`: POST /v1/embeddings and, with an index, /v1/search."""
    from fmforge.generate.embed import embed_ids
    from fmforge.model.heads import embedding_width

    router = APIRouter()
    width = embedding_width(embedder.loaded.model)

    def embed(rows: list[list[int]]) -> np.ndarray:
        with embedder.lock:
            return embed_ids(embedder.loaded, rows)

    @router.post("/v1/embeddings", summary="Embeddings of the served encoder (OpenAI API)")
    async def create_embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        _check_model(embedder, body.model)
        if body.dimensions is not None and body.dimensions != width:
            raise APIError(
                400,
                f"`{embedder.name}` returns {width} dimensions and cannot shorten them; "
                f"omit `dimensions` or send {width}",
                "dimensions",
            )
        rows = _rows(embedder, body.input)
        vectors = await run_in_threadpool(embed, rows)
        data = []
        for i, vector in enumerate(vectors):
            if body.encoding_format == "base64":
                value: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(r) for r in rows)
        return {
            "object": "list",
            "data": data,
            "model": embedder.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @router.post("/v1/search", summary="fmforge extension: nearest chunks of the served index")
    async def search(body: SearchRequest) -> dict[str, Any]:
        if body.model is not None:
            _check_model(embedder, body.model)
        if embedder.index is None:
            raise APIError(
                400,
                "this server has no search index; start it with --search-index DIR",
                None,
                "no_search_index",
            )
        rows = _rows(embedder, body.query)
        query = await run_in_threadpool(embed, rows)
        scores, ids = embedder.index.search(query, body.k)
        hits = [
            {"rank": r, "score": round(float(s), 6), **embedder.index.chunks[int(i)]}
            for r, (s, i) in enumerate(zip(scores[0], ids[0]), 1)
        ]
        return {"object": "list", "data": hits, "model": embedder.name}

    return router


def load_embedder(
    model: str, index_dir: str | None = None, decoder_name: str | None = None
) -> Embedder:
    """Load the encoder (and the index, checked against it) that `serve --embeddings` serves."""
    import os

    from fmforge.errors import UserError
    from fmforge.model.load import load_bundle

    loaded = load_bundle(model, kind="encoder")
    index = None
    if index_dir is not None:
        from fmforge.search.index import SearchIndex

        index = SearchIndex(index_dir)
        index.check_model(loaded)
    name = model if not os.path.isdir(model) else os.path.basename(os.path.normpath(model))
    if name == decoder_name:
        raise UserError(f"--embeddings {model}: its name equals the decoder's; rename one dir")
    return Embedder(loaded, name, index, decoder_name)
