"""Corpus input: Parquet (a file or a dataset folder), JSONL or CSV, read one shard at a time.

``open_source(path, text_column, id_column)`` returns a Source. ``Source.plan(shard_rows)`` scans
the input once and cuts it into shards of ``shard_rows`` rows, each with what is needed to read it
directly later (a byte offset for JSONL/CSV, file pieces for Parquet): any shard can be read alone,
in any process, which is what resuming and Ray's read tasks need. ``Source.read(shard)`` returns
its rows.

Rows are numbered from 0 in input order. JSONL: one JSON object per line; blank lines are not rows.
CSV: a header line, then one record per row (quoted fields may span lines); blank lines are not
rows. Parquet folder: its ``*.parquet`` files in sorted path order (names starting with ``_`` or
``.`` are skipped, as pyarrow does).

A row whose text is missing, null or not a string, or whose line is not valid JSON, is a *bad row*:
it is returned with a reason instead of a text, and the job skips it or fails on it (``--on-error``).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from floe.errors import ConfigError


class CorpusError(ConfigError):
    """The job cannot run as asked (bad input layout, a bad row with --on-error fail, a changed
    input for an existing output). The message says what to change."""


@dataclass(frozen=True)
class Shard:
    """Rows [start, end) of the input. ``locator`` is format-specific and JSON-serializable."""

    index: int
    start: int
    end: int
    locator: Any = None

    @property
    def rows(self) -> int:
        return self.end - self.start


@dataclass
class Rows:
    """The rows of one shard. ``texts[i]`` is None for a bad row; ``bad`` maps its position in
    the shard to the reason."""

    shard: Shard
    ids: pa.Array
    texts: list
    bad: dict = field(default_factory=dict)

    @property
    def row_numbers(self) -> np.ndarray:
        return np.arange(self.shard.start, self.shard.end, dtype=np.int64)


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def text_problem(v: Any) -> Optional[str]:
    """Why a text value cannot be embedded, or None when it can."""
    if v is None:
        return "text is missing or null"
    if not isinstance(v, str):
        return f"text is not a string ({_type_name(v)})"
    return None


def _ids_array(values: list, id_type: pa.DataType, bad: dict) -> pa.Array:
    """Builds the id column of a shard; an id that does not fit the corpus' id type is a bad row."""
    try:
        return pa.array(values, type=id_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    fixed = []
    for i, v in enumerate(values):
        try:
            pa.array([v], type=id_type)
            fixed.append(v)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            bad.setdefault(i, f"id {v!r} is not of the corpus' id type {id_type}")
            fixed.append(None)
    return pa.array(fixed, type=id_type)


class Source:
    """One corpus input. Subclasses read one format."""

    format = ""

    def __init__(self, path: str, text_column: str, id_column: Optional[str]) -> None:
        self.path = os.path.abspath(path)
        self.text_column = text_column
        self.id_column = id_column
        self.id_type: pa.DataType = pa.int64()

    def files(self) -> list[str]:
        return [self.path]

    def fingerprint(self) -> dict:
        """What identifies this input: every file's path, size and modification time."""
        out = []
        for f in self.files():
            st = os.stat(f)
            out.append({"path": f, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        return {"format": self.format, "path": self.path, "files": out}

    def plan(self, shard_rows: int) -> list[Shard]:
        raise NotImplementedError

    def read(self, shard: Shard) -> Rows:
        raise NotImplementedError


def _cut(total: int, shard_rows: int, locate) -> list[Shard]:
    if total == 0:  # one empty shard, so that an empty input still gives a (0-row) output
        return [Shard(0, 0, 0, locate(0))]
    return [Shard(i, s, min(s + shard_rows, total), locate(s))
            for i, s in enumerate(range(0, total, shard_rows))]


# --- JSONL ------------------------------------------------------------------------------------

class JsonlSource(Source):
    format = "jsonl"

    def plan(self, shard_rows: int) -> list[Shard]:
        offsets: list[int] = []
        row = 0
        pos = 0
        first_id: Any = None
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    if row % shard_rows == 0:
                        offsets.append(pos)
                    if row == 0 and self.id_column:
                        try:
                            first_id = orjson.loads(line).get(self.id_column)
                        except (orjson.JSONDecodeError, AttributeError):
                            first_id = None
                    row += 1
                pos += len(line)
        if self.id_column:
            self.id_type = (pa.int64() if isinstance(first_id, int) and not isinstance(first_id, bool)
                            else pa.string())
        return _cut(row, shard_rows, lambda s: offsets[s // shard_rows] if row else 0)

    def read(self, shard: Shard) -> Rows:
        texts: list = []
        ids: list = []
        bad: dict = {}
        want = shard.rows
        with open(self.path, "rb") as f:
            f.seek(int(shard.locator))
            while len(texts) < want:
                line = f.readline()
                if not line:
                    raise CorpusError(f"{self.path} changed while it was read (shard {shard.index} "
                                      "ends early)")
                if not line.strip():
                    continue
                i = len(texts)
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    bad[i] = f"invalid JSON ({exc})"
                    texts.append(None)
                    ids.append(None)
                    continue
                if not isinstance(obj, dict):
                    bad[i] = f"line is a JSON {_type_name(obj)}, not an object"
                    texts.append(None)
                    ids.append(None)
                    continue
                text = obj.get(self.text_column)
                problem = text_problem(text)
                if problem:
                    bad[i] = problem
                    text = None
                texts.append(text)
                if self.id_column:
                    if self.id_column not in obj:
                        bad.setdefault(i, f"id column {self.id_column!r} is missing")
                    ids.append(obj.get(self.id_column))
        if self.id_column:
            id_arr = _ids_array(ids, self.id_type, bad)
        else:
            id_arr = pa.array(np.arange(shard.start, shard.end, dtype=np.int64))
        for i in bad:
            texts[i] = None
        return Rows(shard, id_arr, texts, bad)


# --- CSV --------------------------------------------------------------------------------------

def _records(f, limit: Optional[int] = None):
    """Yields (offset, raw bytes) of each CSV record from ``f``'s position, joining the lines of a
    quoted field that spans lines (a record ends where its count of quote characters is even)."""
    pos = f.tell()
    n = 0
    while limit is None or n < limit:
        start = pos
        line = f.readline()
        if not line:
            return
        pos += len(line)
        quotes = line.count(b'"')
        parts = [line]
        while quotes % 2:
            more = f.readline()
            if not more:
                break
            pos += len(more)
            quotes += more.count(b'"')
            parts.append(more)
        raw = b"".join(parts)
        if not raw.strip():
            continue  # a blank line is not a record
        n += 1
        yield start, raw


def _parse_record(raw: bytes) -> list[str]:
    text = raw.decode("utf-8")
    return next(csv.reader(io.StringIO(text)), [])


class CsvSource(Source):
    format = "csv"

    def __init__(self, path: str, text_column: str, id_column: Optional[str]) -> None:
        super().__init__(path, text_column, id_column)
        with open(self.path, "rb") as f:
            header = next(_records(f, 1), None)
        if header is None:
            raise CorpusError(f"{self.path} is empty: a CSV input needs a header line")
        try:
            self.header = _parse_record(header[1].lstrip(b"\xef\xbb\xbf"))
        except UnicodeDecodeError:
            raise CorpusError(f"{self.path}: the CSV header is not valid UTF-8") from None
        for col in (text_column, id_column):
            if col is not None and col not in self.header:
                raise CorpusError(f"{self.path}: no column {col!r} in the CSV header "
                                  f"({', '.join(self.header)})")
        self._text_i = self.header.index(text_column)
        self._id_i = self.header.index(id_column) if id_column else None
        if id_column:
            self.id_type = pa.string()  # CSV values are text; ids are kept as written

    def plan(self, shard_rows: int) -> list[Shard]:
        offsets: list[int] = []
        row = 0
        with open(self.path, "rb") as f:
            records = _records(f)
            next(records, None)  # the header
            for start, _ in records:
                if row % shard_rows == 0:
                    offsets.append(start)
                row += 1
        return _cut(row, shard_rows, lambda s: offsets[s // shard_rows] if row else 0)

    def read(self, shard: Shard) -> Rows:
        texts: list = []
        ids: list = []
        bad: dict = {}
        with open(self.path, "rb") as f:
            f.seek(int(shard.locator))
            for _, raw in _records(f, shard.rows):
                i = len(texts)
                try:
                    fields = _parse_record(raw)
                except UnicodeDecodeError:
                    bad[i] = "record is not valid UTF-8"
                    texts.append(None)
                    ids.append(None)
                    continue
                except csv.Error as exc:
                    bad[i] = f"malformed CSV record ({exc})"
                    texts.append(None)
                    ids.append(None)
                    continue
                text = fields[self._text_i] if self._text_i < len(fields) else None
                if text is None:
                    bad[i] = f"the record has {len(fields)} fields, no {self.text_column!r}"
                texts.append(text)
                if self._id_i is not None:
                    value = fields[self._id_i] if self._id_i < len(fields) else None
                    if value is None:
                        bad.setdefault(i, f"the record has {len(fields)} fields, no {self.id_column!r}")
                    ids.append(value)
        if len(texts) != shard.rows:
            raise CorpusError(f"{self.path} changed while it was read (shard {shard.index} ends early)")
        if self._id_i is not None:
            id_arr = _ids_array(ids, self.id_type, bad)
        else:
            id_arr = pa.array(np.arange(shard.start, shard.end, dtype=np.int64))
        for i in bad:
            texts[i] = None
        return Rows(shard, id_arr, texts, bad)


# --- Parquet ----------------------------------------------------------------------------------

class ParquetSource(Source):
    format = "parquet"

    def __init__(self, path: str, text_column: str, id_column: Optional[str]) -> None:
        super().__init__(path, text_column, id_column)
        if os.path.isdir(self.path):
            found = []
            for root, dirs, names in os.walk(self.path):
                dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
                found += [os.path.join(root, n) for n in names
                          if n.endswith(".parquet") and not n.startswith(("_", "."))]
            self._files = sorted(found)
            if not self._files:
                raise CorpusError(f"{self.path} holds no .parquet files")
        else:
            self._files = [self.path]
        self._rows_per_file: list[int] = []
        first_typed: Optional[str] = None
        for f in self._files:
            meta = pq.ParquetFile(f)
            schema = meta.schema_arrow
            for col in (text_column, id_column):
                if col is not None and col not in schema.names:
                    raise CorpusError(f"{f}: no column {col!r} (columns: {', '.join(schema.names)})")
            if id_column and meta.metadata.num_rows:
                t = schema.field(id_column).type
                if first_typed is None:
                    first_typed = f
                    self.id_type = t
                elif t != self.id_type:
                    raise CorpusError(f"{f}: column {id_column!r} is {t}, but {first_typed} has "
                                      f"{self.id_type}")
            self._rows_per_file.append(meta.metadata.num_rows)

    def files(self) -> list[str]:
        return list(self._files)

    def plan(self, shard_rows: int) -> list[Shard]:
        bounds = np.concatenate([[0], np.cumsum(self._rows_per_file)]).astype(np.int64)
        total = int(bounds[-1])

        def pieces(start: int) -> list:
            end = min(start + shard_rows, total)
            out = []
            for fi in range(len(self._files)):
                a, b = max(start, int(bounds[fi])), min(end, int(bounds[fi + 1]))
                if a < b:
                    out.append([fi, a - int(bounds[fi]), b - int(bounds[fi])])
            return out

        return _cut(total, shard_rows, pieces)

    def _read_piece(self, fi: int, a: int, b: int) -> pa.Table:
        pf = pq.ParquetFile(self._files[fi])
        cols = [self.text_column] + ([self.id_column] if self.id_column else [])
        groups, first, seen = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if seen + n > a and seen < b:
                groups.append(g)
                if first is None:
                    first = seen
            seen += n
        table = pf.read_row_groups(groups, columns=cols)
        return table.slice(a - (first or 0), b - a)

    def read(self, shard: Shard) -> Rows:
        tables = [self._read_piece(*p) for p in shard.locator]
        texts: list = []
        bad: dict = {}
        id_chunks = []
        for t in tables:
            texts += t.column(self.text_column).to_pylist()
            if self.id_column:
                id_chunks += t.column(self.id_column).chunks
        for i, v in enumerate(texts):
            problem = text_problem(v)
            if problem:
                bad[i] = problem
                texts[i] = None
        if self.id_column:
            ids = pa.concat_arrays(id_chunks) if id_chunks else pa.array([], type=self.id_type)
        else:
            ids = pa.array(np.arange(shard.start, shard.end, dtype=np.int64))
        if len(texts) != shard.rows:
            raise CorpusError(f"{self.path} changed while it was read (shard {shard.index})")
        return Rows(shard, ids, texts, bad)


def open_source(path: str, text_column: str = "text", id_column: Optional[str] = None,
                fmt: Optional[str] = None) -> Source:
    """The Source for ``path``; the format comes from ``fmt`` or the name (.parquet, .jsonl/.ndjson/
    .json, .csv; a folder is a Parquet dataset)."""
    if not os.path.exists(path):
        raise CorpusError(f"input {path} does not exist")
    if fmt is None:
        name = path.lower()
        if os.path.isdir(path) or name.endswith((".parquet", ".pq")):
            fmt = "parquet"
        elif name.endswith((".jsonl", ".ndjson", ".json")):
            fmt = "jsonl"
        elif name.endswith(".csv"):
            fmt = "csv"
        else:
            raise CorpusError(f"cannot tell the format of {path}: name it .parquet, .jsonl or .csv, "
                              "or pass --input-format")
    try:
        cls = {"parquet": ParquetSource, "jsonl": JsonlSource, "csv": CsvSource}[fmt]
    except KeyError:
        raise CorpusError(f"unknown input format {fmt!r} (parquet, jsonl or csv)") from None
    try:
        return cls(path, text_column, id_column)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CorpusError(f"cannot read {path} as {fmt}: {exc}") from None
