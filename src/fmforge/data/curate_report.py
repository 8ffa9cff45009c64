"""The curation report: accounting, per-stage removals, signal histograms, LSH S-curve, data cost.

Reads what the runner wrote (`work/stages/*.parquet`, `kept/`, `removed/`) and writes
`report.json`, `report.md` and `signals.png`, `clusters.png`, `lsh.png`. Documents, bytes and
tokens are counted on the text as written out (normalised and scrubbed), so
in = kept + Σ removed holds exactly and re-curating curated output reports the same figures.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from fmforge.artifacts import write_json_atomic
from fmforge.data import curate as quality
from fmforge.data.dedup import lsh_recall


def _zero() -> dict[str, int]:
    return {"documents": 0, "bytes": 0, "tokens": 0}


def _add(total: dict[str, int], nbytes: int, tokens: int) -> None:
    total["documents"] += 1
    total["bytes"] += nbytes
    total["tokens"] += tokens


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.parquet")) if path.is_dir() else 0


def _training_cost(tokens: int, preset: str, gpu: str) -> dict[str, Any]:
    from fmforge.cost.calculator import estimate_cost, total_training_flops
    from fmforge.model.config import preset_config

    if tokens <= 0:
        return {"preset": preset, "flops": 0.0, "how": "no kept tokens", "gpu": gpu}
    flops, how = total_training_flops(tokens=float(tokens), config=preset_config(preset))
    cost = estimate_cost(flops, gpu=gpu, flops_note=how)
    return {
        "preset": preset,
        "flops": flops,
        "how": how,
        "gpu": gpu,
        "gpu_hours": cost["gpu_hours"],
        "cost_usd": cost["cost_usd"],
        "rate": cost["assumptions"]["rate"],
    }


def write_report(
    out: Path,
    work: Path,
    shards: int,
    cfg: Any,
    dedup_result: dict[str, Any],
    ingest: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Write report.json, report.md and the PNGs under `out`; return the report dict."""
    totals = {"in": _zero(), "kept": _zero()}
    removed: dict[str, dict[str, int]] = {}
    by_stage: dict[str, dict[str, int]] = {}
    alone: Counter = Counter()
    signal_values: dict[str, list[np.ndarray]] = {}
    dedup_ids = set(dedup_result["exact"]) | set(dedup_result["near"])
    for index in range(shards):
        name = f"shard-{index:05d}"
        table = pq.read_table(
            work / "stages" / f"{name}.parquet",
            columns=["id", "bytes", "tokens", "stage", "detail", "all_reasons"],
        )
        cols = [table.column(c).to_pylist() for c in table.column_names]
        for doc, nbytes, tokens, stage, detail, reasons in zip(*cols):
            _add(totals["in"], nbytes, tokens)
            if not stage and doc in dedup_ids:
                exact = doc in dedup_result["exact"]
                stage, reason = "dedup", "dedup_exact" if exact else "dedup_near"
            elif stage:
                reason = detail.split(":", 1)[0]
            else:
                _add(totals["kept"], nbytes, tokens)
                continue
            _add(removed.setdefault(reason, _zero()), nbytes, tokens)
            _add(by_stage.setdefault(stage, _zero()), nbytes, tokens)
            alone.update(r for r in reasons.split(",") if r)
        signals = pq.read_table(work / "stages" / f"{name}.signals.parquet")
        for column in signals.column_names:
            signal_values.setdefault(column, []).append(signals.column(column).to_numpy())
    clusters = Counter(
        [kept for kept in dedup_result["exact"].values()]
        + [kept for kept, _ in dedup_result["near"].values()]
    )
    cluster_sizes = Counter(size + 1 for size in clusters.values())
    kept_tokens = totals["kept"]["tokens"]
    kept_bytes = totals["kept"]["bytes"]
    filters = quality.profile_filters(cfg.profile, cfg.filters, cfg.disable)
    report = {
        "in": totals["in"],
        "kept": totals["kept"],
        "removed": {k: removed[k] for k in sorted(removed)},
        "removed_by_stage": {k: by_stage[k] for k in sorted(by_stage)},
        "would_remove_alone": dict(sorted(alone.items())),
        "profile": cfg.profile,
        "filters": [
            {"code": f.code, "keep": f.keep, "threshold": f.threshold, "source": f.source}
            for f in filters
        ],
        "dedup": {
            "bands": dedup_result.get("bands"),
            "rows": dedup_result.get("rows"),
            "jaccard": cfg.dedup_jaccard,
            "verify": dedup_result.get("verify"),
            "formula_recall_at_jaccard": (
                lsh_recall(cfg.dedup_jaccard, dedup_result["bands"], dedup_result["rows"])
                if dedup_result.get("bands")
                else None
            ),
            "exact_removed": len(dedup_result["exact"]),
            "near_removed": len(dedup_result["near"]),
            "candidate_pairs": len(dedup_result.get("candidates", [])),
            "verified_pairs": sum(1 for c in dedup_result.get("candidates", []) if c[3]),
            "cluster_sizes": {str(k): v for k, v in sorted(cluster_sizes.items())},
        },
        "cost": {
            "kept_utf8_bytes": kept_bytes,
            "kept_tokens": kept_tokens,
            "bytes_per_token": kept_bytes / kept_tokens if kept_tokens else None,
            "kept_disk_bytes": _disk_bytes(out / "kept"),
            "token_counter": cfg.tokenizer or "pre-tokens (GPT-2 split regex; no --tokenizer)",
            "training": _training_cost(kept_tokens, cfg.cost_preset, cfg.cost_gpu),
        },
        "ingest": {"shards": shards, "skipped": ingest["skipped"]["skipped"]},
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cfg.plots:
        _plots(out, signal_values, filters, cluster_sizes, dedup_result)
    write_json_atomic(out / "report.json", report)
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    return report


def _plots(out: Path, signal_values, filters, cluster_sizes, dedup_result) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [f for f in filters if f.signal in signal_values]
    seen: set[str] = set()
    shown = [f for f in shown if not (f.signal in seen or seen.add(f.signal))]
    cols = 4
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, f in zip(axes.flat, shown):
        values = np.concatenate(signal_values[f.signal])
        values = values[np.isfinite(values)]
        if len(values):
            ax.hist(values, bins=40, color="#4c72b0")
        ax.axvline(f.threshold, color="#c44e52", linestyle="--")
        ax.set_title(f"{f.signal} ({f.keep} {f.threshold:g})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.locator_params(nbins=4)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.05, top=0.95, hspace=0.6, wspace=0.3)
    fig.savefig(out / "signals.png", dpi=80, metadata={"Software": None})
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    if cluster_sizes:
        sizes = sorted(cluster_sizes)
        ax.bar([str(s) for s in sizes], [cluster_sizes[s] for s in sizes], color="#55a868")
    ax.set_xlabel("duplicate cluster size (documents)")
    ax.set_ylabel("clusters")
    ax.tick_params(axis="x", labelsize=6, rotation=90)
    fig.tight_layout()
    fig.savefig(out / "clusters.png", dpi=80, metadata={"Software": None})
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    bands, rows = dedup_result.get("bands"), dedup_result.get("rows")
    if bands:
        grid = np.linspace(0, 1, 101)
        ax.plot(grid, [lsh_recall(s, bands, rows) for s in grid], label=f"1-(1-s^{rows})^{bands}")
        sample = dedup_result.get("lsh_sample") or []
        if sample:
            sims = np.array([s for s, _ in sample])
            hit = np.array([c for _, c in sample], dtype=float)
            edges = np.linspace(0, 1, 21)
            centres, rates = [], []
            for lo, hi in zip(edges[:-1], edges[1:]):
                mask = (sims >= lo) & (sims < hi if hi < 1 else sims <= hi)
                if mask.sum() >= 5:
                    centres.append((lo + hi) / 2)
                    rates.append(hit[mask].mean())
            ax.plot(centres, rates, "o", label="observed candidate rate")
        ax.axvline(dedup_result.get("jaccard", 0.8), color="grey", linestyle=":")
        ax.legend(fontsize=7)
    ax.set_xlabel("Jaccard (signature estimate)")
    ax.set_ylabel("P(candidate)")
    fig.tight_layout()
    fig.savefig(out / "lsh.png", dpi=80, metadata={"Software": None})
    plt.close(fig)


def _row(name: str, c: dict[str, int], total: dict[str, int]) -> str:
    share = c["documents"] / total["documents"] if total["documents"] else 0.0
    return f"| {name} | {c['documents']:,} | {share:.1%} | {c['bytes']:,} | {c['tokens']:,} |"


def _markdown(r: dict[str, Any]) -> str:
    total = r["in"]
    lines = [
        "# Curation report",
        "",
        f"Profile `{r['profile']}`, {r['ingest']['shards']} shards, {r['seconds']:.1f} s.",
        "",
        "| | documents | share | bytes | tokens |",
        "|---|---:|---:|---:|---:|",
        _row("in", total, total),
        _row("kept", r["kept"], total),
    ]
    lines += [_row(f"removed: {k}", v, total) for k, v in r["removed"].items()]
    lines += ["", "## Removed by stage (first reason)", "", "| stage | documents |", "|---|---:|"]
    lines += [f"| {k} | {v['documents']:,} |" for k, v in r["removed_by_stage"].items()]
    lines += ["", "## What each check would remove alone", "", "| check | documents |"]
    lines += ["|---|---:|"] + [f"| {k} | {v:,} |" for k, v in r["would_remove_alone"].items()]
    d = r["dedup"]
    if d["bands"]:
        dedup_line = (
            f"MinHash-LSH with {d['bands']} bands x {d['rows']} rows: formula recall "
            f"{d['formula_recall_at_jaccard']:.1%} at Jaccard {d['jaccard']}; candidates verified "
            f"at estimated Jaccard >= {d['verify']:.3f}. Candidate pairs "
            f"{d['candidate_pairs']:,}, verified {d['verified_pairs']:,}; removed "
            f"{d['exact_removed']:,} exact and {d['near_removed']:,} near duplicates."
        )
    else:
        dedup_line = "Deduplication was switched off (dedup: false)."
    lines += [
        "",
        "## Deduplication",
        "",
        dedup_line,
        "",
        "![clusters](clusters.png) ![lsh](lsh.png)",
        "",
        "## Filter signals",
        "",
        "![signals](signals.png)",
        "",
        "| filter | keeps when | threshold | source |",
        "|---|---|---:|---|",
    ]
    lines += [
        f"| {f['code']} | {'>=' if f['keep'] == 'min' else '<='} | {f['threshold']:g} | "
        f"{f['source']} |"
        for f in r["filters"]
    ]
    c = r["cost"]
    bpt = f"{c['bytes_per_token']:.2f}" if c["bytes_per_token"] else "n/a"
    lines += [
        "",
        "## Data cost",
        "",
        f"- kept: {c['kept_utf8_bytes']:,} UTF-8 bytes, {c['kept_tokens']:,} tokens "
        f"({c['token_counter']}), {bpt} bytes/token, {c['kept_disk_bytes']:,} bytes on disk",
        f"- training once over the kept tokens, preset `{c['training']['preset']}`: "
        f"{c['training']['flops']:.3g} FLOPs ({c['training']['how']})",
        f"- on one {c['training']['gpu']}: {c['training'].get('gpu_hours', 0):.3g} GPU-hours, "
        f"${c['training'].get('cost_usd') or 0:.3g} ({c['training'].get('rate', 'n/a')}; "
        "`fmforge cost` for other hardware)",
        "",
    ]
    return "\n".join(lines)
