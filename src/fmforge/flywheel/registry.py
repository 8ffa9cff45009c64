"""The model registry: every model version the flywheel built, its lineage, and which one serves.

Three tables in the feedback store's database (SQLite by default, PostgreSQL by URL):

- `registry_schema`: one row, the schema version; a registry written by a newer fmforge is
  refused (a one-line UserError) rather than misread.
- `model_versions`: one row per version ("v0", "v1", ...): parent, base, what to load (`path`,
  `kind`), the dataset's content hash, the log window and feedback counts it was built from, the
  config, the evaluation report, the gate decision and its status. A version is keyed by
  (parent, dataset id, config hash), so registering the same candidate twice (a re-run after a
  crash) returns the first row.
- `serving_events`: append-only promote and rollback events. The version serving now is the
  version of the last event, so a server polls one indexed row, and a rollback is one more event.

`load_version(version)` returns the loaded model of a version: the base (or full model dir), with
the PEFT adapter merged in for `kind == "lora"` (`adapt/lora.py`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from fmforge.errors import UserError
from fmforge.flywheel.store import FeedbackStore, redact

SCHEMA_VERSION = 1
KINDS = ("base", "full", "lora")
STATUSES = ("candidate", "promoted", "rejected")
_JSON_FIELDS = ("log_window", "feedback_counts", "config", "eval_report", "gate")

registry_metadata = MetaData()

registry_schema = Table(
    "registry_schema",
    registry_metadata,
    Column("name", String(32), primary_key=True),  # always "registry"
    Column("version", Integer, nullable=False),
)

model_versions = Table(
    "model_versions",
    registry_metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),  # 0, 1, ... (id = f"v{seq}")
    Column("id", String(32), nullable=False, unique=True),
    Column("key", String(64), nullable=False, unique=True),  # sha256 of parent, dataset, config
    Column("created", Float, nullable=False),
    Column("parent", String(32)),
    Column("base", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("kind", String(8), nullable=False),
    Column("dataset_id", String(80)),
    Column("log_window", Text, nullable=False),  # JSON
    Column("feedback_counts", Text, nullable=False),  # JSON
    Column("config", Text, nullable=False),  # JSON
    Column("eval_report", Text, nullable=False),  # JSON
    Column("gate", Text, nullable=False),  # JSON
    Column("status", String(16), nullable=False),
)

serving_events = Table(
    "serving_events",
    registry_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("version", String(32), nullable=False),
    Column("action", String(16), nullable=False),  # "promote" | "rollback"
    Column("by", String(128), nullable=False),
    Column("created", Float, nullable=False),
)


@dataclass(frozen=True)
class Version:
    """One registered model version (see the module docstring for the fields' meaning)."""

    id: str  # "v0", "v1", ...: what generations.model_version holds
    created: float  # unix time of registration
    parent: str | None  # the version it was trained from
    base: str  # base model spec (a dir or a built-in name)
    path: str  # what to load: a full model dir, or a PEFT adapter dir over `base`
    kind: str  # "base" | "full" | "lora"
    dataset_id: str | None  # content hash of the training dataset
    log_window: dict  # {"from": unix time, "to": unix time} of the feedback it was built from
    feedback_counts: dict  # {"thumbs": n, "edit": n, ...} in that window
    config: dict  # the cycle and training configuration
    eval_report: dict  # candidate and incumbent metrics on the frozen split and the guards
    gate: dict  # {"decision": "promote"|"reject"|"manual", "by": "...", "metrics": {...}}
    status: str  # "candidate" | "promoted" | "rejected"


def config_hash(config: dict) -> str:
    """Return the sha256 of a config's canonical JSON."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _version_key(parent: str | None, dataset_id: str | None, config: dict) -> str:
    text = json.dumps([parent, dataset_id, config_hash(config)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _version(row: Any) -> Version:
    fields = {k: row[k] for k in Version.__dataclass_fields__}
    for key in _JSON_FIELDS:
        fields[key] = json.loads(fields[key])
    return Version(**fields)


class Registry:
    """Model versions and serving events in the feedback store's database; thread-safe."""

    def __init__(self, url: str | None = None) -> None:
        self.store = FeedbackStore(url)  # the same database, connection settings and write lock
        self.engine, self.url = self.store.engine, self.store.url
        try:
            registry_metadata.create_all(self.engine)
        except Exception as e:
            reason = " ".join(str(e).split())[:300]
            raise UserError(f"cannot open the model registry {redact(self.url)}: {reason}") from e
        self._check_schema()

    def _check_schema(self) -> None:
        with self.engine.connect() as conn:
            found = conn.execute(
                select(registry_schema.c.version).where(registry_schema.c.name == "registry")
            ).scalar_one_or_none()
        if found is None:
            try:
                self._write(
                    registry_schema.insert().values(name="registry", version=SCHEMA_VERSION)
                )
            except IntegrityError:  # another process created it first
                return self._check_schema()
        elif found > SCHEMA_VERSION:
            raise UserError(
                f"the model registry in {redact(self.url)} has schema version {found}, newer than "
                f"this fmforge understands ({SCHEMA_VERSION}); upgrade fmforge"
            )

    def _write(self, *statements: Any) -> None:
        lock = self.store.write_lock
        if lock is None:
            with self.engine.begin() as conn:
                for statement in statements:
                    conn.execute(statement)
            return
        with lock, self.engine.begin() as conn:
            for statement in statements:
                conn.execute(statement)

    # --- versions -------------------------------------------------------------------------------

    def register(
        self,
        *,
        base: str,
        path: str,
        kind: str,
        parent: str | None = None,
        dataset_id: str | None = None,
        log_window: dict | None = None,
        feedback_counts: dict | None = None,
        config: dict | None = None,
        eval_report: dict | None = None,
        gate: dict | None = None,
        status: str = "candidate",
    ) -> Version:
        """Add a version and return it; the same (parent, dataset id, config) returns the first."""
        if kind not in KINDS:
            raise UserError(f"version kind {kind!r} is not one of {', '.join(KINDS)}")
        if status not in STATUSES:
            raise UserError(f"version status {status!r} is not one of {', '.join(STATUSES)}")
        if parent is not None:
            self.get(parent)
        config = config or {}
        key = _version_key(parent, dataset_id, config)
        row = {
            "key": key,
            "parent": parent,
            "base": str(base),
            "path": str(path),
            "kind": kind,
            "dataset_id": dataset_id,
            "log_window": json.dumps(log_window or {}, sort_keys=True),
            "feedback_counts": json.dumps(feedback_counts or {}, sort_keys=True),
            "config": json.dumps(config, sort_keys=True, default=str),
            "eval_report": json.dumps(eval_report or {}, sort_keys=True),
            "gate": json.dumps(gate or {}, sort_keys=True),
            "status": status,
        }
        for _attempt in range(20):  # concurrent registrations race for the next seq
            existing = self._by_key(key)
            if existing is not None:
                return existing
            with self.engine.connect() as conn:
                top = conn.execute(select(func.max(model_versions.c.seq))).scalar_one_or_none()
            seq = 0 if top is None else top + 1
            try:
                self._write(
                    model_versions.insert().values(
                        seq=seq, id=f"v{seq}", created=time.time(), **row
                    )
                )
            except IntegrityError:
                continue
            return self.get(f"v{seq}")
        raise UserError("could not register the version: too many concurrent registrations")

    def _by_key(self, key: str) -> Version | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(model_versions).where(model_versions.c.key == key)).first()
        return None if row is None else _version(row._mapping)

    def get(self, version_id: str) -> Version:
        """Return a version by id; UserError naming the known ids when there is none."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(model_versions).where(model_versions.c.id == version_id)
            ).first()
        if row is None:
            known = [v.id for v in self.list()]
            listing = ", ".join(known[-10:]) if known else "none yet"
            raise UserError(
                f"model version {version_id!r} is not in the registry (known: {listing})"
            )
        return _version(row._mapping)

    def list(self) -> list[Version]:
        """Return every version, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(model_versions).order_by(model_versions.c.seq))
            return [_version(r._mapping) for r in rows]

    def set_status(self, version_id: str, status: str) -> Version:
        """Set a version's status ("candidate", "promoted" or "rejected") and return it."""
        if status not in STATUSES:
            raise UserError(f"version status {status!r} is not one of {', '.join(STATUSES)}")
        self.get(version_id)
        self._write(
            update(model_versions).where(model_versions.c.id == version_id).values(status=status)
        )
        return self.get(version_id)

    # --- serving --------------------------------------------------------------------------------

    def _last_event(self) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(serving_events).order_by(serving_events.c.id.desc()).limit(1)
            ).first()
        return None if row is None else dict(row._mapping)

    def serving(self) -> Version | None:
        """Return the version serving now (the last serving event's), or None before any."""
        event = self._last_event()
        return None if event is None else self.get(event["version"])

    def serving_since(self) -> float | None:
        """Return when the serving version was promoted (or rolled back to), or None."""
        event = self._last_event()
        return None if event is None else event["created"]

    def history(self) -> list[dict]:
        """Return the serving events, oldest first: version, action, by, created."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(serving_events).order_by(serving_events.c.id))
            return [
                {k: r._mapping[k] for k in ("version", "action", "by", "created")} for r in rows
            ]

    def _serving_stack(self) -> list[str]:
        # Replaying the events: a promotion pushes a version, a rollback pops back to the previous.
        stack: list[str] = []
        for event in self.history():
            if event["action"] == "promote":
                stack.append(event["version"])
            elif stack:
                stack.pop()
        return stack

    def promote(self, version_id: str, by: str) -> Version:
        """Make `version_id` the serving version (one appended event) and return it."""
        self.get(version_id)
        event = serving_events.insert().values(
            version=version_id, action="promote", by=by, created=time.time()
        )
        status = (
            update(model_versions)
            .where(model_versions.c.id == version_id)
            .values(status="promoted")
        )
        self._write(event, status)
        return self.get(version_id)

    def rollback_target(self) -> Version | None:
        """Return the version `rollback` would serve (None: nothing earlier), writing nothing."""
        stack = self._serving_stack()
        return self.get(stack[-2]) if len(stack) >= 2 else None

    def rollback(self, by: str) -> Version:
        """Serve the version that served before the current one again; return it."""
        target = self.rollback_target()
        if target is None:
            serving = self.serving()
            first = serving.id if serving else "nothing"
            raise UserError(f"no earlier version to roll back to ({first} is the first served)")
        previous = target.id
        self._write(
            serving_events.insert().values(
                version=previous, action="rollback", by=by, created=time.time()
            )
        )
        return self.get(previous)

    def ensure_base(self, base: str, path: str | None = None) -> Version:
        """Register and promote the base as "v0" when the registry is empty; return what serves."""
        serving = self.serving()
        if serving is not None:
            return serving
        v0 = self.register(
            base=str(base),
            path=str(path or base),
            kind="base",
            config={"base": str(base)},
            gate={"decision": "manual", "by": "ensure_base", "metrics": {}},
        )
        if self.serving() is None:
            self.promote(v0.id, by="ensure_base")
        return self.serving() or v0

    def close(self) -> None:
        """Release the connection pool."""
        self.store.close()


def load_version(version: Version, device: str = "cpu") -> Any:
    """Return the loaded decoder of a version (a `fmforge.model.load.ModelBundle`).

    `kind` "base" and "full" load `path`; "lora" loads `base` and merges the PEFT adapter at
    `path` into it (refused when the adapter was trained on another base). Wrap the result with
    `fmforge.api.typed(...)` for `.generate/.chat` (stages do not import the API layer).
    """
    from fmforge.model.load import load_bundle

    if version.kind in ("base", "full"):
        return load_bundle(version.path, device=device, kind="decoder")
    if version.kind != "lora":
        raise UserError(f"model version {version.id} has unknown kind {version.kind!r}")
    from fmforge.adapt.lora import base_fingerprint, load_lora_adapter, merge_lora, remove_lora

    bundle = load_bundle(version.base, device=device, kind="decoder")
    fingerprint = base_fingerprint(bundle.model, bundle.tokenizer)
    load_lora_adapter(bundle.model, version.path, fingerprint)
    merge_lora(bundle.model)
    remove_lora(bundle.model)
    bundle.model.eval()
    return bundle
