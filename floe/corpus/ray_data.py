"""The corpus job on Ray Data (``floe embed-corpus --ray [ADDRESS]``).

    read_datasource(_ShardDatasource)    one read task per shard still to do, floe's own reader
      -> map_batches(_EmbedActor)        an actor pool of floe engines (one per GPU, or per group
                                         of cores); each batch is one whole shard: tokenize,
                                         length-sorted batches, forward, post step, then the
                                         write: the shard's part file, atomic rename
      -> the driver                      counts progress from one small status row per shard

The shards, the manifest, the part files and the final step are the local path's (reader.py,
writer.py), so the output is the same and a job can be resumed by either path. The output folder
must be reachable from every node that runs an embedding actor (a shared file system), as for any
Ray Data write. The model folder must be at the same path on every node (the embedded default model is
installed with floe).

Ray Data's own ``write_parquet`` is not used: it has no notion of which rows were already
written, so it cannot resume a job exactly once.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np
import pyarrow as pa

from floe.corpus.embed import CorpusOptions
from floe.corpus.job import Plan
from floe.corpus.progress import Progress
from floe.corpus.reader import CorpusError, Rows, Shard, Source

log = logging.getLogger("floe.corpus")

try:
    import ray
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise CorpusError('--ray needs Ray Data: pip install "floe[ray]"') from exc


# --- read -------------------------------------------------------------------------------------

def _shard_block(source: Source, shard: Shard) -> pa.Table:
    rows = source.read(shard)
    n = shard.rows
    reasons = [rows.bad.get(i) for i in range(n)]
    return pa.table({
        "shard": pa.array(np.full(n, shard.index, dtype=np.int64)),
        "start": pa.array(np.full(n, shard.start, dtype=np.int64)),
        "shard_rows": pa.array(np.full(n, n, dtype=np.int64)),
        "pos": pa.array(np.arange(n, dtype=np.int64)),
        "id": rows.ids,
        "text": pa.array(rows.texts, type=pa.string()),
        "reason": pa.array(reasons, type=pa.string()),
    })


class _ShardDatasource(Datasource):
    """One read task per shard; each returns the shard's rows as one block."""

    def __init__(self, source: Source, shards: list[Shard]) -> None:
        super().__init__()
        self._source = source
        self._shards = shards

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context=None) -> list:
        source = self._source
        tasks = []
        for shard in self._shards:
            meta = BlockMetadata(num_rows=shard.rows, size_bytes=None, exec_stats=None,
                                 input_files=None)
            tasks.append(ReadTask(lambda s=shard: [_shard_block(source, s)], meta))
        return tasks


# --- embed (actors) ---------------------------------------------------------------------------

def _rows_of(batch: pa.Table) -> list[Rows]:
    """Splits a batch into whole shards (checks that no shard was cut between blocks)."""
    out = []
    shard_col = batch.column("shard").to_numpy()
    for index in np.unique(shard_col):
        part = batch.filter(pa.array(shard_col == index))
        start = int(part.column("start")[0].as_py())
        n = int(part.column("shard_rows")[0].as_py())
        pos = part.column("pos").to_numpy()
        if len(pos) != n or not np.array_equal(np.sort(pos), np.arange(n)):
            raise RuntimeError(f"shard {index} reached the embedding stage split across blocks "
                               f"({len(pos)} of {n} rows)")
        order = np.argsort(pos)
        part = part.take(pa.array(order))
        texts = part.column("text").to_pylist()
        reasons = part.column("reason").to_pylist()
        bad = {i: r for i, r in enumerate(reasons) if r is not None}
        out.append(Rows(Shard(int(index), start, start + n), part.column("id").combine_chunks(),
                        texts, bad))
    return out


class _EmbedActor:
    """One floe engine, its tokenizer and the job's embedding step; one call per shard.

    The actor commits each shard it embeds (part file, atomic rename) and returns one status
    row per shard: the embeddings never travel through the object store, and no separate write
    task (a Ray worker process importing pyarrow and floe) waits for them. Measured on 2 cores,
    that write stage took about 20 s per job, by our reading of Ray Data's log mostly the
    worker's start."""

    def __init__(self, model: str, options: dict, engine: Optional[str], device: str, dtype: str,
                 threads: int, batch_tokens: Optional[int], max_batch_size: int, work: str,
                 manifest: dict) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from floe.config import ModelSettings
        from floe.corpus.budget import tuner_for
        from floe.corpus.embed import ShardEmbedder
        from floe.corpus.writer import schema_for
        from floe.engine import create_engine
        from floe.models import load_spec
        from floe.tokenize import Tokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        spec = load_spec(ModelSettings(model=model))
        kw = {} if engine is None else {"kind": engine}
        self.engine = create_engine(spec, device=device, dtype=dtype, threads=threads, **kw)
        # each actor measures its own budget (its engine, its cores) unless one is given
        tuner = tuner_for(spec, batch_tokens, max_batch_size, self.engine.device.startswith("cuda"))
        self.embedder = ShardEmbedder(spec, Tokenizer(spec), CorpusOptions(**options), tuner)
        # the Rust tokenizer releases the GIL: a shard's chunks tokenize on the actor's cores
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="floe-tokenize")
        self.work = work
        self.schema = schema_for(manifest)

    def _run(self, seqs: list) -> np.ndarray:
        return self.engine.run(self.engine.prepare(seqs))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from floe.corpus.writer import write_part

        status: dict[str, list] = {"shard": [], "rows": [], "tokens": [], "skipped": [], "error": []}
        for rows in _rows_of(batch):
            error, tokens, skipped = None, 0, 0
            try:
                tok = self.embedder.tokenize(rows, self.pool)
                pooled = self.embedder.embed(tok, self._run)
                table, skipped_rows = self.embedder.result_table(tok, pooled)
            except CorpusError as exc:  # --on-error fail, or non-finite output: nothing written
                error = str(exc)
            else:
                write_part(self.work, rows.shard.index, table, skipped_rows, self.schema)
                tokens, skipped = tok.n_tokens, len(skipped_rows)
            status["shard"].append(rows.shard.index)
            status["rows"].append(rows.shard.rows)
            status["tokens"].append(int(tokens))
            status["skipped"].append(skipped)
            status["error"].append(error)
        return pa.table({"shard": pa.array(status["shard"], pa.int64()),
                         "rows": pa.array(status["rows"], pa.int64()),
                         "tokens": pa.array(status["tokens"], pa.int64()),
                         "skipped": pa.array(status["skipped"], pa.int64()),
                         "error": pa.array(status["error"], pa.string())})


# --- driver -----------------------------------------------------------------------------------

def _connect(address: str) -> bool:
    """Connects to (or starts) Ray; returns True when this call started it."""
    if ray.is_initialized():
        return False
    kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if address in ("", "local"):
        # Ray's agents start slowly on a small busy machine; its default waits (about a minute)
        # then kill the raylet. A local instance may take its time.
        os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")
        os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
        # Ray starts its workers at nice 15, below its own driver, raylet and agents: on a
        # machine whose cores the job fills, the embedding actors then wait behind Ray's
        # bookkeeping. In an instance started for this job, the actors are the job.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=os.cpu_count() or 1, **kw)
    else:
        ray.init(address=address, **kw)
    return True


def run_ray(plan: Plan, progress: Progress) -> None:
    job = plan.job
    started = _connect(job.ray or "local")
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = bool(job.progress)
        ctx.target_max_block_size = max(ctx.target_max_block_size or 0, 1 << 30)  # a shard stays whole
        cluster = ray.cluster_resources()
        cpus = float(cluster.get("CPU", 1))
        gpus = float(cluster.get("GPU", 0))
        use_gpu = job.device.startswith("cuda") or (job.device == "auto" and gpus >= 1)
        actors = job.workers
        threads = job.threads or max(1, int(cpus // actors))
        # Logical CPUs reserved per actor: leave room for the read and write tasks.
        reserve = max(0.25, min(float(threads), (cpus - 0.5) / actors))
        log.info("Ray: %d actor(s), %d thread(s) each, %s; cluster %s", actors, threads,
                 "1 GPU each" if use_gpu else "CPU", {k: v for k, v in cluster.items()
                                                       if k in ("CPU", "GPU", "memory")})
        options = plan.embedder.options.to_json()
        ds = ray.data.read_datasource(_ShardDatasource(plan.source, plan.pending),
                                      override_num_blocks=len(plan.pending), num_cpus=0.1)
        ds = ds.map_batches(
            _EmbedActor, batch_size=None, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=reserve, num_gpus=1 if use_gpu else 0,
            fn_constructor_kwargs=dict(
                model=plan.spec.path, options=options, engine=job.engine,
                device="cuda" if use_gpu else job.device,
                dtype=job.dtype, threads=threads, batch_tokens=job.batch_tokens,
                max_batch_size=job.max_batch_size, work=plan.output.work,
                manifest=plan.manifest))
        for status in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in status.to_pylist():
                if row["error"]:
                    raise CorpusError(row["error"])
                progress.update(row["rows"], row["tokens"], row["skipped"])
    finally:
        if started:
            ray.shutdown()
