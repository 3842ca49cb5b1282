"""Reading a user's corpus: which files count as input, and the documents inside each.

Formats (by file name):
    .txt .text .md (optionally .gz / .xz)   plain UTF-8 text; one file = one document
    .jsonl .ndjson (optionally .gz / .xz)   one JSON object per line, the document in `text`
    .parquet                                 the `text` column (needs pyarrow: the [parquet] extra)
    .arrow                                   Arrow IPC files, e.g. a Hugging Face dataset saved to disk
Directories are walked recursively in sorted order, taking the files above and skipping hidden
ones. Every problem (missing path, bad UTF-8, a line without `text`, a truncated archive) raises
one DataError naming the file and where in it.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from deepseekmoe.errors import DataError

_KINDS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
          ".parquet": "parquet", ".arrow": "arrow"}
_COMPRESSION = {".gz": "gz", ".xz": "xz"}
SUPPORTED = ".txt .md .jsonl .ndjson (each also .gz/.xz), .parquet, .arrow"


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str                 # "text" | "jsonl" | "parquet" | "arrow"
    compression: str | None   # None | "gz" | "xz"

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass
class Document:
    text: str
    data: bytes               # the UTF-8 encoding of `text` (its byte count feeds bits-per-byte)
    where: str                # "file" or "file:line N", for messages


def classify(path: Path) -> Source | None:
    """The Source for a supported file name, else None."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = None
    if suffixes and suffixes[-1] in _COMPRESSION:
        comp = _COMPRESSION[suffixes[-1]]
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in _KINDS:
        return None
    kind = _KINDS[suffixes[-1]]
    if comp is not None and kind in ("parquet", "arrow"):
        return None
    return Source(path, kind, comp)


def discover(inputs) -> list[Source]:
    """Expand files and directories into Sources (sorted, deduplicated); DataError if unusable."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs or [])
    if not inputs:
        raise DataError("no input given: name text/jsonl/parquet files or directories")
    out: list[Source] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise DataError(f"{p}: no such file or directory")
        if p.is_dir():
            found, skipped = [], []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    src = classify(Path(root) / name)
                    (found if src else skipped).append(src or name)
            if not found:
                extra = f" (found only: {', '.join(skipped[:5])})" if skipped else " (it is empty)"
                raise DataError(f"{p}: no supported files in this directory{extra}; supported: {SUPPORTED}")
            srcs = found
        else:
            src = classify(p)
            if src is None:
                raise DataError(f"{p}: unsupported file type; supported: {SUPPORTED} "
                                "(rename plain text to .txt)")
            srcs = [src]
        for s in srcs:
            key = s.path.resolve()
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out


# ------------------------------------------------------------------------------------------ reading
def read_documents(src: Source, field: str = "text",
                   on_progress: Callable[[int], None] | None = None) -> Iterator[Document]:
    """Yield the non-empty documents of one source in order.

    `on_progress(n)` is called with the number of on-disk bytes consumed since the last call.
    """
    reader = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "arrow": _read_arrow}
    try:
        yield from reader[src.kind](src, field, on_progress or (lambda n: None))
    except (EOFError, lzma.LZMAError, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise DataError(f"{src.path}: cannot read ({e.strerror})") from e
        raise DataError(f"{src.path}: corrupted or truncated {src.compression or src.kind} file ({e})") from e


class _Raw:
    """The on-disk file under a decompressor, so progress can be counted in on-disk bytes."""

    def __init__(self, src: Source, on_progress):
        self.raw = open(src.path, "rb")  # noqa: SIM115 (closed in close())
        self.f = {"gz": lambda r: gzip.GzipFile(fileobj=r), "xz": lambda r: lzma.LZMAFile(r),
                  None: lambda r: r}[src.compression](self.raw)
        self.on_progress, self.pos = on_progress, 0

    def tick(self):
        now = self.raw.tell()
        if now != self.pos:
            self.on_progress(now - self.pos)
            self.pos = now

    def close(self):
        self.tick()
        if self.f is not self.raw:
            self.f.close()
        self.raw.close()


def _utf8_error(src: Source, e: UnicodeDecodeError, base: int, line: int | None) -> DataError:
    where = f"byte offset {base + e.start}"
    if src.compression:
        where += " of the decompressed data"
    if line is not None:
        where += f" (line {line})"
    return DataError(f"{src.path}: not valid UTF-8 at {where}: byte 0x{e.object[e.start]:02x} ({e.reason}); "
                     "convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")


def _document(src: Source, text: str, where: str) -> Document | None:
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:  # an unpaired surrogate escape (\ud800) decoded from JSON
        raise DataError(f"{where}: the text holds an unpaired surrogate (\\u{ord(text[e.start]):04x}) at "
                        f"character {e.start}, which is not valid Unicode text; fix the escape") from e
    return Document(text, data, where) if text.strip() else None


def _read_text(src: Source, field: str, on_progress) -> Iterator[Document]:
    r = _Raw(src, on_progress)
    try:
        data = r.f.read()
    finally:
        r.close()
    skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a byte-order mark is not text
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(src, e, skip, data.count(b"\n", 0, skip + e.start) + 1) from e
    if text.strip():
        yield Document(text, data[skip:], str(src.path))


def _read_jsonl(src: Source, field: str, on_progress) -> Iterator[Document]:
    r = _Raw(src, on_progress)
    offset = 0
    try:
        for lineno, raw in enumerate(r.f, 1):
            start, offset = offset, offset + len(raw)
            if lineno % 64 == 0:
                r.tick()
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(src, e, start, lineno) from e
            if not line.strip():
                continue
            where = f"{src.path}:line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                                f'one object such as {{"{field}": "..."}}') from e
            if not isinstance(obj, dict) or field not in obj:
                keys = ", ".join(map(repr, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{where}: no {field!r} field (found: {keys}); put each document in "
                                f"{field!r} or choose the field with --field")
            text = obj[field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{where}: {field!r} is {type(text).__name__}, expected a string")
            doc = _document(src, text, where)
            if doc is not None:
                yield doc
    finally:
        r.close()


def _pyarrow(src: Source):
    try:
        import pyarrow  # noqa: F401
    except ImportError as e:
        raise DataError(f"{src.path}: reading {src.kind} files needs pyarrow: "
                        "pip install 'deepseekmoe[parquet]' (or pip install pyarrow)") from e


def _column_docs(src: Source, field: str, batches, schema, row0_progress) -> Iterator[Document]:
    import pyarrow as pa

    if field not in schema.names:
        raise DataError(f"{src.path}: no {field!r} column (columns: {', '.join(schema.names[:12])}); "
                        "choose the column with --field")
    typ = schema.field(field).type
    is_text = pa.types.is_string(typ) or pa.types.is_large_string(typ)
    if not (is_text or pa.types.is_binary(typ) or pa.types.is_large_binary(typ)):
        raise DataError(f"{src.path}: column {field!r} has type {typ}, expected strings")
    row = 0
    for batch in batches:
        col = batch.column(batch.schema.get_field_index(field))
        for value in col.to_pylist():
            row += 1
            if value is None:
                continue
            where = f"{src.path}:row {row}"
            if not is_text:
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not valid UTF-8 at byte offset {e.start} of the value; "
                                    "store text as UTF-8") from e
            doc = _document(src, value, where)
            if doc is not None:
                yield doc
        row0_progress(row)


def _read_parquet(src: Source, field: str, on_progress) -> Iterator[Document]:
    _pyarrow(src)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{src.path}: not a readable parquet file ({e})") from e
    total_rows, size = max(pf.metadata.num_rows, 1), src.size
    done = [0]

    def progress(rows):
        now = size * rows // total_rows
        on_progress(now - done[0])
        done[0] = now

    try:
        yield from _column_docs(src, field, pf.iter_batches(batch_size=1024, columns=[field])
                                if field in pf.schema_arrow.names else [], pf.schema_arrow, progress)
    except pa.ArrowInvalid as e:
        raise DataError(f"{src.path}: unreadable parquet data ({e})") from e


def _read_arrow(src: Source, field: str, on_progress) -> Iterator[Document]:
    _pyarrow(src)
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        with pa.memory_map(str(src.path)) as f:
            try:
                reader = ipc.open_stream(f)  # what datasets' save_to_disk writes
            except pa.ArrowInvalid:
                f.seek(0)
                reader = ipc.open_file(f)
                reader = (reader.get_batch(i) for i in range(reader.num_record_batches)), reader.schema
            else:
                reader = iter(reader), reader.schema
            size = src.size
            yield from _column_docs(src, field, reader[0], reader[1], lambda rows: None)
            on_progress(size)
    except pa.ArrowInvalid as e:
        raise DataError(f"{src.path}: not a readable Arrow IPC file ({e})") from e
