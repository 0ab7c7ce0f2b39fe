"""The replica's loop as a plain class: tests drive it in-process, main.py wraps it in a server.

Threads and who owns what
-------------------------
* **asyncio callers** (``submit``) validate a request, check admission and append it to an inbox
  under ``_cv``; then they await a future. They never touch the Scheduler.
* **the scheduler thread** owns the ``Scheduler``: it moves inbox requests into it, forms batches
  and runs ``engine.prepare`` for the next batch while the engine thread runs the current one
  (pipelining), then hands the prepared batch over through a one-slot handoff.
* **the engine thread** runs ``engine.forward`` on the slot's batch and hands its output to the
  finisher, then takes the next batch at once (at most two outputs wait for the finisher: an
  engine whose forward returns before the device is done cannot run ahead without bound).
* **the finisher thread** runs ``engine.finish`` (the output as host rows: a GPU's copy, while the
  next forward runs), stores each output row in its request as the model's kind keeps rows
  (floe/kinds/: float rows, or a sparse model's non-zero entries), and when a request's last row
  arrives runs the kind's per-request steps (normalize, Matryoshka slice, output dtype:
  ``Kind.finish``) and completes it. The event loop only wakes the
  awaiting task: no per-request array work runs on it, and none delays the next forward pass.

Nobody polls: every wait is a ``Condition.wait`` woken by an arrival, a free slot, a finished
forward pass, or a timeout derived from ``Scheduler.next_deadline``. The three waiters (the
scheduler thread, the engine thread, ``stop`` draining) share one lock but have a condition each,
so an event wakes only the thread it concerns: with small requests every needless wake-up is a
context switch and a GIL hand-over per request.

Failure isolation: an exception in ``prepare`` or ``run`` fails only the requests of that batch
(InternalError, logged with its traceback); a non-finite output row fails only its request.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import psutil

from floe.config import BatchSettings
from floe.engine import packing
from floe.engine.base import Engine
from floe.errors import (DeadlineError, FloeError, InternalError, OverloadedError, TooLargeError,
                         UnavailableError, CancelledError as FloeCancelled)
from floe.kinds import kind_of
from floe import validate
from floe.protocol import EmbedResult, EncodeOptions, Timings, TokenBatch
from floe.proto import floe_pb2
from floe.replica.admission import AdmissionPolicy, refusal_message, wall_factor
from floe.replica.cost import CostModel
from floe.replica.histograms import HISTOGRAMS, Histogram
from floe.replica.scheduler import DEFAULT_MAX_WAIT_S, Scheduler, Sequence
from floe.replica.tuning import Knobs, Tuner, Window
from floe.resolve import GPU_BATCH_TOKENS

# The largest budget the tuner may choose (a GPU's default; a CPU's cost model never asks for it)
MAX_TUNED_BUDGET = GPU_BATCH_TOKENS

# How often the tuner looks at the load (floe/replica/tuning.py): long enough to hold a few
# batches at any load, short enough to follow a step within seconds.
TUNE_WINDOW_S = 1.0

log = logging.getLogger("floe.replica")

@dataclass(eq=False)
class _Request:
    """One submitted request. After submit, only the engine thread writes its results."""

    key: int
    request_id: str
    tokens: TokenBatch
    options: EncodeOptions
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    submitted: float
    rows: Any                   # its output rows as the model's kind keeps them (Kind.new_rows)
    remaining: int              # sequences not yet stored
    queue_s: float = 0.0
    forward_from: float = float("inf")   # the wall span its batches' forwards covered (they
    forward_until: float = 0.0           # overlap when pipelined: a sum could pass its total)
    error: Optional[FloeError] = None
    result: Optional[EmbedResult] = None   # set by the finisher before it completes the request
    dropped: bool = False   # cancelled or aborted: results are discarded
    done: bool = False
    handed_back: Optional[np.ndarray] = None   # items given back uncomputed (hand_back)


@dataclass(eq=False)
class _HandedBack:
    """Items of a request the scheduler thread took out of the queue and handed back: the
    finisher, the only writer of ``remaining`` once a request is queued, counts them done."""
    req: _Request
    items: np.ndarray


@dataclass
class _Batch:
    number: int
    seqs: list[Sequence]
    formed_at: float
    prepared: Any = None
    error: Optional[BaseException] = None
    predicted_s: float = 0.0    # the cost model's forward seconds for it
    shape: tuple[int, int] = (0, 0)   # (rows, width) of its forward pass (packed or padded)


class ReplicaCore:
    """Dynamic batching in front of one Engine. ``start()`` it, ``await submit(...)``, ``stop()``."""

    def __init__(self, engine: Engine, batch: BatchSettings, replica_id: str = "0",
                 max_wait_s: float = DEFAULT_MAX_WAIT_S, cost: Optional[CostModel] = None) -> None:
        self.engine = engine
        self.spec = engine.spec
        self.settings = batch
        self.replica_id = replica_id
        self.kind = kind_of(self.spec)
        from floe.resolve import resolve_batch

        # The budget and the fill floor arrive settled (floe/resolve.py: by the replica manager,
        # a standalone replica's main, the Ray Serve deployment); a core built without them (the
        # tests) gets the same defaults for its engine's device.
        batch = self.settings = resolve_batch(batch, str(engine.device).startswith("cuda"),
                                              engine.spec.max_seq_length)
        self.min_fill = batch.min_batch_fill
        # The cost model (calibrated at start-up by main.py; learnt from the first batches when
        # none is given), what admission predicts with, and the tuner that moves the knobs.
        self.cost = cost if cost is not None else CostModel()
        # An engine that packs short inputs into shared rows (floe/engine/packing.py) gets packed
        # batches where the cost model says they are cheaper per token than padded ones.
        self._sched = Scheduler(batch.max_batch_tokens, batch.max_batch_size,
                                batch.batch_timeout_ms / 1000.0, max_wait_s, min_fill=self.min_fill,
                                pack_align=engine.packing, cost=self._batch_cost)
        target_s = None if batch.latency_target_ms is None else batch.latency_target_ms / 1000.0
        self.admission = AdmissionPolicy(target_s, batch.max_queue_ms / 1000.0)
        self.knobs = Knobs(batch.max_batch_tokens, batch.batch_timeout_ms / 1000.0, self.min_fill)
        self.tuner = (Tuner(self.knobs, min_budget=engine.spec.max_seq_length,
                            max_budget=max(batch.max_batch_tokens, MAX_TUNED_BUDGET),
                            max_batch_size=batch.max_batch_size, target_s=target_s)
                      if batch.tuning else None)
        self._fill = 0.9               # moving padding fill of recent batches (admission's guess)
        self._running_until = 0.0      # predicted end of the forward pass running now
        self._forming_s = 0.0          # predicted seconds of the batch being prepared
        self._forming_shape = (0, 0)   # and its forward pass's (rows, width)
        lock = threading.Lock()
        self._cv = threading.Condition(lock)         # the scheduler thread waits on it
        self._engine_cv = threading.Condition(lock)  # the engine thread waits for the slot
        self._drain_cv = threading.Condition(lock)   # stop() waits for in-flight requests
        # --- guarded by lock (any of the three conditions) ---
        self._inbox: list[tuple[str, Any]] = []    # ("add", req), ("drop", key), ("hand_back", ..)
        self._handed: list[_HandedBack] = []       # taken out, not yet given to the finisher
        self._slot: Optional[_Batch] = None        # prepared batch waiting for the engine
        self._running = False                      # engine thread inside engine.run
        self._forming = False                      # scheduler thread preparing a batch
        self._queued_tokens = 0                    # admitted, not yet in a formed batch
        self._queued_seqs = 0
        self._requests: dict[int, _Request] = {}   # in flight, by key
        self._by_id: dict[str, list[_Request]] = {}
        self._accepting = False
        self._stopping = False
        self._next_key = 0
        # --- guarded by _stats_lock ---
        self._stats_lock = threading.Lock()
        self._c = dict(requests=0, failed_requests=0, sequences=0, tokens=0, padded_tokens=0,
                       batches=0, dropped_sequences=0, refused_requests=0, expired_requests=0,
                       tuning_changes=0, packed_batches=0)
        self._busy_s = 0.0   # forward and finish seconds of every batch so far (the tuner's load)
        self._idle_s = 0.0   # seconds the engine thread waited for a batch (waits that ended)
        self._idle_since: Optional[float] = None   # when its current wait began (guarded by lock)
        self._predicted_run_s = 0.0   # the cost model's seconds for the batches run so far
        # Wall seconds per predicted second while the engine has work: the cost model times the
        # forward pass, and a replica sharing its cores (the front end, other replicas, its own
        # prepare and finish threads) drains its queue slower than its passes add up to.
        # Admission predicts with it (1: no evidence yet).
        self.wall_factor = 1.0
        self._hist = {name: Histogram(b) for name, b in HISTOGRAMS.items()}
        self._threads: list[threading.Thread] = []
        # engine thread -> finisher: (batch, output, seconds, error); None ends the finisher
        self._finish_q: queue.Queue = queue.Queue(maxsize=2)
        self._proc = psutil.Process()

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        with self._cv:
            if self._threads:
                return
            self._accepting = True
            self._stopping = False
        self._threads = [
            threading.Thread(target=self._scheduler_loop, name=f"floe-sched-{self.replica_id}",
                             daemon=True),
            threading.Thread(target=self._engine_loop, name=f"floe-engine-{self.replica_id}",
                             daemon=True),
            threading.Thread(target=self._finish_loop, name=f"floe-finish-{self.replica_id}",
                             daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def ready(self) -> bool:
        return (self._accepting and not self._stopping and len(self._threads) == 3
                and all(t.is_alive() for t in self._threads))

    def stop(self, drain_timeout: float = 0.0) -> bool:
        """Refuses new requests, waits up to ``drain_timeout`` s for in-flight ones, then stops.

        Requests still in flight after the drain fail with UnavailableError. Returns True when
        everything in flight finished. Blocking: call it from a thread when a loop is running.
        """
        deadline = time.monotonic() + max(0.0, drain_timeout)
        with self._cv:
            self._accepting = False
            while self._requests:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._drain_cv.wait(left)
            drained = not self._requests
            self._stopping = True
            leftovers = list(self._requests.values())
            self._cv.notify_all()
            self._engine_cv.notify_all()
        for t in self._threads:
            t.join(timeout=10.0)
        for req in leftovers:
            self._complete(req, UnavailableError("replica is shutting down"))
        return drained

    # --- requests -------------------------------------------------------------------------

    def _assert_invariants(self, tokens: TokenBatch, options: EncodeOptions) -> None:
        # a violation would reach the model (an out-of-vocabulary id can poison a CUDA
        # context); it is a bug upstream, so an internal error, not a 400
        if not validate.invariants_hold(self.spec, self.kind, tokens, options):
            log.error("request violates the replica's invariants (validation missed it): %d "
                      "items, lengths %s..%s", tokens.n, tokens.lengths.min(initial=0),
                      tokens.lengths.max(initial=0))
            raise InternalError("the request reached the model without validation")

    async def submit(self, tokens: TokenBatch, options: EncodeOptions, request_id: str) -> EmbedResult:
        """Embeds one request's token ids; applies normalize, dimensions and output dtype.

        The caller validated the request (floe/validate.py). Raises OverloadedError (queue full),
        TooLargeError (more tokens than the queue holds at all), UnavailableError (not started or
        stopping) and InternalError (engine failure, non-finite output, broken invariant). Cancelling
        the awaiting task drops the request's still-queued sequences.
        """
        t0 = time.monotonic()
        self._assert_invariants(tokens, options)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        n_tokens = tokens.total_tokens
        with self._cv:
            if not self._accepting or self._stopping:
                raise UnavailableError("replica is not accepting requests")
            if n_tokens > self.settings.max_queued_tokens:
                raise TooLargeError(
                    f"request has {n_tokens} tokens, more than this replica queues at once "
                    f"({self.settings.max_queued_tokens})", param="input")
            if self._queued_tokens + n_tokens > self.settings.max_queued_tokens:
                self._count("refused_requests")
                raise OverloadedError(
                    f"replica {self.replica_id} queue is full ({self._queued_tokens} tokens "
                    "waiting), retry later", retry_after=1.0)
            decision = self.admission.decide(
                t0, self._ahead_s(t0), self._drain_s(n_tokens, tokens.n) * self.wall_factor,
                options.deadline)
            if not decision.admit:
                self._count("refused_requests")
                raise OverloadedError(refusal_message(decision), retry_after=decision.retry_after_s)
            key, self._next_key = self._next_key, self._next_key + 1
            req = _Request(key=key, request_id=request_id, tokens=tokens, options=options,
                           loop=loop, future=fut, submitted=t0,
                           rows=self.kind.new_rows(self.spec, _rows(tokens)),
                           remaining=tokens.n)
            self._requests[key] = req
            self._by_id.setdefault(request_id, []).append(req)
            self._queued_tokens += n_tokens
            self._queued_seqs += tokens.n
            self._inbox.append(("add", req))
            self._cv.notify()
        try:
            await fut
        except asyncio.CancelledError:
            # the client went away: queued sequences are dropped before compute
            self._drop(req)
            self._complete(req, FloeCancelled(f"request {request_id} was cancelled"))
            raise
        if req.error is not None:
            raise req.error
        result = req.result
        result.timings.total_s = time.monotonic() - t0
        return result

    def _drain_s(self, tokens: int, sequences: int) -> float:
        """Predicted seconds to run this much queued work at the current knobs."""
        return self.cost.drain_seconds(tokens, sequences, self._sched.max_batch_tokens,
                                       self._sched.max_batch_size, self._fill)

    def _ahead_s(self, now: float) -> float:
        """Predicted seconds until the work admitted so far is done: the running pass, the
        prepared and the preparing ones, the queue. Called with the lock held."""
        ahead = max(0.0, self._running_until - now) + self._forming_s
        if self._slot is not None:
            ahead += self._slot.predicted_s
        return (ahead + self._drain_s(self._queued_tokens, self._queued_seqs)) * self.wall_factor

    def _count(self, counter: str, n: int = 1) -> None:
        with self._stats_lock:
            self._c[counter] += n

    def abort(self, request_id: str) -> bool:
        """Cancels every in-flight request with this id; its awaiting caller gets CancelledError
        (the FloeError). Returns False when no such request is in flight."""
        with self._cv:
            reqs = list(self._by_id.get(request_id, ()))
        for req in reqs:
            self._drop(req)
            self._complete(req, FloeCancelled(f"request {request_id} was aborted"))
        return bool(reqs)

    async def hand_back(self, request_ids: list[str], max_tokens: int,
                        min_tokens: int = 1) -> list[tuple[str, np.ndarray]]:
        """Takes queued sequences of these requests (the asker's, most recent first) out of the
        queue, up to ``max_tokens`` and half the queued tokens (none if that is under
        ``min_tokens``); returns (request id, items) for each that gave any, and answers it
        without them (``EmbedResult.handed_back``). floe/fleet/router.py, "Handing back"."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            if not self._accepting or self._stopping:
                return []   # stopping: what is queued here is computed here or fails here
            self._inbox.append(("hand_back", (request_ids, max_tokens, max(1, min_tokens), loop, fut)))
            self._cv.notify()
        return await fut

    def _take_back(self, request_ids: list[str], max_tokens: int, min_tokens: int) -> list:
        # scheduler thread, _cv held. Late chunking's and sparse rows stay. The batch prepared
        # but not started is most of a wave's end: its inputs go back to the queue, to share.
        slot = self._slot if self._slot is not None and self._slot.error is None else None
        slot_tokens = sum(s.length for s in slot.seqs) if slot and slot.seqs[0].group == 0 else 0
        # half of all it holds goes, counting the running pass's rest (in tokens) as held
        per_token, movable = self.cost.coefficients.per_token_s, self._sched.queued_tokens + slot_tokens
        running = max(0.0, self._running_until - time.monotonic()) / per_token if per_token > 0 else 0
        room = int(min(max_tokens, movable, (movable + running) / 2))
        if room < min_tokens or self.kind.keeps_sparse_rows:
            return []
        if slot_tokens:
            self._slot = None
            live = [q for q in slot.seqs if not (q.payload[0].dropped or q.payload[0].done)]
            self._sched.requeue(live)
            self._queued_tokens += sum(q.length for q in live)
            self._queued_seqs += len(live)
        given: list[tuple[str, np.ndarray]] = []
        for rid in request_ids:   # (an id two live requests share, a client's own, is skipped)
            live = [r for r in self._by_id.get(rid, ()) if not (r.dropped or r.done)]
            req = live[0] if len(live) == 1 else None
            seqs = (self._sched.take_request(req.key, room)
                    if req is not None and req.tokens.spans is None and room > 0 else ())
            if seqs:
                tokens = sum(q.length for q in seqs)
                room -= tokens
                self._queued_tokens -= tokens
                self._queued_seqs -= len(seqs)
                items = np.sort(np.fromiter((q.index for q in seqs), dtype=np.int64, count=len(seqs)))
                self._handed.append(_HandedBack(req, items))
                given.append((rid, items))
        return given

    def _drop(self, req: _Request) -> None:
        # the scheduler thread removes the queued sequences; rows already in a batch are discarded
        with self._cv:
            if req.dropped:
                return
            req.dropped = True
            self._inbox.append(("drop", req.key))
            self._cv.notify()

    def _post(self, req: _Request) -> EmbedResult:
        """The request's answer: its kind's per-request steps over its rows (Kind.finish),
        those it handed back left out."""
        rows, lengths = req.rows, req.tokens.lengths
        if req.handed_back is not None:
            kept = np.ones(req.tokens.n, dtype=bool)
            kept[req.handed_back] = False
            rows, lengths = rows[kept], lengths[kept]
        result = self.kind.finish(self.spec, rows, req.options, lengths, req.request_id,
                                  Timings(queue_s=req.queue_s, inference_s=max(
                                      0.0, req.forward_until - req.forward_from)))
        result.handed_back = req.handed_back
        return result

    def _complete(self, req: _Request, error: Optional[FloeError] = None) -> None:
        """Finishes a request once (from any thread) and wakes its awaiting task."""
        with self._cv:
            if req.done:
                return
            req.done = True
            if error is not None:
                req.error = error
            self._requests.pop(req.key, None)
            same = self._by_id.get(req.request_id)
            if same is not None:
                same.remove(req)
                if not same:
                    del self._by_id[req.request_id]
            if not self._accepting:
                self._drain_cv.notify_all()   # stop() is draining
        with self._stats_lock:
            self._c["requests"] += 1
            if req.error is not None:
                self._c["failed_requests"] += 1
            else:
                self._hist["queue_wait_seconds"].observe(req.queue_s)
        req.loop.call_soon_threadsafe(_resolve, req.future, None)

    # --- scheduler thread -----------------------------------------------------------------

    def _take_inbox(self) -> None:
        # called with _cv held; only this thread touches self._sched
        inbox, self._inbox = self._inbox, []
        for kind, item in inbox:
            if kind == "add":
                req: _Request = item
                if req.dropped or req.done:
                    self._queued_tokens -= req.tokens.total_tokens
                    self._queued_seqs -= req.tokens.n
                    self._count_dropped(req.tokens.n)
                    continue
                off = req.tokens.offsets()
                prio = req.options.priority
                splits = req.tokens.type_splits
                spans = req.tokens.spans
                # each sequence's first output row and, for late chunking, its spans
                if spans is None:
                    rows = range(req.tokens.n)
                    bounds = [None] * req.tokens.n
                else:
                    so = spans.offsets()
                    rows = so[:-1].tolist()
                    bounds = [spans.bounds[so[i]: so[i + 1]] for i in range(req.tokens.n)]
                self._sched.add_many(
                    Sequence(request_key=req.key, index=i, length=int(req.tokens.lengths[i]),
                             arrival=req.submitted, priority=prio, group=int(spans is not None),
                             deadline=req.options.deadline,
                             payload=(req, req.tokens.ids[off[i]: off[i + 1]],
                                      None if splits is None else int(splits[i]), rows[i],
                                      bounds[i]))
                    for i in range(req.tokens.n))
            elif kind == "hand_back":
                *ask, loop, fut = item
                loop.call_soon_threadsafe(_resolve, fut, self._take_back(*ask))
            else:
                before = self._sched.queued_tokens
                n = self._sched.remove_request(item)
                if n:
                    self._queued_tokens -= before - self._sched.queued_tokens
                    self._queued_seqs -= n
                    self._count_dropped(n)

    def _count_dropped(self, n: int) -> None:
        self._count("dropped_sequences", n)

    def _scheduler_loop(self) -> None:
        number = 0
        next_tune = time.monotonic() + TUNE_WINDOW_S
        window = self._window_counters()
        while True:
            expired: list[_Request] = []
            handed: list[_HandedBack] = []
            seqs = None
            with self._cv:
                while True:
                    self._take_inbox()
                    if self._stopping:
                        return
                    now = time.monotonic()
                    expired = self._expire(now)
                    handed, self._handed = self._handed, []
                    if expired or handed:
                        break   # completed outside the lock
                    if now >= next_tune:
                        window = self._tune(now, window)
                        next_tune = now + TUNE_WINDOW_S
                    timeout = None
                    if self._slot is None:
                        idle = not self._running
                        seqs = self._sched.next_batch(now, engine_idle=idle)
                        if seqs:
                            self._queued_tokens -= sum(s.length for s in seqs)
                            self._queued_seqs -= len(seqs)
                            self._forming = True
                            self._forming_shape = self._shape(seqs)
                            self._forming_s = self.cost.seconds(*self._forming_shape)
                            break
                        deadline = self._sched.next_deadline(now) if idle else None
                        if deadline is not None:
                            timeout = max(0.0, deadline - now)
                    expiry = self._sched.next_expiry()
                    if expiry is not None:
                        timeout = max(0.0, expiry - now) if timeout is None else min(
                            timeout, max(0.0, expiry - now))
                    self._cv.wait(timeout)
            for item in handed:
                self._finish_q.put(item)   # (outside the lock: the finisher takes it)
            if expired or handed:
                for req in expired:
                    self._complete(req, DeadlineError(
                        f"request {req.request_id} passed its deadline while queued; it was "
                        "dropped before compute"))
                continue
            number += 1
            batch = _Batch(number=number, seqs=seqs, formed_at=time.monotonic(),
                           predicted_s=self._forming_s, shape=self._forming_shape)
            try:
                splits = None
                if any(s.payload[2] is not None for s in seqs):
                    splits = np.fromiter((s.length if s.payload[2] is None else s.payload[2]
                                          for s in seqs), dtype=np.int64, count=len(seqs))
                ids = [s.payload[1] for s in seqs]
                if seqs[0].group:   # late chunking: one row per span (the batch is one group)
                    batch.prepared = self.engine.prepare(ids, spans=[s.payload[4] for s in seqs])
                else:
                    batch.prepared = (self.engine.prepare(ids) if splits is None
                                      else self.engine.prepare(ids, type_splits=splits))
            except BaseException as e:  # noqa: BLE001 - isolate the failure to this batch
                batch.error = e
            with self._cv:
                self._slot = batch
                self._forming = False
                self._forming_s = 0.0
                self._engine_cv.notify()

    def _batch_cost(self, rows: float, width: float) -> float:
        """The scheduler's price of a forward pass: the cost model's seconds, padded tokens
        until it knows any."""
        if self.cost.coefficients.known:
            return self.cost.seconds(rows, width)
        return rows * width

    def _shape(self, seqs: list[Sequence]) -> tuple[int, int]:
        """(rows, width) of the forward pass the engine runs for ``seqs``: packed as the engine
        packs it (floe/engine/packing.py; plain batches only), else padded."""
        lengths = [s.length for s in seqs]
        return packing.shape(lengths, self._sched.pack_align if seqs[0].group == 0 else None)

    def _expire(self, now: float) -> list[_Request]:
        """Drops the queued sequences of requests whose own deadline has passed (with the lock
        held); returns those requests, to be completed with DeadlineError once it is released."""
        out = []
        before = self._sched.queued_tokens
        dropped = 0
        for key, n in self._sched.expire(now):
            dropped += n
            req = self._requests.get(key)
            if req is not None and not req.done:
                req.dropped = True
                out.append(req)
        if dropped:
            self._queued_seqs -= dropped
            self._queued_tokens -= before - self._sched.queued_tokens
            with self._stats_lock:
                self._c["expired_requests"] += len(out)
                self._c["dropped_sequences"] += dropped
        return out

    def _window_counters(self) -> tuple:
        """Cumulative counters a window is the difference of (called with the lock held). Idle
        time includes the engine's wait in progress: a model whose pass outlasts the window
        would otherwise look idle in every window no pass ended in, or busy while it waits."""
        now = time.monotonic()
        waiting = 0.0 if self._idle_since is None else now - self._idle_since
        with self._stats_lock:
            c = self._c
            return (now, self._busy_s, c["batches"],
                    c["sequences"], c["tokens"], c["padded_tokens"], self._idle_s + waiting,
                    self._predicted_run_s, self._sched.idle_starts, self._sched.company_starts)

    def _tune(self, now: float, last: tuple) -> tuple:
        """One tuning step over the window since ``last`` (with the lock held); applies and logs
        the tuner's changes. Returns the counters the next window starts from."""
        cur = self._window_counters()
        try:
            used, total = self.engine.memory()
        except Exception:  # noqa: BLE001 - a failed device query must not stop the batcher
            used, total = 0, 0
        seconds = cur[0] - last[0]
        # busy: the wall time the engine was not waiting for a batch (its passes' own seconds
        # arrive only when each ends, so a long pass would leave windows empty)
        window = Window(seconds=seconds, busy_s=max(0.0, seconds - (cur[6] - last[6])),
                        batches=cur[2] - last[2],
                        sequences=cur[3] - last[3], real_tokens=cur[4] - last[4],
                        padded_tokens=cur[5] - last[5], device_used=used, device_total=total,
                        idle_starts=cur[8] - last[8], company_starts=cur[9] - last[9])
        self.wall_factor = wall_factor(self.wall_factor, window.seconds, cur[6] - last[6],
                                       cur[7] - last[7])
        if self.tuner is None:
            return cur
        changes = self.tuner.step(window, self.cost)
        if changes:
            k = self.knobs = self.tuner.knobs
            self._sched.max_batch_tokens = k.max_batch_tokens
            self._sched.batch_timeout_s = k.batch_timeout_s
            self._sched.min_fill = k.min_fill
            self._count("tuning_changes", len(changes))
            for c in changes:
                log.info("replica %s tuning: %s", self.replica_id, c)
        return cur

    # --- engine thread --------------------------------------------------------------------

    def _engine_loop(self) -> None:
        try:
            while True:
                with self._cv:
                    if self._slot is None:
                        t_idle = self._idle_since = time.monotonic()
                        while self._slot is None and not self._stopping:
                            self._engine_cv.wait()
                        idle = time.monotonic() - t_idle
                        self._idle_since = None
                        with self._stats_lock:
                            self._idle_s += idle
                    if self._slot is None:
                        return
                    batch, self._slot = self._slot, None
                    self._running = True
                    self._running_until = time.monotonic() + batch.predicted_s
                    self._cv.notify()   # the slot is free: the scheduler may form the next batch
                try:
                    self._finish_q.put(self._forward(batch))
                finally:
                    with self._cv:
                        self._running = False
                        self._running_until = 0.0
                        self._cv.notify()   # an idle engine: the scheduler may send a partial batch
        finally:
            self._finish_q.put(None)

    def _forward(self, batch: _Batch) -> tuple:
        seqs = batch.seqs
        # queue time: until the request's last sequence entered a batch
        for s in seqs:
            req = s.payload[0]
            req.queue_s = max(req.queue_s, batch.formed_at - req.submitted)
        t0 = time.monotonic()
        out = None
        error = batch.error
        if error is None:
            try:
                out = self.engine.forward(batch.prepared)
            except BaseException as e:  # noqa: BLE001 - isolate the failure to this batch
                error = e
        return batch, out, t0, error, time.monotonic() - t0

    # --- finisher thread ------------------------------------------------------------------

    def _finish_loop(self) -> None:
        while True:
            item = self._finish_q.get()
            if item is None:
                return
            if isinstance(item, _HandedBack):
                self._count_handed_back(item)
                continue
            try:
                self._finish(*item)
            except BaseException:  # noqa: BLE001 - a bug here must not strand every later request
                log.exception("finishing batch %d failed", item[0].number)
                for req in {s.payload[0] for s in item[0].seqs}:
                    self._complete(req, InternalError("inference failed for this batch"))

    def _count_handed_back(self, item: _HandedBack) -> None:
        item.req.handed_back = item.items
        item.req.remaining -= len(item.items)
        if item.req.remaining == 0 and not (item.req.done or item.req.dropped):
            self._answer(item.req)

    def _answer(self, req: _Request) -> None:
        """Completes a request whose last row is stored, with its answer (finisher thread)."""
        try:
            req.result = self._post(req)
        except Exception:  # noqa: BLE001 - this request's post step, not the batch's
            log.exception("post-processing request %s failed", req.request_id)
            self._complete(req, InternalError("post-processing failed for this request"))
            return
        self._complete(req)

    def _finish(self, batch: _Batch, out: Any, started: float,
                error: Optional[BaseException], forward_s: float) -> None:
        seqs = batch.seqs
        # rows per sequence: one, or one per span (late chunking)
        counts = [1 if s.payload[4] is None else len(s.payload[4]) for s in seqs]
        starts = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        finish_s = 0.0
        if error is None:
            try:
                t_finish = time.monotonic()
                out = self.engine.finish(out)
                finish_s = time.monotonic() - t_finish
                n_rows = int(starts[-1])
                if not isinstance(out, np.ndarray) or out.shape != (n_rows, self.spec.dim):
                    raise RuntimeError(f"engine returned {getattr(out, 'shape', type(out))}, "
                                       f"expected ({n_rows}, {self.spec.dim})")
            except BaseException as e:  # noqa: BLE001 - isolate the failure to this batch
                error = e
        # from the forward's start to its rows on the host (a GPU's forward returns at launch)
        elapsed = time.monotonic() - started
        real = sum(s.length for s in seqs)
        rows, width = batch.shape
        padded = rows * width
        if error is None:
            # the device's time for this shape: the forward, and the copy a GPU's finish waits on
            self.cost.observe(rows, width, forward_s + finish_s)
            self._fill += 0.1 * (real / padded - self._fill)
        with self._stats_lock:
            self._busy_s += forward_s + finish_s
            self._predicted_run_s += batch.predicted_s
            self._c["batches"] += 1
            self._c["packed_batches"] += rows < len(seqs)   # several inputs shared a row
            self._c["sequences"] += len(seqs)
            self._c["tokens"] += real
            self._c["padded_tokens"] += padded
            self._hist["batch_size"].observe(len(seqs))
            self._hist["batch_tokens"].observe(padded)
            self._hist["padding_efficiency"].observe(real / padded)
            self._hist["inference_seconds"].observe(elapsed)
        if error is not None:
            log.error("batch %d (%d sequences) failed:\n%s", batch.number, len(seqs),
                      "".join(traceback.format_exception(error)))
            for req in {s.payload[0] for s in seqs}:
                self._complete(req, InternalError("inference failed for this batch"))
            return
        finite = np.isfinite(out).all(axis=1)
        if counts[-1] != 1 or len(out) != len(seqs):
            finite = np.logical_and.reduceat(finite, starts[:-1]) if len(finite) else finite
        batch_rows = self.kind.batch_rows(self.spec, out)   # once per batch (a sparse model's nonzeros)
        for row, s in enumerate(seqs):
            req: _Request = s.payload[0]
            if req.done or req.dropped:
                continue
            req.forward_from = min(req.forward_from, started)
            req.forward_until = max(req.forward_until, started + elapsed)
            if not finite[row]:
                log.error("non-finite embedding for request %s item %d", req.request_id, s.index)
                self._complete(req, InternalError(
                    f"the model produced a non-finite embedding for input {s.index}"))
                continue
            # the sequence's rows: one, or one per span (late chunking), from the request's row
            self.kind.store(self.spec, req.rows, batch_rows, int(starts[row]),
                            int(starts[row + 1]), s.payload[3])
            req.remaining -= 1
            if req.remaining == 0:
                self._answer(req)

    # --- introspection --------------------------------------------------------------------

    def stats(self) -> floe_pb2.ReplicaStats:
        with self._cv:
            queued_seqs, queued_tokens = self._queued_seqs, self._queued_tokens
            in_flight = len(self._requests)
            wait = self._ahead_s(time.monotonic())
            knobs = self.knobs
        cost = self.cost.coefficients
        try:
            used, total = self.engine.memory()
        except Exception:  # noqa: BLE001 - stats must not fail because the device query did
            used, total = 0, 0
        with self._stats_lock:
            msg = floe_pb2.ReplicaStats(
                **self._c, queued_sequences=queued_seqs, queued_tokens=queued_tokens,
                in_flight_requests=in_flight, rss_bytes=self._proc.memory_info().rss,
                device_memory_used_bytes=used, device_memory_total_bytes=total,
                histograms=[h.to_proto(name) for name, h in self._hist.items()],
                predicted_wait_seconds=wait, cost_fixed_seconds=cost.fixed_s,
                cost_per_token_seconds=cost.per_token_s,
                cost_per_token_length_seconds=cost.per_token_length_s,
                cost_per_token_window_seconds=cost.per_token_window_s,
                cost_window_span=cost.span,
                cost_relative_error=self.cost.error, batch_budget_tokens=knobs.max_batch_tokens,
                batch_timeout_seconds=knobs.batch_timeout_s, batch_min_fill=knobs.min_fill,
                batch_packing_align=self._sched.pack_align or 0)
        return msg


def _rows(tokens: TokenBatch) -> int:
    """Output rows of a request: one per item, or one per span (late chunking)."""
    return tokens.n if tokens.spans is None else tokens.spans.rows


def _resolve(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)

