"""A Ray actor's engines, fed one shard after another with no gap between them.

An actor takes up to ``QUEUED`` shards at once (ray_pool.py): each call reads and tokenizes its
shard, then hands it here and waits. The shards' batches go onto one queue, cut one shard at a
time (the budget tuner's generator); every engine has a thread that takes the next batch as it
ends one, whichever shard it belongs to. So the next shard's first batches run while the last
batches of the one before finish, as on the local path (local.py), instead of one engine waiting
for the other at the end of every shard. Each batch's time goes to the commit policy; a commit
writes, per shard in flight, its rows finished since the last one as a piece (commit.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from floe.corpus.commit import CommitPolicy, ShardInFlight
from floe.corpus.embed import ShardEmbedder

log = logging.getLogger("floe.corpus")


class EnginePool:
    def __init__(self, engines: list, embedder: ShardEmbedder, policy: CommitPolicy) -> None:
        self.embedder = embedder
        self.policy = policy
        self.batches: queue.Queue = queue.Queue(maxsize=2 * len(engines))
        self._feeding = threading.Lock()   # one shard's batches are cut at a time
        self._open: list[ShardInFlight] = []
        self._open_lock = threading.Lock()   # held by a commit: a shard leaves after its pieces
        self._threads = [threading.Thread(target=self._engine_loop, args=(e,), daemon=True,
                                          name=f"floe-corpus-engine-{i}")
                         for i, e in enumerate(engines)]
        for t in self._threads:
            t.start()

    def embed(self, state: ShardInFlight) -> None:
        """Runs the shard's batches still to do (``state.todo``) into ``state.pooled``; returns
        when every one has, or raises the first batch's error."""
        with self._open_lock:
            if not self._open:
                self.policy.restart()   # nothing was at risk while no shard was in flight
            self._open.append(state)
        try:
            with self._feeding:
                for batch, seqs in self.embedder.batches(state.tok, state.todo):
                    if state.error is not None:
                        self.embedder.tuner.record(batch, 0, None)   # a trial batch never run
                        continue
                    state.add()
                    self.batches.put((state, batch, seqs))
                state.seal()
            state.complete.wait()
        finally:
            with self._open_lock:
                self._open.remove(state)
        if state.error is not None:
            raise state.error

    def close(self) -> None:
        for _ in self._threads:
            self.batches.put(None)
        for t in self._threads:
            t.join()

    def _engine_loop(self, engine) -> None:
        tuner = self.embedder.tuner
        while True:
            item = self.batches.get()
            if item is None:
                return
            state, batch, seqs = item
            if state.error is not None:   # its shard failed: drop the rest of it
                tuner.record(batch, 0, None)
                state.batch_failed(state.error)
                continue
            try:
                dt = state.run_batch(engine, batch, seqs, tuner)
            except BaseException as exc:  # noqa: BLE001 - raised by the shard's call
                state.batch_failed(exc)
                continue
            state.batch_done(batch.idx)
            if self.policy.batch_done(dt):
                self._commit()

    def _commit(self) -> None:
        """Writes every shard in flight's rows finished since the last commit, one piece each.
        A failed write fails those shards' calls (the rows stay to compute on a retry)."""
        t0 = time.perf_counter()
        with self._open_lock:
            try:
                for state in self._open:
                    state.commit_new()
            except BaseException as exc:  # noqa: BLE001 - raised by the shards' calls
                self.policy.failed()
                log.error("corpus: a commit failed: %s", exc)
                for state in self._open:
                    state.fail(exc)
                return
        self.policy.committed(time.perf_counter() - t0)
