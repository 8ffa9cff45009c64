"""Serving and flywheel commands: fmforge serve, fmforge feedback ls|export."""

from __future__ import annotations

from typing import Any

from jsonargparse import ArgumentParser, Namespace

from fmforge.commands import GROUPS, command, new_parser, print_json

# ---------------------------------------------------------------------------------------------
# Serving and the feedback flywheel (fmforge serve, fmforge feedback ls|export).
# ---------------------------------------------------------------------------------------------

GROUPS["feedback"] = "The feedback store: list generations and feedback, export SFT/DPO data."


def _serve_parser() -> ArgumentParser:
    p = new_parser(
        "Serve a model over the OpenAI API with a playground at / (127.0.0.1 by default)."
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a model dir or a built-in name (fmforge models); with --db, optional: the registry's",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", default=None, help="file holding the key clients must send")
    p.add_argument(
        "--db",
        default=None,
        help="store URL or SQLite path (default: per-user); given: serve its model registry",
    )
    p.add_argument("--no-store", action="store_true", help="record nothing")
    p.add_argument(
        "--no-registry", action="store_true", help="with --db: serve MODEL, not the registry's"
    )
    p.add_argument(
        "--poll-registry",
        type=float,
        default=2.0,
        help="seconds between checks of the registry's serving version (0: admin routes only)",
    )
    p.add_argument("--max-concurrency", type=int, default=4, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=16, help="waiting sequences before 429")
    p.add_argument("--metrics", action="store_true", help="expose Prometheus /metrics")
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    p.add_argument("--embeddings", default=None, help="an encoder to serve /v1/embeddings with")
    p.add_argument("--search-index", default=None, help="an index dir for /v1/search")
    return p


def _feedback_ls_parser() -> ArgumentParser:
    p = new_parser("List stored generations (newest first) with their feedback.")
    p.add_argument("--db", default=None, help="feedback store URL or SQLite path")
    p.add_argument("--limit", type=int, default=20, help="how many generations to show")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _feedback_export_parser() -> ArgumentParser:
    p = new_parser("Export feedback as training data: SFT examples or DPO pairs (JSON lines).")
    p.add_argument("--db", default=None, help="feedback store URL or SQLite path")
    p.add_argument("--format", required=True, help="sft or dpo")
    p.add_argument("--out", required=True, help="output .jsonl file")
    return p


@command("serve", _serve_parser)
def _serve(args: Namespace) -> None:
    from fmforge.serve.run import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key_file=args.api_key_file,
        db=args.db,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        metrics=args.metrics,
        no_store=args.no_store,
        log_level=args.log_level,
        embeddings=args.embeddings,
        search_index=args.search_index,
        no_registry=args.no_registry,
        poll_registry=args.poll_registry,
    )


@command("feedback ls", _feedback_ls_parser)
def _feedback_ls(args: Namespace) -> None:
    from fmforge.flywheel.store import FeedbackStore

    store = FeedbackStore(args.db)
    rows = store.list_generations(limit=args.limit)
    by_generation: dict[str, list[dict[str, Any]]] = {}
    for row in store.list_feedback():
        by_generation.setdefault(row["generation_id"], []).append(row)
    if args.json:
        for row in rows:
            row["feedback"] = by_generation.get(row["id"], [])
        print_json(rows)
        return
    counts = store.counts()
    print(f"{counts['generations']} generations, {counts['feedback']} feedback rows")
    for row in rows:
        kinds = ",".join(f["kind"] for f in by_generation.get(row["id"], [])) or "-"
        output = " ".join(row["outputs"][0].split())[:60] if row["outputs"] else ""
        print(f"{row['id']}  {row['endpoint']:<10} {kinds:<16} {output}")


@command("feedback export", _feedback_export_parser)
def _feedback_export(args: Namespace) -> None:
    from fmforge.flywheel.export import export
    from fmforge.flywheel.store import FeedbackStore

    count = export(FeedbackStore(args.db), args.format, args.out)
    print(f"wrote {count} {args.format} records to {args.out}")
