"""The settings of `fmforge data curate`, importable without numpy (the CLI builds its parser
from this dataclass; the YAML config holds the same keys)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fmforge.errors import ConfigError


@dataclass
class CurateConfig:
    """Everything `fmforge data curate` reads; the YAML config holds the same keys."""

    profile: str = "en"  # en, ko (Hangul rules, no English stop words) or code (source files)
    executor: str = "local"  # local (worker processes) or ray (Ray Data)
    workers: int = 1  # processes (local) or concurrent tasks (ray)
    shard_docs: int = 2000  # documents per shard: the unit of parallelism and of --resume
    tokenizer: str | None = None  # a tokenizer or model dir to count tokens; None: pre-tokens
    filters: dict[str, float] = field(default_factory=dict)  # threshold overrides by filter code
    disable: list[str] = field(default_factory=list)  # filter codes to switch off
    pii: bool = True  # replace personal data with typed placeholders
    pii_public_ip_only: bool = True  # private/loopback addresses are not personal
    pii_max_spans: int = 20  # a document with more spans is removed (reason pii)
    langid: bool = True  # remove documents not in the profile's language (not for code)
    dedup: bool = True  # exact and near-duplicate removal
    dedup_jaccard: float = 0.8  # word 5-gram Jaccard that counts as a near-duplicate
    dedup_recall: float = 0.98  # LSH recall wanted at dedup_jaccard; picks bands x rows
    dedup_bands: int | None = None  # set both bands and rows to override the choice
    dedup_rows: int | None = None
    dedup_verify: float | None = None  # estimated Jaccard a candidate needs; None: 2 SE below
    decontam_builtin: bool = True  # check against the shipped tasks' validation/test items
    decontam_files: list[str] = field(default_factory=list)  # extra eval sets (.jsonl or .txt)
    cost_preset: str = "small"  # model preset for the training FLOPs of the kept tokens
    cost_gpu: str = "h100-sxm"  # catalog GPU for the GPU-hours of one pass over the kept tokens
    ray_address: str | None = None  # an existing Ray cluster; None starts a local one
    seed: int = 1  # MinHash permutations
    plots: bool = True  # write signals.png, clusters.png and lsh.png

    def check(self) -> None:
        """Raise ConfigError naming the key of any invalid value."""
        from fmforge.data import curate as quality

        quality.profile_filters(self.profile, self.filters, self.disable)
        if self.executor not in ("local", "ray"):
            raise ConfigError(f"executor={self.executor!r} is not one of ['local', 'ray']")
        for name in ("workers", "shard_docs", "pii_max_spans"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dedup_jaccard", "dedup_recall", "dedup_verify"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if (self.dedup_bands is None) != (self.dedup_rows is None):
            raise ConfigError("set both dedup_bands and dedup_rows, or neither")

    def lsh(self) -> tuple[int, int]:
        """Return (bands, rows) for MinHash-LSH."""
        from fmforge.data.dedup import choose_bands

        if self.dedup_bands is not None and self.dedup_rows is not None:
            return self.dedup_bands, self.dedup_rows
        return choose_bands(self.dedup_jaccard, self.dedup_recall)

    def verify(self) -> float:
        """Return the estimated Jaccard a candidate pair needs to count as a near-duplicate."""
        from fmforge.data.dedup import verify_threshold

        if self.dedup_verify is not None:
            return self.dedup_verify
        bands, rows = self.lsh()
        return verify_threshold(self.dedup_jaccard, bands * rows)
