"""The model registry on SQLite and (when FMFORGE_TEST_POSTGRES_URL reaches one) PostgreSQL:
register, idempotent re-registration, promote, rollback, history, unknown versions and a registry
from a newer schema refused; a LoRA version loads with its adapter merged."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from fmforge.errors import UserError
from fmforge.flywheel.registry import (
    Registry,
    load_version,
    registry_schema,
)
from test_serve_support import serve_model_dir  # noqa: F401


def _candidate(registry: Registry, parent: str, dataset: str, lr: float = 1e-3):
    return registry.register(
        parent=parent,
        base="tiny",
        path=f"/runs/{dataset}/adapter",
        kind="lora",
        dataset_id=dataset,
        log_window={"from": 0.0, "to": 10.0},
        feedback_counts={"thumbs": 3, "edit": 1},
        config={"lr": lr, "steps": 5},
        eval_report={"candidate": {"pair_accuracy": 0.75}},
        gate={"decision": "promote", "by": "gate", "metrics": {"delta": 0.25}},
    )


def test_register_promote_rollback_and_history(db_url):
    registry = Registry(db_url)
    assert registry.list() == [] and registry.serving() is None
    v0 = registry.ensure_base("tiny", "/models/tiny")
    assert (v0.id, v0.kind, v0.status, v0.path) == ("v0", "base", "promoted", "/models/tiny")
    assert registry.ensure_base("other") == v0  # a non-empty registry keeps what it serves
    v1 = _candidate(registry, "v0", "sha256:aaa")
    assert (v1.id, v1.parent, v1.status) == ("v1", "v0", "candidate")
    assert v1.feedback_counts == {"thumbs": 3, "edit": 1} and v1.config["lr"] == 1e-3
    assert registry.serving().id == "v0"  # registering does not serve
    registry.promote("v1", by="gate")
    assert registry.serving().id == "v1" and registry.get("v1").status == "promoted"
    since = registry.serving_since()
    v2 = _candidate(registry, "v1", "sha256:bbb")
    registry.promote(v2.id, by="alice")
    assert registry.serving().id == "v2"
    assert registry.rollback_target().id == "v1" and registry.serving().id == "v2"  # no write
    assert registry.rollback(by="bob").id == "v1"
    assert registry.serving().id == "v1" and registry.serving_since() >= since
    assert registry.rollback(by="bob").id == "v0"  # rollbacks walk back through promotions
    assert registry.rollback_target() is None
    with pytest.raises(UserError, match="no earlier version"):
        registry.rollback(by="bob")
    events = [(e["version"], e["action"], e["by"]) for e in registry.history()]
    assert events == [
        ("v0", "promote", "ensure_base"),
        ("v1", "promote", "gate"),
        ("v2", "promote", "alice"),
        ("v1", "rollback", "bob"),
        ("v0", "rollback", "bob"),
    ]
    # A second process (another Registry on the same URL) sees the same state.
    other = Registry(db_url)
    assert other.serving().id == "v0" and [v.id for v in other.list()] == ["v0", "v1", "v2"]
    other.close()
    registry.close()


def test_register_is_idempotent_by_parent_dataset_and_config(db_url):
    registry = Registry(db_url)
    registry.ensure_base("tiny")
    first = _candidate(registry, "v0", "sha256:aaa")
    again = _candidate(registry, "v0", "sha256:aaa")
    assert again == first and len(registry.list()) == 2
    other_config = _candidate(registry, "v0", "sha256:aaa", lr=0.1)
    other_data = _candidate(registry, "v0", "sha256:ccc")
    assert [other_config.id, other_data.id] == ["v2", "v3"]
    registry.set_status("v2", "rejected")
    assert registry.get("v2").status == "rejected" and registry.serving().id == "v0"
    registry.close()


def test_unknown_versions_and_bad_fields_are_one_line_errors(db_url):
    registry = Registry(db_url)
    registry.ensure_base("tiny")
    with pytest.raises(UserError, match="'v9' is not in the registry .known: v0"):
        registry.get("v9")
    with pytest.raises(UserError, match="'v9' is not in the registry"):
        registry.promote("v9", by="me")
    with pytest.raises(UserError, match="'v7' is not in the registry"):
        _candidate(registry, "v7", "sha256:aaa")
    with pytest.raises(UserError, match="kind 'onnx'"):
        registry.register(base="tiny", path="x", kind="onnx")
    assert [v.id for v in registry.list()] == ["v0"]  # nothing half-written
    assert len(registry.history()) == 1
    registry.close()


def test_a_registry_from_a_newer_schema_is_refused(db_url):
    registry = Registry(db_url)
    registry.ensure_base("tiny")
    with registry.engine.begin() as conn:
        conn.execute(update(registry_schema).values(version=99))
    registry.close()
    with pytest.raises(UserError, match="schema version 99, newer than this fmforge"):
        Registry(db_url)


def test_load_version_merges_the_lora_adapter(tmp_path, serve_model_dir):  # noqa: F811
    import torch

    from fmforge.adapt.lora import apply_lora, base_fingerprint, lora_modules, save_lora_adapter
    from fmforge.model.load import load_bundle

    bundle = load_bundle(serve_model_dir, kind="decoder")
    apply_lora(bundle.model, ("q_proj", "v_proj"), r=2, alpha=4.0)
    torch.manual_seed(0)
    for module in lora_modules(bundle.model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.5)
    adapter = save_lora_adapter(
        bundle.model,
        tmp_path / "adapter",
        str(serve_model_dir),
        base_fingerprint(bundle.model, bundle.tokenizer),
    )
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        expected = bundle.model(ids)
    registry = Registry(str(tmp_path / "fb.db"))
    v0 = registry.ensure_base(str(serve_model_dir))
    v1 = registry.register(parent="v0", base=str(serve_model_dir), path=str(adapter), kind="lora")
    with torch.no_grad():
        merged = load_version(v1).model(ids)
        plain = load_version(v0).model(ids)
    assert torch.allclose(merged, expected, atol=1e-5)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter changed the logits
    registry.close()
