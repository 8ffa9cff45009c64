"""Schemathesis over the app's OpenAPI schema: generated requests (valid and not) never get a 5xx.

Bounded: a fixed number of examples per operation, no shrinking, one in-process app whose engine
runs the tiny model (max_tokens is capped so each generated request stays fast).
"""

from __future__ import annotations

import pytest

from test_serve_support import serve_model_dir  # noqa: F401


@pytest.mark.parametrize("examples", [10, pytest.param(150, marks=pytest.mark.slow)])
def test_schemathesis_finds_no_server_errors(serve_model_dir, examples):  # noqa: F811
    hypothesis = pytest.importorskip("hypothesis")
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import not_a_server_error

    from test_serve_support import make_app

    app, _ = make_app(serve_model_dir, max_concurrency=4, max_queue=64, default_max_tokens=4)
    engine = app.state.server.engine
    engine.start()
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        failures = []
        for operation in schema.get_all_operations():
            op = operation.ok()

            @hypothesis.settings(
                max_examples=examples,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            @hypothesis.given(case=op.as_strategy())
            def run(case):
                body = case.body
                if isinstance(body, dict) and isinstance(body.get("max_tokens"), int):
                    body["max_tokens"] = min(max(body["max_tokens"], -5), 4)
                response = case.call()
                if response.status_code >= 500:
                    failures.append(
                        (case.operation.label, response.status_code, response.text[:300], body)
                    )
                    return
                case.validate_response(response, checks=[not_a_server_error])

            run()
        assert not failures, failures[:5]
    finally:
        engine.shutdown()
