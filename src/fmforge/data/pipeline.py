"""The curation runner: the one place that knows about shards, processes and Ray.

`curate(inputs, out, cfg)` runs four phases, each resumable:

1. ingest (one process): read the inputs in order into input shards of `shard_docs` documents
   (`work/input/shard-NNNNN.parquet`), each document with a stable id: the xxh3-64 of its source
   (`path:line`, `path:row N`, `stdlib:json/decoder.py`), never of processing order. A previous
   curate's `kept/` is read with its own ids, one shard per file, so curating curated output
   reproduces it byte for byte.
2. per shard, in worker processes or Ray tasks: normalise, scrub PII, language id, quality
   filters, decontamination; survivors get an exact hash and a MinHash signature.
3. dedup (one process): exact, then near-duplicates over all survivors (`data/dedup.py`).
4. per shard: `kept/shard-NNNNN.parquet` and `removed/<reason>/shard-NNNNN.parquet`.

Every file is written to a temp name and renamed; a shard is done when its `.done` marker (written
last) exists, so `--resume` after kill -9 redoes only the unfinished shards. The stage functions
are pure functions of one shard, so `--workers N` and `--executor ray` give the same bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from fmforge.artifacts import write_json_atomic
from fmforge.data import curate as quality
from fmforge.data import dedup, pii
from fmforge.data.curate_config import CurateConfig
from fmforge.errors import DataError, UserError

KEPT_COLUMNS = ("id", "text", "source", "bytes", "tokens")
_RUN_ONLY = ("workers", "executor", "ray_address")  # settings that never change the outputs
REMOVED_COLUMNS = (*KEPT_COLUMNS, "stage", "detail")
_PRETOKEN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\w+| ?[^\s\w]+|\s+""")


# --- ingest --------------------------------------------------------------------------------------


def doc_id(source: str) -> str:
    """Return the stable id of the document read from `source` (`name:line`, `dir/file`)."""
    return xxhash.xxh3_64_hexdigest(source.encode("utf-8"))


def _curated_files(item: str) -> list[Path] | None:
    """Return the parquet files of a previous curate's output with ids, else None."""
    path = Path(item)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".parquet" for f in files):
        return None
    try:
        return files if all("id" in pq.read_schema(f).names for f in files) else None
    except (pa.ArrowException, OSError):
        return None


def _write_table(rows: dict[str, list], path: Path, columns: tuple[str, ...]) -> None:
    types = {"bytes": pa.int64(), "tokens": pa.int64()}
    schema = pa.schema([(c, types.get(c, pa.string())) for c in columns])
    _write_arrow(pa.table({c: rows[c] for c in columns}, schema=schema), path)


def _ingest(inputs: list[str], work: Path, shard_docs: int, max_skip: float) -> dict[str, Any]:
    from fmforge.data.sources import SkipLog, iter_documents

    input_dir = work / "input"
    input_dir.mkdir(parents=True, exist_ok=True)
    skips = SkipLog()
    seen: set[str] = set()
    shards = 0
    buffer: dict[str, list] = {"id": [], "source": [], "text": []}

    def flush(force: bool = False) -> None:
        nonlocal shards, buffer
        if buffer["id"] or force:
            _write_table(
                buffer, input_dir / f"shard-{shards:05d}.parquet", ("id", "source", "text")
            )
            shards += 1
            buffer = {"id": [], "source": [], "text": []}

    def add(identifier: str, source: str, text: str) -> None:
        if identifier in seen:
            raise UserError(f"{source}: the same document is read twice; name each input once")
        seen.add(identifier)
        buffer["id"].append(identifier)
        buffer["source"].append(source)
        buffer["text"].append(text)

    for item in inputs:
        curated = _curated_files(item)
        try:
            if curated is not None:
                for file in curated:
                    flush()
                    table = pq.read_table(file)
                    names = table.column_names
                    sources = table.column("source").to_pylist() if "source" in names else None
                    for i, (identifier, text) in enumerate(
                        zip(table.column("id").to_pylist(), table.column("text").to_pylist())
                    ):
                        add(str(identifier), sources[i] if sources else str(identifier), text)
                        skips.ok()
                    flush(force=True)
                continue
            prefix = item.rstrip("/")
            name = Path(prefix).name if Path(item).exists() else prefix
            for document in iter_documents([item], skips):
                # Ids name the input by its base name, so they survive moving the data.
                stable = document.source
                if stable.startswith(prefix):
                    stable = name + stable[len(prefix) :]
                add(doc_id(stable), document.source, document.text)
                if len(buffer["id"]) >= shard_docs:
                    flush()
            flush()
        except OSError as e:
            raise DataError(
                f"{item}: cannot read {e.filename or item} ({e.strerror}); check the path and "
                "its permissions"
            ) from None
        except DataError as e:
            if "no usable documents" not in str(e):
                raise
            raise DataError(f"{e}; fix or remove the file, or leave it out of INPUT") from None
        except pa.ArrowException as e:
            raise DataError(f"{item}: broken parquet ({e}); rewrite or remove the file") from None
    skips.check(max_skip)
    meta = {"shards": shards, "documents": len(seen), "skipped": skips.to_dict()}
    write_json_atomic(input_dir / "done.json", meta)
    return meta


# --- phase 2: per-shard stages -------------------------------------------------------------------


@lru_cache(maxsize=2)
def _token_counter(tokenizer: str | None) -> Any:
    if tokenizer is None:
        return lambda texts: [len(_PRETOKEN.findall(t)) for t in texts]
    from fmforge.tokenizer import Tokenizer

    loaded = Tokenizer.load(tokenizer)
    return lambda texts: [len(ids) for ids in loaded.encode_batch(texts)]


@lru_cache(maxsize=2)
def _contamination(builtin: bool, files: tuple[str, ...]) -> Any:
    from fmforge.data.decontam import ContaminationIndex, builtin_items, file_items

    items = builtin_items() if builtin else []
    for file in files:
        items += file_items(file)
    return ContaminationIndex(items)


def process_documents(
    ids: list[str], texts: list[str], cfg: CurateConfig
) -> tuple[list[str], list[list[tuple[str, str, str]]], list[dict[str, float]]]:
    """Return (processed texts, every (reason, stage, detail) that fired, signals) per document.

    The first entry of a document's list is the reason it is removed; an empty list keeps it.
    """
    from fmforge.data.langid import PROFILE_LANGUAGE, identify

    filters = quality.profile_filters(cfg.profile, cfg.filters, cfg.disable)
    language = PROFILE_LANGUAGE[cfg.profile] if cfg.langid else None
    index = (
        _contamination(cfg.decontam_builtin, tuple(cfg.decontam_files))
        if cfg.decontam_builtin or cfg.decontam_files
        else None
    )
    out_texts, fired_all, measured_all = [], [], []
    for text in texts:
        text = quality.normalise(text)
        fired: list[tuple[str, str, str]] = []
        if cfg.pii:
            text, counts = pii.scrub(text, cfg.pii_public_ip_only)
            spans = sum(counts.values())
            if spans > cfg.pii_max_spans:
                kinds = ", ".join(f"{k.strip('<>')} {v}" for k, v in sorted(counts.items()))
                fired.append(("pii", "pii", f"{spans} spans > {cfg.pii_max_spans} ({kinds})"))
        if language is not None:
            found, probability = identify(text)
            if found != language:
                fired.append(("langid", "langid", f"{found} p={probability:.3f} != {language}"))
        measured = quality.signals(text, cfg.profile)
        fired += [(code, "filter", detail) for code, detail in quality.verdict(measured, filters)]
        if index is not None:
            item = index.match(text)
            if item is not None:
                fired.append(("decontam", "decontam", f"overlaps {item}"))
        out_texts.append(text)
        fired_all.append(fired)
        measured_all.append(measured)
    return out_texts, fired_all, measured_all


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def run_shard_stages(work: str, index: int, cfg_dict: dict[str, Any]) -> int:
    """Run phase 2 on one input shard; write its survivors, removals and signals; return index."""
    cfg = CurateConfig(**cfg_dict)
    root = Path(work)
    name = _shard_name(index)
    stage_dir = root / "stages"
    if (stage_dir / f"{name}.done").exists():
        return index
    table = pq.read_table(root / "input" / f"{name}.parquet")
    ids = table.column("id").to_pylist()
    sources = table.column("source").to_pylist()
    texts, fired, measured = process_documents(ids, table.column("text").to_pylist(), cfg)
    tokens = _token_counter(cfg.tokenizer)(texts)
    nbytes = [len(t.encode("utf-8")) for t in texts]
    bands, rows = cfg.lsh()
    hasher = dedup.MinHasher(bands * rows, cfg.seed)
    rows_out: dict[str, list] = {k: [] for k in (*REMOVED_COLUMNS, "exact", "signature")}
    for i, doc in enumerate(ids):
        keep = not fired[i]
        rows_out["id"].append(doc)
        rows_out["text"].append(texts[i])
        rows_out["source"].append(sources[i])
        rows_out["bytes"].append(nbytes[i])
        rows_out["tokens"].append(tokens[i])
        rows_out["stage"].append("" if keep else fired[i][0][1])
        rows_out["detail"].append("" if keep else f"{fired[i][0][0]}: {fired[i][0][2]}")
        do_hash = keep and cfg.dedup
        rows_out["exact"].append(dedup.exact_hash(texts[i]) if do_hash else "")
        rows_out["signature"].append(hasher.signature(texts[i]).tobytes() if do_hash else b"")
    stage_dir.mkdir(exist_ok=True)
    schema = pa.schema(
        [(c, pa.int64() if c in ("bytes", "tokens") else pa.string()) for c in REMOVED_COLUMNS]
        + [("exact", pa.string()), ("signature", pa.binary()), ("all_reasons", pa.string())]
    )
    rows_out["all_reasons"] = [",".join(code for code, _, _ in f) for f in fired]
    _write_arrow(pa.table(rows_out, schema=schema), stage_dir / f"{name}.parquet")
    signal_names = sorted({k for m in measured for k in m})
    signal_table = pa.table(
        {
            k: pa.array([m.get(k, float("nan")) for m in measured], pa.float64())
            for k in signal_names
        }
    )
    _write_arrow(signal_table, stage_dir / f"{name}.signals.parquet")
    (stage_dir / f"{name}.done").write_text("ok\n")
    return index


def _write_arrow(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` through a temp file + fsync + rename: complete or absent."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- phase 3: dedup over all shards --------------------------------------------------------------


def _dedup_all(work: Path, shards: int, cfg: CurateConfig) -> dict[str, Any]:
    path = work / "dedup.json"
    if path.exists():
        return json.loads(path.read_text())
    bands, rows = cfg.lsh()
    ids: list[str] = []
    exact: list[str] = []
    signatures: list[bytes] = []
    for index in range(shards):
        table = pq.read_table(
            work / "stages" / f"{_shard_name(index)}.parquet",
            columns=["id", "stage", "exact", "signature"],
        )
        for doc, stage, h, sig in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            if not stage and h:
                ids.append(doc)
                exact.append(h)
                signatures.append(sig)
    exact_removed = dedup.exact_duplicates(ids, exact)
    remaining = [i for i, doc in enumerate(ids) if doc not in exact_removed]
    matrix = np.frombuffer(b"".join(signatures[i] for i in remaining), dtype=np.uint32)
    matrix = matrix.reshape(len(remaining), bands * rows)
    near_removed, candidates = dedup.near_duplicates(
        [ids[i] for i in remaining], matrix, bands, rows, cfg.verify()
    )
    result = {
        "bands": bands,
        "rows": rows,
        "verify": cfg.verify(),
        "exact": {doc: kept for doc, kept in sorted(exact_removed.items())},
        "near": {doc: [kept, sim] for doc, (kept, sim) in sorted(near_removed.items())},
        "candidates": [list(c) for c in candidates],
        "lsh_sample": _lsh_sample([ids[i] for i in remaining], matrix, bands, rows),
    }
    write_json_atomic(path, result)
    return result


def _lsh_sample(ids: list[str], matrix: np.ndarray, bands: int, rows: int, cap: int = 5000):
    """Return [estimated Jaccard, candidate?] for pairs found by a loose LSH (3 rows per band).

    The loose pass finds most pairs above Jaccard ~0.4, so the share of them that the real
    bands x rows made candidates traces the observed S-curve. It looks at the `cap` documents
    with the smallest ids, so its cost stays bounded.
    """
    if len(ids) < 2:
        return []
    chosen = sorted(range(len(ids)), key=ids.__getitem__)[:cap]
    sub = matrix[chosen]
    rank = np.arange(len(chosen))
    real = dedup.band_keys(sub, bands, rows)
    loose = dedup.bucket_pairs(dedup.band_keys(sub, matrix.shape[1] // 3, 3), rank)
    sample = []
    for a, b in sorted(loose)[: 4 * cap]:
        sim = dedup.estimated_jaccard(sub[a], sub[b])
        sample.append([sim, bool(np.any(real[a] == real[b]))])
    return sample


# --- phase 4: outputs ----------------------------------------------------------------------------


def write_shard_outputs(work: str, out: str, index: int, removed_by_dedup: dict[str, list]) -> int:
    """Write kept/ and removed/<reason>/ files of one shard; return index."""
    root, out_dir = Path(work), Path(out)
    name = _shard_name(index)
    marker = root / "outputs" / f"{name}.done"
    if marker.exists():
        return index
    table = pq.read_table(root / "stages" / f"{name}.parquet")
    cols = {c: table.column(c).to_pylist() for c in REMOVED_COLUMNS}
    kept: dict[str, list] = {c: [] for c in KEPT_COLUMNS}
    removed: dict[str, dict[str, list]] = {}
    for i, doc in enumerate(cols["id"]):
        stage, detail = cols["stage"][i], cols["detail"][i]
        if not stage and doc in removed_by_dedup:
            stage, detail = "dedup", removed_by_dedup[doc]
        if not stage:
            for c in KEPT_COLUMNS:
                kept[c].append(cols[c][i])
            continue
        reason = detail.split(":", 1)[0]
        bucket = removed.setdefault(reason, {c: [] for c in REMOVED_COLUMNS})
        for c in KEPT_COLUMNS:
            bucket[c].append(cols[c][i])
        bucket["stage"].append(stage)
        bucket["detail"].append(detail.split(": ", 1)[1])
    (out_dir / "kept").mkdir(parents=True, exist_ok=True)
    _write_table(kept, out_dir / "kept" / f"{name}.parquet", KEPT_COLUMNS)
    for reason, rows in sorted(removed.items()):
        (out_dir / "removed" / reason).mkdir(parents=True, exist_ok=True)
        _write_table(rows, out_dir / "removed" / reason / f"{name}.parquet", REMOVED_COLUMNS)
    marker.parent.mkdir(exist_ok=True)
    marker.write_text("ok\n")
    return index


def _dedup_details(result: dict[str, Any]) -> dict[str, str]:
    details = {doc: f"dedup_exact: duplicate of {kept}" for doc, kept in result["exact"].items()}
    for doc, (kept, sim) in result["near"].items():
        details[doc] = f"dedup_near: near-duplicate of {kept} (estimated Jaccard {sim:.3f})"
    return details


# --- executors -----------------------------------------------------------------------------------


def _run_local(fn, args_list: list[tuple], workers: int) -> None:
    if workers == 1 or len(args_list) <= 1:
        for args in args_list:
            fn(*args)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(fn, *zip(*args_list)):
            pass


def _run_ray(fn, args_list: list[tuple], workers: int, address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'fmforge[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else workers,
                 include_dashboard=False, log_to_driver=False)  # fmt: skip
    items = [{"args": json.dumps(list(args))} for args in args_list]

    def task(row: dict[str, Any]) -> dict[str, Any]:
        return {"done": fn(*json.loads(row["args"]))}

    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    dataset.map(task, concurrency=workers, num_cpus=1).materialize()


def _execute(fn, args_list: list[tuple], cfg: CurateConfig) -> None:
    if cfg.executor == "ray":
        _run_ray(fn, args_list, cfg.workers, cfg.ray_address)
    else:
        _run_local(fn, args_list, cfg.workers)


def check_ray() -> None:
    """Raise UserError naming the install command when Ray is not installed."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UserError("--executor ray needs Ray: pip install 'fmforge[ray]'")


# --- the run -------------------------------------------------------------------------------------


def curate(
    inputs: list[str],
    out: str | Path,
    cfg: CurateConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    max_skip_fraction: float = 0.05,
) -> dict[str, Any]:
    """Curate `inputs` into `out` (kept/, removed/<reason>/, report.*); return the report."""
    from fmforge.artifacts import check_output_dir
    from fmforge.data.curate_report import write_report

    cfg = cfg or CurateConfig()
    cfg.check()
    if cfg.executor == "ray":
        check_ray()
    out = Path(out)
    work = out / "work"
    if resume and (out / "report.json").exists() and not work.exists():
        return json.loads((out / "report.json").read_text())  # already complete
    if resume and (work / "config.json").exists():
        saved = json.loads((work / "config.json").read_text())
        # How the work is run may change between tries; what it computes may not.
        before = {k: v for k, v in saved["config"].items() if k not in _RUN_ONLY}
        now = {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY}
        if before != now or saved["inputs"] != list(inputs):
            raise UserError(f"--resume: {out} was started with other inputs or settings")
        fresh = False
    else:
        if resume and out.is_dir() and {p.name for p in out.iterdir()} <= {"work"}:
            shutil.rmtree(out)  # killed before it wrote anything worth keeping
        if overwrite and out.is_dir():
            shutil.rmtree(out)
        check_output_dir(out)
        fresh = True
    started = time.time()
    try:
        work.mkdir(parents=True, exist_ok=True)
        for tmp in out.rglob("*.tmp-*"):  # partial files of a killed run
            tmp.unlink()
        write_json_atomic(work / "config.json", {"config": asdict(cfg), "inputs": list(inputs)})
        meta_path = work / "input" / "done.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
        else:
            shutil.rmtree(work / "input", ignore_errors=True)
            meta = _ingest(list(inputs), work, cfg.shard_docs, max_skip_fraction)
        shards = meta["shards"]
        cfg_dict = asdict(cfg)
        _execute(run_shard_stages, [(str(work), i, cfg_dict) for i in range(shards)], cfg)
        result = _dedup_all(work, shards, cfg) if cfg.dedup else {"exact": {}, "near": {}}
        details = _dedup_details(result)
        per_shard: list[dict[str, str]] = [{} for _ in range(shards)]
        for index in range(shards):
            ids = pq.read_table(
                work / "stages" / f"{_shard_name(index)}.parquet", columns=["id"]
            ).column("id")
            per_shard[index] = {d: details[d] for d in ids.to_pylist() if d in details}
        _execute(
            write_shard_outputs,
            [(str(work), str(out), i, per_shard[i]) for i in range(shards)],
            cfg,
        )
        report = write_report(out, work, shards, cfg, result, meta, time.time() - started)
        shutil.rmtree(work)  # the intermediate shards; report.json marks the run complete
    except Exception:  # Ctrl-C and kill keep the partial run for --resume
        if fresh:
            shutil.rmtree(out, ignore_errors=True)  # bad input leaves nothing half-written
        raise
    return report
