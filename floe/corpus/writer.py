"""The output of a corpus job: part files, a manifest, and the final atomic result.

Layout while the job runs (the *work folder*)::

    _floe_manifest.json       input, model and option fingerprints, shard count, state
    part-000000.parquet       shard 0's rows, committed by an atomic rename
    _piece-000001-<stamp>.parquet   rows of unfinished shard 1 embedded so far (see below)
    .part-000001.parquet.tmp-<pid>-<rand>   being written (ignored by readers, removed on restart)

Each part file carries its shard's skipped rows in its Parquet key-value metadata, so one rename
commits both; nothing else needs to be durable per shard.

A shard that takes longer than the commit bound (``--commit-seconds``, floe/corpus/commit.py) is
also committed in *pieces* while it computes: each piece holds the pooled rows (before the post
step) finished since the last commit, with their positions in the shard, committed by the same
atomic rename. The file names are the record: a rerun reads a shard's pieces, embeds only the
rows they lack, then writes the shard's part file from both (the rows are the same bytes an
uninterrupted run writes) and removes the pieces. Pieces start with ``_``, so readers of a
folder OUTPUT never see them, and none is left once the job is complete.

* ``OUTPUT`` a folder (any name not ending in ``.parquet``): the folder *is* the work folder; when
  every shard is there the manifest is rewritten with ``"complete": true``, and the skipped rows
  go to ``OUTPUT/_skipped.jsonl``. pyarrow reads the part files in name order and ignores names
  starting with ``_`` or ``.``, so ``pyarrow.parquet.read_table(OUTPUT)`` gives the rows in order.
* ``OUTPUT`` ending in ``.parquet``: the work folder is ``OUTPUT.parts``; at the end the parts
  are copied into ``OUTPUT.tmp-...`` (one row group per shard), which is renamed to ``OUTPUT``: it
  appears whole or not at all. Its metadata holds the manifest, so a rerun recognises a finished
  job. Skipped rows go to ``OUTPUT.skipped.jsonl``.

A rerun with the same arguments redoes only the missing shards. A rerun whose input, model or
options differ from the manifest is refused (CorpusError) instead of mixing outputs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from floe.corpus.reader import CorpusError

MANIFEST = "_floe_manifest.json"
META_KEY = b"floe.corpus"
SKIPPED_KEY = b"floe.skipped"
_PART = re.compile(r"^part-(\d{6,})\.parquet$")
_PIECE = re.compile(r"^_piece-(\d{6,})-[0-9a-f]+\.parquet$")
FORMAT_VERSION = 1


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = os.path.join(os.path.dirname(path) or ".",
                       f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def model_fingerprint(spec) -> dict:
    """Identifies a model folder by its files: content hashes of the small ones (configs,
    tokenizer), size plus a hash of the first and last MiB of the large ones (weights)."""
    h = hashlib.sha256()
    roots = sorted({os.path.abspath(spec.path), os.path.abspath(spec.backbone_path)})
    for root in roots:
        for dirpath, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if name.startswith(".") or name.endswith((".pyc", ".lock")):
                    continue
                full = os.path.join(dirpath, name)
                size = os.path.getsize(full)
                h.update(f"{os.path.relpath(full, root)}\0{size}\0".encode())
                with open(full, "rb") as f:
                    if size <= 4 << 20:
                        h.update(f.read())
                    else:
                        h.update(f.read(1 << 20))
                        f.seek(size - (1 << 20))
                        h.update(f.read())
    return {"name": spec.name, "path": os.path.abspath(spec.path), "sha256": h.hexdigest()}


def _describe_change(key: str, old, new) -> str:
    if key == "input":
        if old.get("path") != new.get("path"):
            return f"the input is {new.get('path')}, the output was started from {old.get('path')}"
        old_files = {f["path"]: f for f in old.get("files", [])}
        new_files = {f["path"]: f for f in new.get("files", [])}
        for p in sorted(set(old_files) | set(new_files)):
            a, b = old_files.get(p), new_files.get(p)
            if a is None:
                return f"{p} was added to the input"
            if b is None:
                return f"{p} is gone from the input"
            if a != b:
                return (f"{p} changed since the output was started (size {a['size']} -> {b['size']}, "
                        "modification time changed)" if a["size"] != b["size"] else
                        f"{p} was modified since the output was started")
        return "the input changed"
    if key == "model":
        return (f"the model is {new.get('name')} ({new.get('sha256', '')[:12]}), the output was "
                f"started with {old.get('name')} ({old.get('sha256', '')[:12]})")
    if key == "options":
        diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        return "options differ (" + ", ".join(diffs) + ")"
    return f"{key} differs"


class CorpusOutput:
    """Owns OUTPUT: checks or creates the manifest, commits shards, finalizes."""

    def __init__(self, output: str) -> None:
        self.output = os.path.abspath(output)
        self.single_file = self.output.endswith(".parquet")
        self.work = self.output + ".parts" if self.single_file else self.output
        self.skipped_path = (self.output + ".skipped.jsonl" if self.single_file
                             else os.path.join(self.output, "_skipped.jsonl"))
        self.manifest: Optional[dict] = None

    # --- opening -------------------------------------------------------------------------------

    def _check(self, found: dict, want: dict, where: str) -> None:
        for key in ("input", "model", "options", "shards", "rows", "id_type"):
            if found.get(key) != want.get(key):
                reason = _describe_change(key, found.get(key) or {}, want.get(key) or {}) \
                    if key in ("input", "model", "options") else f"{key} differs"
                raise CorpusError(
                    f"{self.output} holds (part of) a different job: {reason}. Refusing to mix "
                    f"outputs: delete {where} to start over, or rerun with the original input, "
                    "model and options to resume it.")

    def finished(self, want: dict) -> bool:
        """True when OUTPUT is a finished job with this manifest (raises if it is another job)."""
        if self.single_file and os.path.isfile(self.output):
            try:
                meta = pq.read_schema(self.output).metadata or {}
            except (pa.ArrowInvalid, OSError):
                meta = {}
            if META_KEY not in meta:
                raise CorpusError(f"{self.output} exists and was not written by floe embed-corpus; "
                                  "delete it or choose another output")
            self._check(json.loads(meta[META_KEY]), want, self.output)
            if os.path.isdir(self.work):  # killed between the final rename and the cleanup
                shutil.rmtree(self.work, ignore_errors=True)
            return True
        path = os.path.join(self.work, MANIFEST)
        if not self.single_file and os.path.isfile(path):
            with open(path) as f:
                found = json.load(f)
            self._check(found, want, self.output)
            return bool(found.get("complete"))
        return False

    def open(self, want: dict) -> set[int]:
        """Creates the work folder or checks the one there; returns the indices of finished shards."""
        path = os.path.join(self.work, MANIFEST)
        if os.path.isfile(path):
            with open(path) as f:
                found = json.load(f)
            self._check(found, want, self.work)
        else:
            if os.path.exists(self.work) and (not os.path.isdir(self.work) or os.listdir(self.work)):
                raise CorpusError(f"{self.work} exists and is not a floe embed-corpus output; "
                                  "delete it or choose another output")
            parent = os.path.dirname(self.work)
            if parent:
                os.makedirs(parent, exist_ok=True)
            os.makedirs(self.work, exist_ok=True)
            _atomic_write_bytes(path, json.dumps(want, indent=1).encode())
        self.manifest = want
        for pattern in (".part-*.tmp-*", "._piece-*.tmp-*"):
            for stale in glob.glob(os.path.join(glob.escape(self.work), pattern)):
                try:
                    os.remove(stale)  # a shard or piece being written when the last run died
                except OSError:
                    pass
        done = self.done_shards()
        for index in set(piece_files(self.work)) & done:
            drop_pieces(self.work, index)  # killed between a part's rename and its pieces' removal
        return done

    def piece_rows(self) -> dict[int, int]:
        """Rows committed in the pieces of each unfinished shard (from the files' metadata)."""
        return {index: len(_piece_positions(paths))
                for index, paths in piece_files(self.work).items()}

    def done_shards(self) -> set[int]:
        done = set()
        for name in os.listdir(self.work):
            m = _PART.match(name)
            if m:
                done.add(int(m.group(1)))
        return done

    # --- shards --------------------------------------------------------------------------------

    def schema(self) -> pa.Schema:
        assert self.manifest is not None
        return schema_for(self.manifest)

    def write_shard(self, index: int, table: pa.Table, skipped: list[dict]) -> str:
        """Writes one shard's rows and commits them with an atomic rename. Idempotent per index."""
        return write_part(self.work, index, table, skipped, self.schema())

    # --- the end -------------------------------------------------------------------------------

    def finalize(self) -> dict:
        """Checks every shard is there, writes the skipped-row list and makes OUTPUT final.
        Returns {"rows": written rows, "skipped": skipped rows}."""
        assert self.manifest is not None
        n = self.manifest["shards"]
        missing = [i for i in range(n) if not os.path.isfile(os.path.join(self.work, part_name(i)))]
        if missing:
            raise CorpusError(f"{len(missing)} shard(s) are not written yet (first: {missing[0]})")
        parts = [os.path.join(self.work, part_name(i)) for i in range(n)]
        skipped: list[dict] = []
        rows = 0
        for p in parts:
            pf = pq.ParquetFile(p)
            rows += pf.metadata.num_rows
            meta = pf.schema_arrow.metadata or {}
            if SKIPPED_KEY in meta:
                skipped += json.loads(meta[SKIPPED_KEY])
        if skipped:
            lines = "".join(json.dumps(s, default=str) + "\n" for s in skipped)
            _atomic_write_bytes(self.skipped_path, lines.encode())
        elif os.path.exists(self.skipped_path):
            os.remove(self.skipped_path)
        summary = {"rows": rows, "skipped": len(skipped)}
        for index in piece_files(self.work):
            drop_pieces(self.work, index)  # a piece written after its shard's part (a retried task)
        if self.single_file:
            parent, base = os.path.dirname(self.output), os.path.basename(self.output)
            for stale in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(base)}.tmp-*")):
                os.remove(stale)  # a final copy interrupted by a kill
            schema = self.schema().with_metadata({META_KEY: json.dumps(self.manifest).encode()})
            tmp = os.path.join(os.path.dirname(self.output),
                               f".{os.path.basename(self.output)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            with pq.ParquetWriter(tmp, schema) as w:
                for p in parts:
                    t = pq.read_table(p)
                    w.write_table(t.replace_schema_metadata(schema.metadata).cast(schema),
                                  row_group_size=max(1, t.num_rows))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.output)
            _fsync_dir(os.path.dirname(self.output))
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            done = dict(self.manifest, complete=True, written_rows=rows, skipped_rows=len(skipped))
            _atomic_write_bytes(os.path.join(self.work, MANIFEST), json.dumps(done, indent=1).encode())
        return summary


def schema_for(manifest: dict) -> pa.Schema:
    from floe.corpus.embed import embedding_type

    id_type = _type_from_str(manifest["id_type"])
    emb = pa.field("embedding", embedding_type(manifest["dim"], manifest["options"]["output_dtype"]))
    opts = manifest["options"]
    if opts.get("chunk_tokens") is not None or opts.get("late_chunking"):
        # one row per chunk (floe/corpus/embed.py CHUNK_COLUMNS)
        return pa.schema([pa.field("id", id_type), pa.field("chunk", pa.int32()),
                          pa.field("start", pa.int64()), pa.field("end", pa.int64()), emb])
    return pa.schema([pa.field("id", id_type), emb])


def _type_from_str(name: str) -> pa.DataType:
    simple = {"int64": pa.int64(), "int32": pa.int32(), "string": pa.string(),
              "large_string": pa.large_string(), "uint64": pa.uint64(), "double": pa.float64(),
              "int16": pa.int16(), "uint32": pa.uint32(), "binary": pa.binary()}
    if name in simple:
        return simple[name]
    raise CorpusError(f"ids of type {name} are not supported (int, string or binary)")


def write_part(work: str, index: int, table: pa.Table, skipped: list[dict], schema: pa.Schema) -> str:
    """Writes ``table`` as shard ``index``'s part file in ``work``: to a hidden temporary name,
    fsync, then an atomic rename. Safe to call from any process that sees ``work``."""
    from floe.corpus.embed import skipped_json

    final = os.path.join(work, part_name(index))
    meta = {SKIPPED_KEY: skipped_json(skipped)} if skipped else None
    table = table.cast(schema).replace_schema_metadata(meta)
    tmp = os.path.join(work, f".{part_name(index)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    pq.write_table(table, tmp, row_group_size=max(1, table.num_rows))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(work)
    return final


# --- pieces: the rows of an unfinished shard, committed as they are embedded --------------------

def piece_files(work: str) -> dict[int, list[str]]:
    """Shard index -> its piece files, in name order."""
    out: dict[int, list[str]] = {}
    try:
        names = sorted(os.listdir(work))
    except FileNotFoundError:
        return out
    for name in names:
        m = _PIECE.match(name)
        if m:
            out.setdefault(int(m.group(1)), []).append(os.path.join(work, name))
    return out


def _piece_schema(dim: int) -> pa.Schema:
    return pa.schema([pa.field("pos", pa.int64()), pa.field("pooled", pa.list_(pa.float32(), dim))])


def write_piece(work: str, index: int, positions: np.ndarray, pooled: np.ndarray) -> str:
    """Commits rows of unfinished shard ``index``: their positions in the shard and their pooled
    float32 vectors (before the post step), to a hidden temporary name, fsync, atomic rename.
    Any process may write pieces of any shard; a position in two pieces holds the same row."""
    n, dim = pooled.shape
    flat = pa.array(np.ascontiguousarray(pooled, dtype=np.float32).reshape(-1), type=pa.float32())
    table = pa.Table.from_arrays(
        [pa.array(np.asarray(positions, dtype=np.int64)), pa.FixedSizeListArray.from_arrays(flat, dim)],
        schema=_piece_schema(dim))
    name = f"_piece-{index:06d}-{time.time_ns():016x}{uuid.uuid4().hex[:6]}.parquet"
    tmp = os.path.join(work, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    pq.write_table(table, tmp, row_group_size=max(1, n))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    final = os.path.join(work, name)
    os.replace(tmp, final)
    _fsync_dir(work)
    return final


def _piece_positions(paths: list[str]) -> np.ndarray:
    cols = [pq.read_table(p, columns=["pos"]).column("pos").to_numpy() for p in paths]
    return np.unique(np.concatenate(cols)) if cols else np.zeros(0, np.int64)


def read_pieces(work: str, index: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows committed in shard ``index``'s pieces: (positions ascending, pooled (n, dim))."""
    paths = piece_files(work).get(index, [])
    if not paths:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    tables = [pq.read_table(p) for p in paths]
    for p, t in zip(paths, tables):
        if t.schema.field("pooled").type.list_size != dim:
            raise CorpusError(f"{p} holds rows of width {t.schema.field('pooled').type.list_size}, "
                              f"the model's is {dim}: delete it to recompute its rows")
    pos = np.concatenate([t.column("pos").to_numpy() for t in tables])
    vecs = np.concatenate([t.column("pooled").combine_chunks().values.to_numpy(zero_copy_only=False)
                           .reshape(t.num_rows, dim) for t in tables]).astype(np.float32, copy=False)
    keep = np.unique(pos, return_index=True)[1]   # a row in two pieces (a retried task): once
    return pos[keep], vecs[keep]


def drop_pieces(work: str, index: int) -> None:
    """Removes shard ``index``'s pieces (its part file holds their rows now)."""
    for p in piece_files(work).get(index, []):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
