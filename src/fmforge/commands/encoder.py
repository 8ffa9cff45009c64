"""Encoder commands: fmforge fill, embed, search index|query, experiment cloze."""

from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace

from fmforge.commands import GROUPS, command, new_parser, print_json

GROUPS["search"] = "Semantic search over documents with an encoder."


def _fill_parser() -> ArgumentParser:
    p = new_parser("Fill in the blank: a masked-LM encoder's most likely words for each [MASK].")
    p.add_argument("model", help="a masked-LM model dir (fmforge pretrain --objective mlm)")
    p.add_argument("text", help='text with the mask token, e.g. "I heard [MASK] from the teacher."')
    p.add_argument("--top-k", type=int, default=5, help="fillers to show per mask")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _embed_parser() -> ArgumentParser:
    p = new_parser("Embed texts (one per line, or jsonl with a text field) with an encoder.")
    p.add_argument("model", help="an encoder model dir or a built-in name (minilm-l6)")
    p.add_argument("--input", required=True, help=".txt (one text per line) or .jsonl file")
    p.add_argument("--out", required=True, help=".npy (N, dim) float32, or .parquet")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def _search_index_parser() -> ArgumentParser:
    p = new_parser("Chunk and embed documents into a search index dir.")
    p.add_argument("model", help="an encoder model dir or a built-in name (minilm-l6)")
    p.add_argument("docs", nargs="+", help="files or directories (txt md jsonl parquet csv)")
    p.add_argument("--out", required=True, help="index directory")
    p.add_argument("--ann", action="store_true", help="also build a faiss HNSW index")
    p.add_argument("--overlap", type=int, default=32, help="tokens shared by adjacent chunks")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _search_query_parser() -> ArgumentParser:
    p = new_parser("Return the chunks of an index nearest to a query.")
    p.add_argument("index", help="an index dir from `fmforge search index`")
    p.add_argument("text", help="the query")
    p.add_argument("-k", type=int, default=10, help="results to return")
    p.add_argument("--ann", action="store_true", help="use the HNSW index instead of exact search")
    p.add_argument("--model", default=None, help="default: the model named in the manifest")
    p.add_argument("--json", action="store_true", help="print JSON instead of lines")
    return p


def _experiment_cloze_parser() -> ArgumentParser:
    p = new_parser("A masked LM vs its random-init twin vs unigram guesses on a frozen cloze set.")
    p.add_argument("model", help="a masked-LM model dir (fmforge pretrain --objective mlm)")
    p.add_argument("--shards", required=True, help="the token shards it trained on (val: held out)")
    p.add_argument("--out", default=None, help="write results.json and the set (cloze.jsonl)")
    p.add_argument("-n", type=int, default=300, help="blanks in the set")
    return p


@command("fill", _fill_parser)
def _fill(args: Namespace) -> None:
    from fmforge.api import load_encoder

    results = load_encoder(args.model).fill(args.text, top_k=args.top_k)
    if args.json:
        print_json(results)
        return
    for number, fillers in enumerate(results, 1):
        if len(results) > 1:
            print(f"mask {number}:")
        for filler in fillers:
            print(f"{filler['score']:.4f}  {filler['token']}")


@command("embed", _embed_parser)
def _embed(args: Namespace) -> None:
    from fmforge.api import load_encoder
    from fmforge.generate.embed import embed_file

    loaded = load_encoder(args.model)
    print_json(embed_file(loaded, args.input, args.out, args.batch_size, args.overwrite))


@command("search index", _search_index_parser)
def _search_index(args: Namespace) -> None:
    from fmforge.api import load_encoder
    from fmforge.search.index import build_index

    loaded = load_encoder(args.model)
    summary = build_index(
        loaded,
        list(args.docs),
        args.out,
        ann=args.ann,
        overlap=args.overlap,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    print_json(summary)


@command("search query", _search_query_parser)
def _search_query(args: Namespace) -> None:
    from fmforge.search.index import query_index

    hits = query_index(args.index, args.text, k=args.k, model=args.model, ann=args.ann)
    if args.json:
        print_json(hits)
        return
    for hit in hits:
        snippet = " ".join(hit["text"].split())[:160]
        print(f"{hit['rank']:>3}  {hit['score']:.4f}  {hit['source']}  {snippet}")


@command("experiment cloze", _experiment_cloze_parser)
def _experiment_cloze(args: Namespace) -> None:
    from fmforge.experiments.cloze import cloze_experiment

    print_json(cloze_experiment(args.model, args.shards, n=args.n, out=args.out))
