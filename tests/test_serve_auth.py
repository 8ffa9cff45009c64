"""With an API key, every route but /health and the playground's static files answers 401
(walking the app's whole route table), and the key never appears in logs or error bodies."""

from __future__ import annotations

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount

from test_serve_support import MODEL_NAME, ThreadServer, make_app, serve_model_dir  # noqa: F401

KEY = "sk-test-0123456789-secret"
PUBLIC = {"/health", "/"}


@pytest.fixture(scope="module")
def app(serve_model_dir):  # noqa: F811
    app, _ = make_app(serve_model_dir, api_key=KEY, metrics=True)
    return app


def _routes(app):
    # (method, concrete path) for every route, path parameters filled in.
    for route in app.routes:
        if isinstance(route, Mount):
            yield "GET", route.path + "/index.html", True
            yield "GET", route.path + "/app.js", True
            continue
        path = route.path.replace("{model_id}", MODEL_NAME)
        methods = route.methods if isinstance(route, APIRoute) else getattr(route, "methods", None)
        for method in sorted(methods or {"GET"}):
            if method == "HEAD":
                continue
            yield method, path, path in PUBLIC


def test_every_route_needs_the_key_except_health_and_playground(app):
    walked = list(_routes(app))
    paths = {p for _, p, _ in walked}
    assert {"/v1/chat/completions", "/v1/feedback", "/openapi.json", "/metrics"} <= paths
    with TestClient(app) as client:
        for method, path, public in walked:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer "}):
                response = client.request(method, path, headers=headers, json={})
                if public:
                    assert response.status_code != 401, (method, path)
                    continue
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.json()["error"]["code"] == "invalid_api_key"
                assert KEY not in response.text
            with_key = client.request(
                method, path, headers={"Authorization": f"Bearer {KEY}"}, json={}
            )
            assert with_key.status_code != 401, (method, path)
        # Unknown routes are guarded too (no probing without the key).
        assert client.get("/v1/secret").status_code == 401


def test_key_never_appears_in_server_logs(serve_model_dir):  # noqa: F811
    import io
    import logging

    app, _ = make_app(serve_model_dir, api_key=KEY)
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.DEBUG)
    names = ("uvicorn", "uvicorn.access", "uvicorn.error", "fmforge", "fastapi")
    with ThreadServer(app, log_level="debug") as server:
        for name in names:
            logging.getLogger(name).addHandler(handler)
        try:
            auth = {"Authorization": f"Bearer {KEY}"}
            assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
            assert httpx.get(server.url + "/v1/models", headers=auth, timeout=10).status_code == 200
            body = {"model": MODEL_NAME, "prompt": "def", "max_tokens": 2}
            url = server.url + "/v1/completions"
            assert httpx.post(url, json=body, headers=auth, timeout=30).status_code == 200
            wrong = {"Authorization": f"Bearer {KEY}x"}
            assert (
                httpx.get(server.url + "/v1/models", headers=wrong, timeout=10).status_code == 401
            )
        finally:
            for name in names:
                logging.getLogger(name).removeHandler(handler)
    output = buffer.getvalue()
    assert "GET /v1/models" in output  # the access log ran
    assert KEY not in output
