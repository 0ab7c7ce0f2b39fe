"""Commits bounded in time: a kill of the job loses at most ``commit_seconds`` of compute.

A shard (``--shard-rows``) is the unit of length sorting and of the output's part files, and on
a slow model or a small machine one shard is minutes or hours of compute. So while a shard
computes, the rows it has finished are committed as *pieces* (writer.py) often enough that the
compute not yet committed never passes the bound, whatever the model, the corpus or the shard
size; a rerun reads the pieces and embeds only the rows they lack. The shard's batches keep their
order (the whole shard sorted by length), so committing costs a small write per commit and
nothing in the forward passes.

``CommitPolicy`` decides when: pure, with an injected clock, told each batch's duration and
each commit's write time. ``OpenShard`` holds one shard's rows while it computes: what earlier
runs committed, what finished since the last commit.

Why the policy commits when it does. Let ``s`` be the moment of the last commit's snapshot. A
kill at ``t`` loses the compute since ``s`` plus what the batches running at ``s`` had done
before it (at most one batch, ``step``). Commits are decided when a batch finishes, so the next
decision comes at most ``step`` later, and a commit is durable ``write`` seconds after its
snapshot. Committing as soon as ``now - s + 2 x step + write >= bound`` keeps every kill's loss
under the bound as long as batches take at most ``step`` (the longest of the recent ones) and a
write at most ``write`` (the last one's, and never less than 5% of the bound: the first write's
time is not known yet, and a busy machine delays a write); a batch longer than the bound is
committed alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Optional

import numpy as np

from floe.corpus.reader import CorpusError

RECENT_BATCHES = 16   # batch durations the policy keeps; their longest is the step it plans for
WRITE_MARGIN = 0.05   # share of the bound a commit's write is allowed at least


class CommitPolicy:
    """When to commit the finished rows so that a kill loses at most ``bound_s`` of compute.

    ``batch_done(seconds)`` after each forward pass: True when a commit is due now (the caller
    snapshots the finished rows, writes them, then calls ``committed``). Until then no other
    commit is asked for. ``restart()`` when nothing is left uncommitted (a new shard on a Ray
    actor that waited for it): idle time is not compute at risk. Thread-safe.
    """

    def __init__(self, bound_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not bound_s > 0:
            raise ValueError("the commit bound must be positive")
        self.bound = float(bound_s)
        self.clock = clock
        self.since = clock()          # the snapshot of the last commit (or the start)
        self.write_s = 0.0            # the last commit's write time
        self.recent: deque[float] = deque(maxlen=RECENT_BATCHES)
        self.pending: Optional[float] = None   # the snapshot time of a commit being written
        self.commits = 0
        self._lock = threading.Lock()

    @property
    def step(self) -> float:
        return max(self.recent, default=0.0)

    def at_risk(self) -> float:
        """Seconds of compute a kill now would lose, at most (the planning figure)."""
        with self._lock:
            return self.clock() - self.since + self.step

    def batch_done(self, seconds: float) -> bool:
        with self._lock:
            self.recent.append(max(0.0, float(seconds)))
            if self.pending is not None:
                return False
            now = self.clock()
            write = max(self.write_s, WRITE_MARGIN * self.bound)
            if now - self.since + 2 * self.step + write < self.bound:
                return False
            self.pending = now
            return True

    def committed(self, write_seconds: float) -> None:
        """The commit asked for by the last True of ``batch_done`` is durable."""
        with self._lock:
            if self.pending is not None:
                self.since = self.pending
            self.pending = None
            self.write_s = max(0.0, float(write_seconds))
            self.commits += 1

    def failed(self) -> None:
        """The commit could not be written: the next batch asks again."""
        with self._lock:
            self.pending = None

    def restart(self) -> None:
        with self._lock:
            if self.pending is None:
                self.since = self.clock()


class OpenShard:
    """One shard's pooled rows while it computes (rows in ``tok.good`` order).

    On creation it loads the rows earlier runs committed in pieces; ``todo`` are the positions
    (into ``tok.good``) still to embed. Whoever runs a batch fills ``pooled[idx]`` and then calls
    ``finished(idx)``; ``take_new()`` hands a commit the rows finished since the last one.
    """

    def __init__(self, tok, dim: int, work: str) -> None:
        from floe.corpus.writer import read_pieces

        self.tok = tok
        self.work = work
        self.index = tok.rows.shard.index
        keys = self.keys = tok.row_keys   # output rows: good rows, or chunks (chunked jobs)
        self.pooled = np.empty((len(keys), dim), dtype=np.float32)
        pos, vecs = read_pieces(work, self.index, dim)
        idx = np.searchsorted(keys, pos)
        if len(pos) and (idx.max() >= len(keys) or not np.array_equal(keys[idx], pos)):
            raise CorpusError(f"the committed pieces of shard {self.index} in {work} hold rows the "
                              "input does not embed: delete its _piece-* files to recompute them")
        self.pooled[idx] = vecs
        done = np.zeros(len(keys), dtype=bool)
        done[idx] = True
        self.todo = tok.units_of(done)   # units (sequences) with an output row still to compute
        # input rows an earlier run finished (the progress count); in a chunked job, the
        # documents whose every chunk is committed
        if tok.chunks is None:
            self.resumed = len(idx)
        else:
            docs = set(tok.chunks.input_index.tolist())
            self.resumed = len(docs - set(tok.chunks.input_index[~done].tolist()))
        self._new: list[np.ndarray] = []
        self._lock = threading.Lock()

    @property
    def n_tokens_todo(self) -> int:
        return int(self.tok.tokens.lengths[self.todo].sum())

    def finished(self, idx: np.ndarray) -> None:
        """Units (positions in ``tok.good`` order) whose rows are now in ``pooled``."""
        with self._lock:
            self._new.append(self.tok.rows_of(idx))

    def take_new(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(shard positions, pooled rows) finished since the last call, or None."""
        with self._lock:
            new, self._new = self._new, []
        if not new:
            return None
        idx = np.sort(np.concatenate(new))
        return self.keys[idx], self.pooled[idx]

    def commit_new(self) -> int:
        """Writes the rows finished since the last commit as a piece; returns how many."""
        from floe.corpus.writer import write_piece

        got = self.take_new()
        if got is None:
            return 0
        write_piece(self.work, self.index, *got)
        return len(got[0])


class ShardInFlight(OpenShard):
    """A shard's pooled rows as its batches fill them. Its batches are cut while earlier ones
    run, so the shard is complete when it is sealed (no more batches) and none is left;
    ``complete`` is set then, or at its first failed batch (``error``)."""

    def __init__(self, tok, dim: int, work: str) -> None:
        super().__init__(tok, dim, work)
        self.left = 0
        self.sealed = False
        self.written = False   # its part file is (being) written: no more pieces of it
        self.error: Optional[BaseException] = None
        self.complete = threading.Event()

    def add(self) -> None:
        with self._lock:
            self.left += 1

    def seal(self) -> bool:
        """No more batches; True when every batch has already finished."""
        with self._lock:
            self.sealed = True
            done = self.left == 0
        if done:
            self.complete.set()
        return done

    def batch_done(self, idx: np.ndarray) -> bool:
        """A batch's rows are in ``pooled``; True when that made the shard complete."""
        with self._lock:
            self._new.append(self.tok.rows_of(idx))
            self.left -= 1
            done = self.sealed and self.left == 0
        if done:
            self.complete.set()
        return done

    def run_batch(self, engine, batch, seqs: list, tuner) -> float:
        """Runs one of the shard's batches on ``engine`` into ``pooled``, reports it to the
        budget ``tuner`` (as dropped when it raises, and re-raises) and marks its rows finished;
        returns its seconds. The step every engine thread of both runners takes per batch."""
        t0 = time.perf_counter()
        try:
            self.pooled[self.tok.rows_of(batch.idx)] = self.tok.run(engine, batch.idx, seqs)
        except BaseException:
            tuner.record(batch, 0, None)
            raise
        dt = time.perf_counter() - t0
        tuner.record(batch, max(len(s) for s in seqs), dt)
        return dt

    def batch_failed(self, exc: BaseException) -> None:
        with self._lock:
            self.left -= 1
        self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """The shard cannot complete (its first error is kept): whoever waits for it wakes."""
        with self._lock:
            if self.error is None:
                self.error = exc
        self.complete.set()
