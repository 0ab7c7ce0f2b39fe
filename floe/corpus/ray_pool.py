"""The corpus job on Ray (``floe embed-corpus --ray [ADDRESS]``): a pool of embedding actors.

    the driver        one small item per shard still to do (index, row range, where it starts in
                      the input), handed to the actors, at most two queued per actor
    _EmbedActor x N   floe engines (one per GPU; on a CPU two per actor from 2 threads up),
                      spread over the nodes; each call is one shard: read it (floe's reader),
                      tokenize, length-sorted batches onto the actor's engines (engines.py, the
                      two queued calls' batches back to back), post step, then the write: the
                      shard's part file, atomic rename. While a shard computes, its finished rows are committed in pieces
                      within --commit-seconds (commit.py). It returns one small status row
    the driver        counts progress from the status rows, then finalizes (job.py)

The shards, the manifest, the part files, the pieces and the final step are the local path's
(reader.py, writer.py, commit.py), so the output is the same and a job can be resumed by either
path. The input and the output folder must be reachable at the same paths from every node that
runs an embedding actor (a shared file system). The model folder must be at the same path on
every node (the embedded default model is installed with floe).

Why plain Ray actors, not Ray Data. The job needs none of Ray Data's dataflow: each actor reads
its own shard (a read stage of Ray tasks started more worker processes, each importing pyarrow
and floe, beside the actors' engine load, and carried every text through the object store) and
writes it (an earlier write stage cost about 20 s a job on 2 cores). What was left of Ray Data
was its executor's start-up: on a 2-core machine, from ``map_batches`` to a trivial actor being
ready took 9.6 s where a plain actor answered its first call 0.3 s after its creation, in the
same fresh Ray instance (docs/scale-out.md, "Ray's fixed cost"). Fault tolerance is Ray's own
and the same as Ray Data gave: the actors restart without limit (``max_restarts=-1``) on a node
with room, and their calls are retried (``max_task_retries=-1``).

Node loss: the restarted actor's retried call finds the pieces the dead actor committed and
embeds only the rest, and a shard whose part file exists is not embedded again. Ray Data's
``write_parquet`` would not do: it has no notion of which rows were already written, so it cannot
resume a job exactly once.
"""

from __future__ import annotations

import time

# In an actor's worker process this module is imported when the actor's class is unpickled, at
# the start of its creation task: the fixed cost's profile (fixed_cost) times the imports from it
_IMPORTED_AT = time.time()

import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from typing import Optional

from floe.corpus.commit import CommitPolicy, ShardInFlight
from floe.corpus.cores import background_thread, cpu_engines, warm_up
from floe.corpus.embed import CorpusOptions
from floe.corpus.engines import EnginePool
from floe.corpus.plan import Plan
from floe.corpus.progress import Progress, fixed_cost
from floe.corpus.reader import CorpusError, Shard, Source
from floe.resolve import core_count

log = logging.getLogger("floe.corpus")

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise CorpusError('--ray needs Ray: pip install "floe[ray]"') from exc


# --- shards -----------------------------------------------------------------------------------

def shard_items(shards: list[Shard]) -> list[dict]:
    """One item per shard; the locator (format-specific) travels as JSON."""
    return [{"shard": s.index, "start": s.start, "end": s.end, "locator": json.dumps(s.locator)}
            for s in shards]


def _shard_of(item: dict) -> Shard:
    return Shard(int(item["shard"]), int(item["start"]), int(item["end"]), json.loads(item["locator"]))


# --- embed (actors) ---------------------------------------------------------------------------

class _EmbedActor:
    """One floe engine, its tokenizer and the job's embedding step; one call per shard.

    The actor reads its shard, commits it (part file, atomic rename; pieces while it computes)
    and returns one status row per shard: neither texts nor embeddings travel through the object
    store, and no separate read or write task (a Ray worker process importing pyarrow and floe)
    competes with the engine. The status rows carry wall-clock times (the actor's start, each
    shard's) from which the driver logs where a job's fixed cost went."""

    def __init__(self, model: str, options: dict, replicas, device: str, dtype: str,
                 threads: int, batch_tokens: Optional[int], max_batch_size: int, work: str,
                 manifest: dict, source: Source, commit_seconds: float) -> None:
        t0 = time.time()
        # when this worker process started (before the job, for one Ray prestarted) and when the
        # actor's creation reached it (this module's import: unpickling the class)
        try:
            import psutil

            self.process_at = psutil.Process().create_time()
        except Exception:  # noqa: BLE001 - the profile only
            self.process_at = t0
        self.imported_at = _IMPORTED_AT
        from concurrent.futures import ThreadPoolExecutor

        from floe.config import ModelSettings
        from floe.corpus.budget import tuner_for
        from floe.corpus.embed import ShardEmbedder
        from floe.corpus.writer import schema_for
        from floe.engine import engine_for
        from floe.models import load_spec
        from floe.tokenize import Tokenizer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # One tokenizer call per pool thread, as on the local path: the Rust library's own
        # threads run at the engine's priority and spin between calls
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        spec = load_spec(ModelSettings(model=model))
        # The job's engine section, read once by its command line (the fake engine's simulated
        # costs, the converted-model cache), as the local path's engines get it.
        # On a CPU the actor's threads run as cpu_engines() engines (two from 2 threads up), as
        # the local path's workers do: 2 x 1 thread ran 1.13x 1 x 2 threads on 2 cores.
        # OpenVINO pins a stream's threads to cores, counting from the first core it may use:
        # two engines in one process, or two 1-thread actors on one node, would all pin to core
        # 0 and run at one core's rate. Engines that do not have all of the node's cores leave
        # their threads unpinned.
        gpu = device.startswith("cuda")
        n = 1 if gpu else cpu_engines(threads)
        share = not gpu and (n > 1 or threads < core_count())
        self.engines = [engine_for(spec, replicas, device=device, dtype=dtype,
                                   threads=max(1, threads // n), share_cores=share)
                        for _ in range(n)]
        warm_up(self.engines, spec)
        # each actor measures its own budget (its engine, its cores) unless one is given
        tuner = tuner_for(spec, batch_tokens, max_batch_size, gpu)
        self.embedder = ShardEmbedder(spec, Tokenizer(spec), CorpusOptions(**options), tuner)
        # the Rust tokenizer releases the GIL: a shard's chunks tokenize on the actor's cores, at
        # a lower priority than the forward pass (cores.py)
        self.tokenize_pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="floe-tokenize",
                                                initializer=background_thread)
        # The actor runs QUEUED calls at once (a threaded actor): the next shard is read and
        # tokenized while this one computes, and its batches follow this one's on the engines
        self.engine_pool = EnginePool(self.engines, self.embedder, CommitPolicy(commit_seconds))
        self.work = work
        self.schema = schema_for(manifest)
        self.source = source
        self.dim = spec.dim
        self.ready_at = time.time()
        self.init_s = self.ready_at - t0
        self.node = ray.get_runtime_context().get_node_id()[:12]

    def _shard(self, shard: Shard) -> tuple[int, int, int]:
        """Embeds and commits one shard; returns (rows, tokens, skipped) new in this call."""
        from floe.corpus.writer import drop_pieces, part_name, write_part

        if os.path.exists(os.path.join(self.work, part_name(shard.index))):
            return 0, 0, 0   # a retried call whose first try committed the shard
        rows = self.source.read(shard)
        tok = self.embedder.tokenize(rows, self.tokenize_pool)
        state = ShardInFlight(tok, self.dim, self.work)
        self.engine_pool.embed(state)
        # the part file is written while the next shard computes
        table, skipped_rows = self.embedder.result_table(tok, state.pooled)
        write_part(self.work, shard.index, table, skipped_rows, self.schema)
        drop_pieces(self.work, shard.index)
        return shard.rows - state.resumed, state.n_tokens_todo, len(skipped_rows)

    def embed_shard(self, item: dict) -> dict:
        """Embeds and commits one shard (``shard_items``); returns its status row."""
        shard = _shard_of(item)
        started = time.time()
        error, rows, tokens, skipped = None, 0, 0, 0
        try:
            rows, tokens, skipped = self._shard(shard)
        except CorpusError as exc:  # --on-error fail, or non-finite output: nothing written
            error = str(exc)
        return {"shard": shard.index, "rows": int(rows), "tokens": int(tokens),
                "skipped": int(skipped), "error": error, "node": self.node,
                "init_s": self.init_s, "process_at": self.process_at,
                "imported_at": self.imported_at, "ready_at": self.ready_at,
                "started_at": started, "ended_at": time.time()}


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
        cluster = ray.cluster_resources()
        cpus = float(cluster.get("CPU", 1))
        gpus = float(cluster.get("GPU", 0))
        use_gpu = job.device.startswith("cuda") or (job.device == "auto" and gpus >= 1)
        n = job.workers
        threads = job.threads or max(1, int(cpus // n))
        # Logical CPUs reserved per actor: its threads, within the cluster's share per actor
        reserve = max(0.25, min(float(threads), cpus / n))
        log.info("Ray: %d actor(s), %d thread(s) each, %s; cluster %s", n, threads,
                 "1 GPU each" if use_gpu else "CPU", {k: v for k, v in cluster.items()
                                                       if k in ("CPU", "GPU", "memory")})
        actor = ray.remote(_EmbedActor).options(
            num_cpus=reserve, num_gpus=1 if use_gpu else 0, scheduling_strategy="SPREAD",
            # a node lost: the actor starts again where there is room, its calls are retried
            max_restarts=-1, max_task_retries=-1, max_concurrency=QUEUED)
        kwargs = dict(
            model=plan.spec.path, options=plan.embedder.options.to_json(),
            replicas=dataclasses.replace(job.replicas, engine=job.engine or "auto"),
            device="cuda" if use_gpu else job.device,
            dtype=job.dtype, threads=threads, batch_tokens=job.batch_tokens,
            max_batch_size=job.max_batch_size, work=plan.output.work,
            manifest=plan.manifest, source=plan.source,
            commit_seconds=job.corpus.commit_seconds)
        pool = [actor.remote(**kwargs) for _ in range(min(n, len(plan.pending)))]
        statuses = []
        try:
            for row in _dispatch(pool, shard_items(plan.pending)):
                if row["error"]:
                    raise CorpusError(row["error"])
                progress.update(row["rows"], row["tokens"], row["skipped"])
                statuses.append(row)
        finally:
            for a in pool:
                ray.kill(a)
        log.info("%s", fixed_cost(statuses, t_start, t_connected))
    finally:
        if started:
            ray.shutdown()


QUEUED = 2   # calls queued per actor: its next shard is there when one ends


def _dispatch(pool: list, items: list[dict]):
    """Yields the status rows of ``items`` (in completion order), each actor holding at most
    QUEUED calls. A call to an actor that died is retried by Ray once it restarts."""
    todo = iter(items)
    running: dict = {}
    for a in pool:
        for item in itertools.islice(todo, QUEUED):
            running[a.embed_shard.remote(item)] = a
    while running:
        done, _ = ray.wait(list(running), num_returns=1)
        a = running.pop(done[0])
        row = ray.get(done[0])
        item = next(todo, None)
        if item is not None:
            running[a.embed_shard.remote(item)] = a
        yield row
