"""The corpus job on Ray Data (``floe embed-corpus --ray [ADDRESS]``).

    from_items(shard descriptors)       one tiny row per shard still to do (index, row range,
                                        where it starts in the input): no read stage
      -> map_batches(_EmbedActor)        an actor pool of floe engines (one per GPU, or per group
                                         of cores), spread over the nodes; each call is one
                                         shard: read it (floe's reader), tokenize, length-sorted
                                         batches, forward, post step, then the write: the
                                         shard's part file, atomic rename. While a shard
                                         computes, its finished rows are committed in pieces
                                         within --commit-seconds (commit.py)
      -> the driver                      counts progress from one small status row per shard

The shards, the manifest, the part files, the pieces and the final step are the local path's
(reader.py, writer.py, commit.py), so the output is the same and a job can be resumed by either
path. The input and the output folder must be reachable at the same paths from every node that
runs an embedding actor (a shared file system), as for any Ray Data read and write. The model
folder must be at the same path on every node (the embedded default model is installed with floe).

The actor reads its own shard: a read stage of Ray tasks would start more worker processes (each
importing pyarrow and floe) beside the actors' engine load and carry every text through the
object store, to save a read that takes a fraction of a percent of a shard's compute.

Node loss: Ray Data restarts a dead actor (on a node with room) and retries its call; the retry
finds the pieces the dead actor committed and embeds only the rest, and a shard whose part file
exists is not embedded again. Ray Data's own ``write_parquet`` is not used: it has no notion of
which rows were already written, so it cannot resume a job exactly once.
"""

from __future__ import annotations

import json
import logging
import functools
import os
import time
from typing import Optional

import numpy as np
import pyarrow as pa

from floe.corpus.commit import CommitPolicy, OpenShard
from floe.corpus.embed import CorpusOptions
from floe.corpus.plan import Plan
from floe.corpus.progress import Progress
from floe.corpus.reader import CorpusError, Shard, Source
from floe.resolve import core_count

log = logging.getLogger("floe.corpus")

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise CorpusError('--ray needs Ray Data: pip install "floe[ray]"') from exc


# --- shards -----------------------------------------------------------------------------------

def shard_items(shards: list[Shard]) -> list[dict]:
    """One row per shard; the locator (format-specific) travels as JSON."""
    return [{"shard": s.index, "start": s.start, "end": s.end, "locator": json.dumps(s.locator)}
            for s in shards]


def _shards_of(batch: pa.Table) -> list[Shard]:
    return [Shard(int(r["shard"]), int(r["start"]), int(r["end"]), json.loads(r["locator"]))
            for r in batch.to_pylist()]


# --- embed (actors) ---------------------------------------------------------------------------

STATUS = {"shard": pa.int64(), "rows": pa.int64(), "tokens": pa.int64(), "skipped": pa.int64(),
          "error": pa.string(), "node": pa.string(), "init_s": pa.float64(),
          "ready_at": pa.float64(), "started_at": pa.float64(), "ended_at": pa.float64()}


class _EmbedActor:
    """One floe engine, its tokenizer and the job's embedding step; one call per shard.

    The actor reads its shard, commits it (part file, atomic rename; pieces while it computes)
    and returns one status row per shard: neither texts nor embeddings travel through the object
    store, and no separate read or write task (a Ray worker process importing pyarrow and floe)
    competes with the engine. The status rows carry wall-clock times (the actor's start, each
    shard's) from which the driver logs where a job's fixed cost went."""

    def __init__(self, model: str, options: dict, engine: Optional[str], device: str, dtype: str,
                 threads: int, batch_tokens: Optional[int], max_batch_size: int, work: str,
                 manifest: dict, source: Source, commit_seconds: float) -> None:
        t0 = time.time()
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
        if engine == "fake":
            # the fake engine's simulated compute time comes from the settings tree (the
            # environment of the node's raylet), as in the local path and a replica
            from floe.config import settings_from
            from floe.engine.fake import FakeEngine

            r = settings_from().replicas
            self.engine = FakeEngine(spec, seconds_per_token=r.fake_seconds_per_token,
                                     seconds_per_batch=r.fake_seconds_per_batch)
        else:
            self.engine = create_engine(spec, device=device, dtype=dtype, threads=threads, **kw)
        # each actor measures its own budget (its engine, its cores) unless one is given
        tuner = tuner_for(spec, batch_tokens, max_batch_size, self.engine.device.startswith("cuda"))
        self.embedder = ShardEmbedder(spec, Tokenizer(spec), CorpusOptions(**options), tuner)
        # the Rust tokenizer releases the GIL: a shard's chunks tokenize on the actor's cores
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="floe-tokenize")
        self.work = work
        self.schema = schema_for(manifest)
        self.source = source
        self.dim = spec.dim
        self.policy = CommitPolicy(commit_seconds)
        self.ready_at = time.time()
        self.init_s = self.ready_at - t0
        self.node = ray.get_runtime_context().get_node_id()[:12]

    def _run(self, tok, units: np.ndarray, seqs: list) -> np.ndarray:
        return tok.run(self.engine, units, seqs)

    def _shard(self, shard: Shard) -> tuple[int, int, int]:
        """Embeds and commits one shard; returns (rows, tokens, skipped) new in this call."""
        from floe.corpus.writer import drop_pieces, part_name, write_part

        if os.path.exists(os.path.join(self.work, part_name(shard.index))):
            return 0, 0, 0   # a retried call whose first try committed the shard
        rows = self.source.read(shard)
        tok = self.embedder.tokenize(rows, self.pool)
        state = OpenShard(tok, self.dim, self.work)
        policy = self.policy
        policy.restart()   # nothing of this actor is uncommitted between shards

        def after_batch(batch, seconds: float) -> None:
            state.finished(batch.idx)
            if policy.batch_done(seconds):
                t0 = time.perf_counter()
                try:
                    state.commit_new()
                except BaseException:
                    policy.failed()
                    raise
                policy.committed(time.perf_counter() - t0)

        pooled = self.embedder.embed(tok, functools.partial(self._run, tok), todo=state.todo,
                                     out=state.pooled,
                                     after_batch=after_batch)
        table, skipped_rows = self.embedder.result_table(tok, pooled)
        write_part(self.work, shard.index, table, skipped_rows, self.schema)
        drop_pieces(self.work, shard.index)
        return shard.rows - state.resumed, state.n_tokens_todo, len(skipped_rows)

    def __call__(self, batch: pa.Table) -> pa.Table:
        status: dict[str, list] = {k: [] for k in STATUS}
        for shard in _shards_of(batch):
            started = time.time()
            error, rows, tokens, skipped = None, 0, 0, 0
            try:
                rows, tokens, skipped = self._shard(shard)
            except CorpusError as exc:  # --on-error fail, or non-finite output: nothing written
                error = str(exc)
            for k, v in (("shard", shard.index), ("rows", rows), ("tokens", int(tokens)),
                         ("skipped", skipped), ("error", error), ("node", self.node),
                         ("init_s", self.init_s), ("ready_at", self.ready_at),
                         ("started_at", started), ("ended_at", time.time())):
                status[k].append(v)
        return pa.table({k: pa.array(v, STATUS[k]) for k, v in status.items()})


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
        ray.init(num_cpus=core_count(), **kw)
    else:
        ray.init(address=address, **kw)
    return True


def run_ray(plan: Plan, progress: Progress) -> None:
    job = plan.job
    t_start = time.time()
    started = _connect(job.ray or "local")
    t_connected = time.time()
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = bool(job.progress)
        cluster = ray.cluster_resources()
        cpus = float(cluster.get("CPU", 1))
        gpus = float(cluster.get("GPU", 0))
        use_gpu = job.device.startswith("cuda") or (job.device == "auto" and gpus >= 1)
        actors = job.workers
        threads = job.threads or max(1, int(cpus // actors))
        # Logical CPUs reserved per actor: its threads, within the cluster's share per actor
        # (there are no read or write tasks to leave room for)
        reserve = max(0.25, min(float(threads), cpus / actors))
        log.info("Ray: %d actor(s), %d thread(s) each, %s; cluster %s", actors, threads,
                 "1 GPU each" if use_gpu else "CPU", {k: v for k, v in cluster.items()
                                                       if k in ("CPU", "GPU", "memory")})
        options = plan.embedder.options.to_json()
        ds = ray.data.from_items(shard_items(plan.pending), override_num_blocks=len(plan.pending))
        ds = ds.map_batches(
            _EmbedActor, batch_size=None, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=reserve, num_gpus=1 if use_gpu else 0,
            fn_constructor_kwargs=dict(
                model=plan.spec.path, options=options, engine=job.engine,
                device="cuda" if use_gpu else job.device,
                dtype=job.dtype, threads=threads, batch_tokens=job.batch_tokens,
                max_batch_size=job.max_batch_size, work=plan.output.work,
                manifest=plan.manifest, source=plan.source,
                commit_seconds=job.corpus.commit_seconds))
        statuses = []
        for status in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in status.to_pylist():
                if row["error"]:
                    raise CorpusError(row["error"])
                progress.update(row["rows"], row["tokens"], row["skipped"])
                statuses.append(row)
        log.info("%s", fixed_cost(statuses, t_start, t_connected))
    finally:
        if started:
            ray.shutdown()


def fixed_cost(statuses: list[dict], t_start: float, t_connected: float) -> str:
    """Where the Ray job's time went before its steady state, from the actors' status rows (wall
    clock): connecting to (or starting) Ray, then until the first actor was ready (placement,
    its process start, imports and engine load: init_s of that), then until its first shard
    started. One line, logged at the end of a job."""
    if not statuses:
        return f"Ray: connect {t_connected - t_start:.1f} s; no shard ran"
    ready = min(r["ready_at"] for r in statuses)
    first = min(r["started_at"] for r in statuses)
    init = min(statuses, key=lambda r: r["ready_at"])["init_s"]
    nodes = sorted({r["node"] for r in statuses})
    return (f"Ray fixed cost: connect {t_connected - t_start:.1f} s, first actor ready "
            f"+{ready - t_connected:.1f} s (its constructor {init:.1f} s: imports, model, engine), "
            f"first shard started +{first - ready:.1f} s; {len(statuses)} shard(s) on "
            f"{len(nodes)} node(s)")
