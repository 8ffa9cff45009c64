"""The feedback store: every generation the server returns, and people's reactions to it.

SQLAlchemy 2.x Core over two tables, `generations` and `feedback`. SQLite by default, in a file
under the per-user data directory (WAL journal, a busy timeout, synchronous=FULL, and one writer
per process); PostgreSQL when the URL says so. Every write is idempotent: a generation is keyed by
its response id, a feedback row by its idempotency key, and both are inserted with
`ON CONFLICT DO NOTHING`, so a client's retry never creates a second row.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine

from fmforge.errors import UserError

FEEDBACK_KINDS = ("thumbs", "rating", "edit", "pairwise", "comment")

metadata = MetaData()

generations = Table(
    "generations",
    metadata,
    Column("id", String(64), primary_key=True),  # the response id (chatcmpl-..., cmpl-...)
    Column("created", Float, nullable=False, index=True),  # unix time
    Column("endpoint", String(16), nullable=False),  # "chat" or "completion"
    Column("model", String(256), nullable=False),
    Column("model_version", String(128), nullable=False),  # tokenizer/weights fingerprint
    Column("params", Text, nullable=False),  # JSON: sampling parameters as requested
    Column("messages", Text),  # JSON list of role/content (chat)
    Column("prompt", Text),  # the prompt text (completions)
    Column("outputs", Text, nullable=False),  # JSON list: one text per choice
    Column("finish_reasons", Text, nullable=False),  # JSON list
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_s", Float, nullable=False),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(256), nullable=False, unique=True),
    Column("generation_id", String(64), ForeignKey("generations.id"), nullable=False, index=True),
    Column("choice_index", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("value", Text, nullable=False),  # JSON
    Column("created", Float, nullable=False),
)


def default_db_url() -> str:
    """Return the SQLite URL of the per-user store ($XDG_DATA_HOME/fmforge/feedback.db)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return f"sqlite:///{Path(base) / 'fmforge' / 'feedback.db'}"


def normalise_url(url: str | None) -> str:
    """Return a SQLAlchemy URL: None -> the default, a path -> SQLite, postgres:// -> psycopg.

    A URL with a password is accepted, but the password is never echoed in errors.
    """
    if not url:
        return default_db_url()
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return url


def redact(url: str) -> str:
    """Return `url` with any password replaced by ***."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


class FeedbackStore:
    """Generations and feedback in one database; safe to share between threads."""

    def __init__(self, url: str | None = None) -> None:
        self.url = normalise_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self.engine = self._connect()
        # SQLite allows one writer at a time; serialising writes in-process avoids busy waits.
        self.write_lock = threading.Lock() if self.is_sqlite else None

    def _connect(self) -> Engine:
        try:
            if self.is_sqlite:
                path = self.url.split("sqlite:///", 1)[-1]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(self.url, connect_args={"timeout": 30})

                @event.listens_for(engine, "connect")
                def _pragmas(dbapi_connection, _record):
                    cursor = dbapi_connection.cursor()
                    cursor.execute("PRAGMA journal_mode=WAL")
                    cursor.execute("PRAGMA synchronous=FULL")  # a 2xx survives power loss too
                    cursor.execute("PRAGMA busy_timeout=30000")
                    cursor.execute("PRAGMA foreign_keys=ON")
                    cursor.close()

            else:
                engine = create_engine(self.url, pool_pre_ping=True, pool_size=8)
            metadata.create_all(engine)
            return engine
        except UserError:
            raise
        except Exception as e:
            reason = " ".join(str(e).split())[:300]
            raise UserError(f"cannot open the feedback store {redact(self.url)}: {reason}") from e

    def _write(self, statement: Any) -> None:
        if self.write_lock is None:
            with self.engine.begin() as conn:
                conn.execute(statement)
            return
        with self.write_lock, self.engine.begin() as conn:
            conn.execute(statement)

    def _insert_ignore(self, table: Table, row: dict[str, Any], key: str) -> Any:
        if self.is_sqlite:
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert(table).values(**row).on_conflict_do_nothing(index_elements=[key])

    # --- writes ---------------------------------------------------------------------------------

    def record_generation(self, record: dict[str, Any]) -> None:
        """Insert one generation (see the `generations` columns); a repeated id is ignored."""
        row = dict(record)
        for key in ("params", "messages", "outputs", "finish_reasons"):
            if row.get(key) is not None and not isinstance(row[key], str):
                row[key] = json.dumps(row[key], ensure_ascii=False, sort_keys=True)
        row.setdefault("created", time.time())
        self._write(self._insert_ignore(generations, row, "id"))

    def add_feedback(
        self,
        generation_id: str,
        kind: str,
        value: Any,
        idempotency_key: str | None = None,
        choice_index: int = 0,
    ) -> tuple[dict[str, Any], bool]:
        """Insert feedback on a generation; return (the stored row, whether it was new).

        A second write with the same idempotency key returns the first row and inserts nothing.
        Raises KeyError for an unknown generation and ValueError for an invalid kind/value.
        """
        generation = self.get_generation(generation_id)
        if generation is None:
            raise KeyError(generation_id)
        check_feedback(kind, value, choice_index, len(generation["outputs"]))
        key = idempotency_key or f"auto-{uuid.uuid4().hex}"
        existing = self.get_feedback(key)
        if existing is not None:
            return existing, False
        row = {
            "idempotency_key": key,
            "generation_id": generation_id,
            "choice_index": choice_index,
            "kind": kind,
            "value": json.dumps(value, ensure_ascii=False, sort_keys=True),
            "created": time.time(),
        }
        self._write(self._insert_ignore(feedback, row, "idempotency_key"))
        stored = self.get_feedback(key)
        assert stored is not None
        return stored, stored["created"] == row["created"]  # False: a concurrent retry won

    # --- reads ----------------------------------------------------------------------------------

    def get_generation(self, generation_id: str) -> dict[str, Any] | None:
        """Return one generation as a dict (JSON columns decoded), or None."""
        with self.engine.connect() as conn:
            row = conn.execute(select(generations).where(generations.c.id == generation_id)).first()
        return None if row is None else _generation_dict(row._mapping)

    def get_feedback(self, idempotency_key: str) -> dict[str, Any] | None:
        """Return the feedback row written with `idempotency_key`, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(feedback).where(feedback.c.idempotency_key == idempotency_key)
            ).first()
        return None if row is None else _feedback_dict(row._mapping)

    def list_generations(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Return generations, newest first (all of them when limit is None)."""
        query = select(generations).order_by(generations.c.created.desc(), generations.c.id)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [_generation_dict(r._mapping) for r in conn.execute(query)]

    def list_feedback(self) -> list[dict[str, Any]]:
        """Return every feedback row in insertion order."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(feedback).order_by(feedback.c.id))
            return [_feedback_dict(r._mapping) for r in rows]

    def counts(self) -> dict[str, int]:
        """Return the number of generations and of feedback rows."""
        with self.engine.connect() as conn:
            n_gen = conn.execute(select(func.count()).select_from(generations)).scalar_one()
            n_fb = conn.execute(select(func.count()).select_from(feedback)).scalar_one()
        return {"generations": int(n_gen), "feedback": int(n_fb)}

    def counts_since(self, since: float) -> dict[str, Any]:
        """Return generations and feedback rows per kind created at or after unix time `since`."""
        with self.engine.connect() as conn:
            n_gen = conn.execute(
                select(func.count()).select_from(generations).where(generations.c.created >= since)
            ).scalar_one()
            by_kind = conn.execute(
                select(feedback.c.kind, func.count())
                .where(feedback.c.created >= since)
                .group_by(feedback.c.kind)
                .order_by(feedback.c.kind)
            ).all()
        return {"generations": int(n_gen), "feedback": {kind: int(n) for kind, n in by_kind}}

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()


def check_feedback(kind: str, value: Any, choice_index: int, n_choices: int) -> None:
    """Raise ValueError unless `value` fits `kind` and the choice index exists."""
    if kind not in FEEDBACK_KINDS:
        raise ValueError(f"kind must be one of {', '.join(FEEDBACK_KINDS)}")
    if not 0 <= choice_index < n_choices:
        raise ValueError(f"choice_index must be in 0..{n_choices - 1}")
    if kind == "thumbs" and value not in ("up", "down"):
        raise ValueError('thumbs value must be "up" or "down"')
    if kind == "rating" and (type(value) is not int or not 1 <= value <= 5):
        raise ValueError("rating value must be an integer from 1 to 5")
    if kind in ("edit", "comment") and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"{kind} value must be a non-empty string")
    if kind == "pairwise":
        if not isinstance(value, dict) or set(value) != {"chosen", "rejected"}:
            raise ValueError('pairwise value must be {"chosen": i, "rejected": j} (choice indexes)')
        chosen, rejected = value["chosen"], value["rejected"]
        for index in (chosen, rejected):
            if type(index) is not int or not 0 <= index < n_choices:
                raise ValueError(f"pairwise choice indexes must be in 0..{n_choices - 1}")
        if chosen == rejected:
            raise ValueError("pairwise chosen and rejected must differ")


def _generation_dict(row: Any) -> dict[str, Any]:
    out = dict(row)
    for key in ("params", "messages", "outputs", "finish_reasons"):
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out


def _feedback_dict(row: Any) -> dict[str, Any]:
    out = dict(row)
    out["value"] = json.loads(out["value"])
    return out
