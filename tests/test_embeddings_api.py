"""/v1/embeddings and /v1/search beside a decoder: the official openai client, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from encoders import SENTENCES, tiny_embedder_dir
from test_serve_support import (  # noqa: F401
    MODEL_NAME,
    ThreadServer,
    serve_model_dir,
    start_server,
)

ENCODER = "tiny-encoder"


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return tiny_embedder_dir(tmp_path_factory.mktemp("enc") / ENCODER)


@pytest.fixture(scope="module")
def index_dir(encoder_dir, tmp_path_factory):
    from fmforge.api import load_encoder
    from fmforge.search.index import build_index

    root = tmp_path_factory.mktemp("ix")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    build_index(load_encoder(encoder_dir), [str(docs)], root / "index")
    return root / "index"


@pytest.fixture(scope="module")
def server(serve_model_dir, encoder_dir, index_dir):  # noqa: F811
    from fmforge.model.load import load_bundle
    from fmforge.serve.app import Settings, create_app
    from fmforge.serve.embeddings import load_embedder

    embedder = load_embedder(str(encoder_dir), str(index_dir), decoder_name=MODEL_NAME)
    app = create_app(load_bundle(serve_model_dir), Settings(model_name=MODEL_NAME), None, embedder)
    with ThreadServer(app) as running:
        yield running


def _cli_embeddings(encoder_dir, texts, tmp_path) -> np.ndarray:
    from fmforge.cli import main

    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "out.npy"
    main(["embed", str(encoder_dir), "--input", str(tmp_path / "in.txt"), "--out", str(out)])
    return np.load(out)


def test_openai_client_embeddings_equal_fmforge_embed(server, encoder_dir, tmp_path):
    import openai

    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    texts = [SENTENCES[5], SENTENCES[0], "a zebra sentence", SENTENCES[2]]
    expected = _cli_embeddings(encoder_dir, texts, tmp_path)
    default = api.embeddings.create(model=ENCODER, input=texts)  # base64 on the wire
    floats = api.embeddings.create(model=ENCODER, input=texts, encoding_format="float")
    for response in (default, floats):
        got = np.array([d.embedding for d in response.data], dtype=np.float32)
        assert [d.index for d in response.data] == [0, 1, 2, 3]
        assert np.abs(got - expected).max() <= 1e-6
        assert response.model == ENCODER
    from fmforge.api import load_encoder
    from fmforge.generate.embed import encode_texts

    encoder = load_encoder(encoder_dir)
    tokens = sum(len(r) for r in encode_texts(encoder, texts, 32))
    assert default.usage.prompt_tokens == default.usage.total_tokens == tokens


def test_models_lists_the_encoder_beside_the_decoder(server):
    import openai

    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in api.models.list()] == [MODEL_NAME, ENCODER]
    assert api.models.retrieve(ENCODER).id == ENCODER
    assert api.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("no-such-model")


def test_bad_embedding_requests_get_openai_shaped_4xx(server):
    import httpx

    url = server.url + "/v1/embeddings"
    cases = [
        ({"model": ENCODER, "input": []}, 400, None),
        ({"model": ENCODER, "input": ["x"] * 10_000}, 400, None),
        ({"model": ENCODER, "input": "x", "dimensions": 8}, 400, None),
        ({"model": MODEL_NAME, "input": "x"}, 400, "model_does_not_support_embeddings"),
        ({"model": "nope", "input": "x"}, 404, "model_not_found"),
        ({"model": ENCODER, "input": [[10**9]]}, 400, None),
    ]
    for body, status, code in cases:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        if code:
            assert error["code"] == code
    good = httpx.post(url, json={"model": ENCODER, "input": [[2, 7, 3]]}, timeout=30)
    assert good.status_code == 200 and len(good.json()["data"][0]["embedding"]) == 64


def test_search_endpoint_returns_the_matching_chunk(server):
    import httpx

    r = httpx.post(server.url + "/v1/search", json={"query": SENTENCES[6], "k": 2}, timeout=30)
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    assert len(hits) == 2 and hits[0]["text"] == SENTENCES[6]
    bad = httpx.post(server.url + "/v1/search", json={"query": "", "k": 2}, timeout=30)
    assert bad.status_code == 400
    page = httpx.get(server.url + "/", timeout=30).text
    assert 'id="search-form"' in page and "/playground/search.js" in page
    script = httpx.get(server.url + "/playground/search.js", timeout=30)
    assert script.status_code == 200 and "/v1/search" in script.text


@pytest.mark.slow  # a server subprocess: ~15 s of start-up imports
def test_serve_command_wires_embeddings_beside_the_decoder(serve_model_dir, encoder_dir):  # noqa: F811
    import httpx

    proc = start_server(serve_model_dir, None, "--embeddings", str(encoder_dir))
    try:
        body = {"model": ENCODER, "input": "hello there", "encoding_format": "float"}
        r = httpx.post(proc.url + "/v1/embeddings", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"][0]["embedding"]) == 64
    finally:
        assert proc.stop() == 0
