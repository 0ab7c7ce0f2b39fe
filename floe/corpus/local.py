"""The corpus job in one process: reading, tokenizing, compute and writing overlap.

Threads and who owns what
-------------------------
* **the reader** (a one-thread pool) reads shard k+1 and k+2 and tokenizes them, spreading each
  shard over the **tokenizer pool** (the Rust tokenizer releases the GIL), while shard k computes.
* **the main thread** takes tokenized shards in order, cuts each into length-sorted batches and
  puts them on a bounded queue (back-pressure: at most two batches per worker wait). On a CPU the
  first shard's batches measure the budget (budget.py): after the trial batches the main thread
  waits, moments, for their timings before cutting the rest.
* **N engine workers**, one engine each, take batches, run ``prepare`` + ``run``, report trial
  batches' times to the tuner and write the pooled rows into their shard's array; the worker that
  finishes a shard's last batch hands the shard to **the writer**. Each batch's duration goes to
  the commit policy (commit.py); the worker whose batch makes a commit due hands one to the writer.
* **the writer** (a one-thread pool) post-processes the shard, writes its part file (atomic
  rename), removes its pieces and counts progress; a commit writes, per open shard, the rows
  finished since the last one as a piece (the shard's array is read, not copied, under no lock:
  rows are written once, before they are reported finished).

On CPU the workers split the compute threads (``--threads``, default all cores) between them,
unpinned (OpenVINO pins a stream's threads to cores, and engines in one process would all pin to
the same ones: two 1-thread workers measured one core's throughput); on several GPUs worker i runs
on GPU i mod count. The first failure stops the job: queued batches
are dropped, shards already committed stay for the rerun.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional


from floe.corpus.commit import CommitPolicy, ShardInFlight
from floe.corpus.cores import background_thread, warm_up
from floe.corpus.embed import Tokenized
from floe.corpus.plan import Plan
from floe.corpus.progress import Progress
from floe.corpus.writer import drop_pieces
from floe.resolve import core_count

log = logging.getLogger("floe.corpus")

READ_AHEAD = 2   # shards read and tokenized ahead of the one computing


def _worker_devices(device: str, n: int) -> list[str]:
    if n > 1 and device.startswith("cuda") and ":" not in device:
        import torch

        count = max(1, torch.cuda.device_count())
        return [f"cuda:{i % count}" for i in range(n)]
    return [device] * n


def make_engines(plan: Plan) -> list:
    from floe.engine import engine_for

    job = plan.job
    threads = job.threads or core_count()
    share = max(1, threads // job.workers)
    # the job's engine section (read once from the settings tree by its command line: the fake
    # engine's simulated costs, the converted-model cache) with the job's engine kind
    section = dataclasses.replace(job.replicas, engine=job.engine or "auto")
    engines = [engine_for(plan.spec, section, device=dev, dtype=job.dtype, threads=share,
                          share_cores=job.workers > 1)
               for dev in _worker_devices(job.device, job.workers)]
    warm_up(engines, plan.spec)
    e = engines[0]
    log.info("%d engine worker(s): %s on %s in %s, %d thread(s) each", len(engines),
             type(e).__name__, e.device, e.dtype, share)
    return engines


class _Pipeline:
    def __init__(self, plan: Plan, progress: Progress) -> None:
        self.plan = plan
        self.progress = progress
        self.engines: list = []
        self.embedder = plan.embedder
        job = plan.job
        # One tokenizer call per pool thread: the Rust library's own threads would run at the
        # engine's priority and spin between calls (TOKENIZERS_PARALLELISM=false, as in a server).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tok_threads = job.tokenize_threads or max(1, min(8, core_count()))
        self.tok_pool = ThreadPoolExecutor(tok_threads, thread_name_prefix="floe-corpus-tok",
                                           initializer=background_thread)
        self.read_pool = ThreadPoolExecutor(1, thread_name_prefix="floe-corpus-read",
                                            initializer=background_thread)
        self.write_pool = ThreadPoolExecutor(1, thread_name_prefix="floe-corpus-write",
                                             initializer=background_thread)
        self.work: queue.Queue = queue.Queue(maxsize=2 * max(1, plan.job.workers))
        self.error: Optional[BaseException] = None
        self._err_lock = threading.Lock()
        self.writes: list[Future] = []
        self._writes_lock = threading.Lock()
        self.policy = CommitPolicy(job.corpus.commit_seconds)
        self.open: list[ShardInFlight] = []   # shards computing, in order (the writer's to edit)
        self._open_lock = threading.Lock()

    def fail(self, exc: BaseException) -> None:
        with self._err_lock:
            if self.error is None:
                self.error = exc

    # --- stages ---------------------------------------------------------------------------------

    def _read(self, shard) -> Tokenized:
        rows = self.plan.source.read(shard)
        return self.embedder.tokenize(rows, self.tok_pool)

    def _worker(self, engine) -> None:
        tuner = self.embedder.tuner
        while True:
            item = self.work.get()
            if item is None:
                return
            state, batch, seqs = item
            if self.error is not None:
                tuner.record(batch, 0, None)
                continue  # the job failed: drop queued work
            try:
                dt = state.run_batch(engine, batch, seqs, tuner)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                self.fail(exc)
                continue
            complete = state.batch_done(batch.idx)
            if self.policy.batch_done(dt):
                self._submit(self._commit)
            if complete:
                self._submit(self._write, state)

    def _submit(self, fn, *args) -> None:
        fut = self.write_pool.submit(fn, *args)
        fut.add_done_callback(lambda f: f.exception() and self.fail(f.exception()))
        with self._writes_lock:
            self.writes.append(fut)

    def _commit(self) -> None:
        """Writes the rows finished since the last commit, one piece per open shard."""
        if self.error is not None:
            self.policy.failed()
            return
        t0 = time.perf_counter()
        try:
            with self._open_lock:
                states = [s for s in self.open if not s.written]
            for state in states:
                state.commit_new()
        except BaseException:
            self.policy.failed()
            raise
        self.policy.committed(time.perf_counter() - t0)

    def _write(self, state: ShardInFlight) -> None:
        with self._open_lock:
            state.written = True
            self.open.remove(state)
        if self.error is not None:
            return
        tok = state.tok
        table, skipped = self.embedder.result_table(tok, state.pooled)
        out = self.plan.output
        out.write_shard(tok.rows.shard.index, table, skipped)
        drop_pieces(out.work, tok.rows.shard.index)
        self.progress.update(tok.rows.shard.rows - state.resumed, state.n_tokens_todo, len(skipped))

    # --- driver ---------------------------------------------------------------------------------

    def start_reading(self) -> None:
        """Starts reading and tokenizing the first shards (before the engines are loaded)."""
        self._pending = iter(self.plan.pending)
        self._ahead: deque[Future] = deque()
        for shard in self._pending:
            self._ahead.append(self.read_pool.submit(self._read, shard))
            if len(self._ahead) >= READ_AHEAD:
                break

    def run(self, engines: list) -> None:
        self.engines = engines
        workers = [threading.Thread(target=self._worker, args=(e,), name=f"floe-corpus-engine-{i}",
                                    daemon=True) for i, e in enumerate(self.engines)]
        self.policy.restart()   # compute starts now: the engines' load was not at risk
        for t in workers:
            t.start()
        pending, ahead = self._pending, self._ahead
        try:
            while ahead and self.error is None:
                tok = ahead.popleft().result()
                nxt = next(pending, None)
                if nxt is not None:
                    ahead.append(self.read_pool.submit(self._read, nxt))
                state = ShardInFlight(tok, self.plan.spec.dim, self.plan.output.work)
                with self._open_lock:
                    self.open.append(state)
                for batch, seqs in self.embedder.batches(tok, state.todo):
                    if self.error is not None:
                        self.embedder.tuner.record(batch, 0, None)
                        continue  # report the rest of the trial, if any, as dropped
                    state.add()
                    self.work.put((state, batch, seqs))
                if state.seal() and self.error is None:
                    self._submit(self._write, state)
        except BaseException as exc:
            self.fail(exc)
        finally:
            self.embedder.tuner.abandon()
            for _ in workers:
                self.work.put(None)
            for t in workers:
                t.join()
            for f in ahead:
                f.cancel()
            self.read_pool.shutdown(wait=True, cancel_futures=True)
            self.write_pool.shutdown(wait=True)
            self.tok_pool.shutdown(wait=True, cancel_futures=True)
        if self.error is not None:
            raise self.error


def run_local(plan: Plan, progress: Progress) -> None:
    pipeline = _Pipeline(plan, progress)
    pipeline.start_reading()  # the first shards read and tokenize while the model loads
    try:
        engines = make_engines(plan)
    except BaseException:
        pipeline.fail(RuntimeError("the engine could not be created"))
        pipeline.read_pool.shutdown(wait=True, cancel_futures=True)
        pipeline.tok_pool.shutdown(wait=True, cancel_futures=True)
        pipeline.write_pool.shutdown(wait=True)
        raise
    pipeline.run(engines)
