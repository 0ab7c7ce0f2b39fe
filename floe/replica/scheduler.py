"""The dynamic batcher: a pure policy over queued sequences and a clock.

It imports neither torch, grpc nor asyncio and never reads the time itself: the caller passes
``now`` (seconds on any monotonic clock, the same clock as ``Sequence.arrival``). The replica core
(floe/replica/core.py) owns one Scheduler on one thread; tests drive it with a fake clock.

Rules
-----
* **Cost.** A batch costs its padded tokens, ``longest length x count``. It never exceeds
  ``max_batch_tokens`` nor ``max_batch_size`` sequences, except that a single sequence longer than
  the budget runs alone (the config keeps max_seq_length inside the budget; this is robustness).
* **Anchor, then fill by length.** Every batch is built around one *anchor* sequence and filled
  with the waiting sequences of the closest lengths (walking outwards from the anchor in a
  length-sorted index), so similar lengths share a batch and padding stays small.
* **Anchor choice (priority and the starvation bound).** The anchor is the oldest sequence of the
  highest waiting priority, unless some sequence has waited ``max_wait_s`` or more: then the oldest
  waiting sequence is the anchor whatever its priority. With one priority level (the common case)
  every batch therefore contains the oldest waiting sequence. Bound: a sequence is in a batch at the
  latest ``max_wait_s`` after it arrived plus the time for the engine to take the batches already
  formed, and at the latest once every older sequence is gone, whatever arrives after it.
  Fill order is by priority too: first sequences of the highest priority, then lower ones, each
  by closeness of length.
* **When a batch is formed.** ``next_batch(now, engine_idle)`` hands out a batch when it is *full*
  (the size cap is reached, the budget has no room for one more token row, or sequences were left
  out for lack of budget). While the engine is idle it also hands out a partial batch once the
  oldest waiting sequence has waited ``batch_timeout_s`` (the bounded wait for a batch to fill).
  While the engine is busy (``engine_idle=False``: a forward pass runs but the engine's input slot
  is empty) only full batches are handed out: the caller prepares that batch during the running
  pass (pipelining), and waiting longer costs nothing when the engine is busy anyway.
* **Fill floor.** With ``min_fill`` > 0 a sequence joins a batch only if the batch's fill (real
  tokens / padded tokens) stays at or above it; the walk stops on the side that would break it
  (the lengths beyond are further away still). Such a batch counts as full: waiting would not
  make it take those sequences. A lone anchor is always a valid batch, so the starvation bound is
  unchanged; what changes is that a short anchor in a queue of scattered lengths no longer pads a
  hundred rows up to the longest of them.
* **Packing.** With ``pack_align`` set (an engine that packs: floe/engine/packing.py), a batch
  of group 0 may instead be *packed*: rows of one width (the anchor's length rounded up to
  ``pack_align``, or one or two alignments wider: ``packing.WIDTHS`` candidates), each holding one
  or more sequences, filled best-fit from the longest waiting sequence that fits down to the
  shortest, within the budget (rows x width) and the size cap. Of the candidates around the same
  anchor, the padded one and the packed ones, the one with the lowest predicted cost per real
  token is handed out (``cost(rows, width)``: the replica's cost model, floe/replica/cost.py;
  padded tokens without one), a packed one only where its fill is at the floor or above. A
  packed batch lists its sequences in the order they were placed: the engine packs them again in
  that order (``packing.plan``, which tries the same widths), so its layout is never larger than
  the one priced here.
* **Draining a short queue.** The fill floor holds a sequence back for company of its own
  length, which a long queue provides. When everything waiting fits in one batch (the budget and
  the size cap, as the engine would run it: packed where it packs), the floor's plan for it (the
  batches the rules above would form from it, nothing else arriving) is priced against that one
  batch, and the cheaper is handed out: a lone request of scattered lengths, or the last of a
  queue, runs in one pass instead of one per length (a pass has a fixed cost the cost model
  knows). The single batch is not *full*: it waits for an idle engine and the bounded wait like
  any partial batch, and may take what arrives meanwhile. The decision is cached until the queue
  changes.
* **Groups.** Sequences of different ``group`` never share a batch (the engine runs them through
  different heads); the anchor's group decides, the others wait for a batch of their own, and a
  batch that left some out counts as full.
* **Company.** ``idle_starts`` counts the partial batches handed to an idle engine and
  ``company_starts`` those a second request shared, or would have shared: the next arrival came
  within the configured wait of the first sequence's arrival (``company_window_s``, whatever
  the wait is tuned to now). The tuner drops the wait where company does not come.
* **Cancellation.** ``remove_request`` drops a request's queued sequences before compute.
* **Deadlines.** A sequence may carry a deadline (its request's own: a gRPC deadline or the
  HTTP header). ``expire(now)`` removes every queued sequence of each request one of whose
  sequences' deadline has passed and returns those requests, so that none is computed after its
  client stopped waiting; ``next_expiry`` says when to look again.

Complexity: adding k sequences to a queue of n is O(k log n + n) worst case (a sort of nearly
sorted data); forming a batch of b sequences is O(b log n) plus skipped other-priority entries;
removed entries are tombstoned and compacted when they outnumber the live ones.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Optional

from floe.engine import packing
from floe.engine.packing import Packer, shape, width_for

# A sequence that has waited this long anchors the next batch whatever its priority.
DEFAULT_MAX_WAIT_S = 1.0


@dataclass(eq=False)
class Sequence:
    """One input of one request, as the scheduler sees it.

    ``request_key`` groups the sequences of one request (for ``remove_request``); ``index`` is the
    item's position in its request; ``payload`` is opaque to the scheduler (the core stores the ids
    and its request record there). ``arrival`` uses the same clock as ``now``.
    """

    request_key: Hashable
    index: int
    length: int
    arrival: float
    priority: int = 0
    payload: Any = None
    # sequences of different groups never share a batch (the engine runs each group's head apart:
    # late chunking's span pooling is group 1, everything else group 0)
    group: int = 0
    # when its client stops waiting (same clock as ``arrival``); None: never dropped for lateness
    deadline: Optional[float] = None
    # assigned by the scheduler: a unique, increasing id (tie-breaker and index key)
    seq_id: int = field(default=-1, compare=False)


class Scheduler:
    """Length-bucketed, token-budgeted batch formation. Not thread-safe: one owner."""

    def __init__(self, max_batch_tokens: int, max_batch_size: int, batch_timeout_s: float,
                 max_wait_s: float = DEFAULT_MAX_WAIT_S, min_fill: float = 0.0,
                 pack_align: Optional[int] = None,
                 cost: Optional[Callable[[float, float], float]] = None) -> None:
        if max_batch_tokens < 1 or max_batch_size < 1:
            raise ValueError("max_batch_tokens and max_batch_size must be positive")
        if batch_timeout_s < 0 or max_wait_s < 0:
            raise ValueError("batch_timeout_s and max_wait_s must be >= 0")
        if not 0.0 <= min_fill <= 1.0:
            raise ValueError("min_fill must be in [0, 1]")
        self.min_fill = min_fill
        self.pack_align = pack_align
        self.pack_widths = packing.WIDTHS   # packed candidates per batch, one per row width
        self.drain = True   # price a short queue's single batch against the floor's plan
        self._drained: tuple[tuple[int, int, int], Optional[list[Sequence]]] = ((-1, -1, -1), None)
        self._cost = cost or (lambda rows, width: rows * width)
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.batch_timeout_s = batch_timeout_s
        self.max_wait_s = max_wait_s
        # Whether waiting for company pays (read by the replica's tuner, floe/replica/tuning.py):
        # of the partial batches handed to an idle engine, how many held a request that came
        # after the first one's, or were followed by one within the configured wait (which a
        # shorter wait, tuned down, would have missed).
        self.company_window_s = batch_timeout_s   # the configured wait, however it is tuned
        self.idle_starts = 0
        self.company_starts = 0
        self._company_until: Optional[float] = None
        self._next_id = 0
        self._live: dict[int, Sequence] = {}               # seq_id -> queued sequence
        self._by_len: list[tuple[int, int]] = []           # sorted (length, seq_id), tombstones allowed
        self._oldest: list[tuple[float, int]] = []         # heap (arrival, seq_id), lazy deletion
        self._by_prio: list[tuple[int, float, int]] = []   # heap (-priority, arrival, seq_id), lazy
        self._deadlines: list[tuple[float, int]] = []      # heap (deadline, seq_id), lazy
        self._by_request: dict[Hashable, set[int]] = {}
        self._prio_counts: dict[int, int] = {}
        self._queued_tokens = 0

    # --- queue state ------------------------------------------------------------------------

    @property
    def queued_sequences(self) -> int:
        return len(self._live)

    @property
    def queued_tokens(self) -> int:
        """Real (unpadded) tokens waiting."""
        return self._queued_tokens

    def __len__(self) -> int:
        return len(self._live)

    # --- mutation ---------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.add_many((seq,))

    def add_many(self, seqs: Iterable[Sequence]) -> None:
        """Queues sequences. Lengths must be >= 1 (an empty input is refused before this)."""
        new: list[tuple[int, int]] = []
        for seq in seqs:
            if self._company_until is not None:   # the first arrival after a lone start
                self.company_starts += int(seq.arrival <= self._company_until)
                self._company_until = None
            if seq.length < 1:
                raise ValueError(f"sequence length must be >= 1, got {seq.length}")
            seq.seq_id = sid = self._next_id
            self._next_id += 1
            self._live[sid] = seq
            new.append((seq.length, sid))
            heapq.heappush(self._oldest, (seq.arrival, sid))
            heapq.heappush(self._by_prio, (-seq.priority, seq.arrival, sid))
            if seq.deadline is not None:
                heapq.heappush(self._deadlines, (seq.deadline, sid))
            self._by_request.setdefault(seq.request_key, set()).add(sid)
            self._prio_counts[seq.priority] = self._prio_counts.get(seq.priority, 0) + 1
            self._queued_tokens += seq.length
        if len(new) == 1:
            bisect.insort(self._by_len, new[0])
        elif new:
            # timsort merges the two sorted runs in linear time
            new.sort()
            self._by_len.extend(new)
            self._by_len.sort()

    def requeue(self, seqs: Iterable[Sequence]) -> None:
        """Puts back sequences taken out in a batch that did not run (their arrival kept); they
        say nothing about the company a lone batch had."""
        company_until, self._company_until = self._company_until, None
        self.add_many(seqs)
        self._company_until = company_until

    def remove_request(self, request_key: Hashable) -> int:
        """Drops every queued sequence of a request; returns how many were dropped."""
        sids = self._by_request.pop(request_key, None)
        if not sids:
            return 0
        for sid in list(sids):
            self._forget(sid, keep_request_index=True)
        self._maybe_compact()
        return len(sids)

    def take_request(self, request_key: Hashable, max_tokens: int) -> list[Sequence]:
        """Takes a request's queued sequences out of the queue, its last items first, while
        their tokens stay within ``max_tokens``; returns them (the replica hands them back to
        be computed elsewhere)."""
        sids = self._by_request.get(request_key)
        if not sids:
            return []
        taken: list[Sequence] = []
        room = max_tokens
        for sid in sorted(sids, key=lambda s: -self._live[s].index):
            if self._live[sid].length > room:
                continue
            room -= self._live[sid].length
            taken.append(self._forget(sid))
        if taken:
            self._maybe_compact()
        return taken

    def _forget(self, sid: int, keep_request_index: bool = False) -> Sequence:
        seq = self._live.pop(sid)
        self._queued_tokens -= seq.length
        c = self._prio_counts[seq.priority] - 1
        if c:
            self._prio_counts[seq.priority] = c
        else:
            del self._prio_counts[seq.priority]
        if not keep_request_index:
            sids = self._by_request.get(seq.request_key)
            if sids is not None:
                sids.discard(sid)
                if not sids:
                    del self._by_request[seq.request_key]
        return seq

    def _maybe_compact(self) -> None:
        # tombstones in the sorted index and the heaps are purged once they outnumber live entries
        live = len(self._live)
        if len(self._by_len) > 2 * live + 64:
            self._by_len = [e for e in self._by_len if e[1] in self._live]
        if len(self._oldest) > 2 * live + 64:
            self._oldest = [e for e in self._oldest if e[1] in self._live]
            heapq.heapify(self._oldest)
        if len(self._by_prio) > 2 * live + 64:
            self._by_prio = [e for e in self._by_prio if e[2] in self._live]
            heapq.heapify(self._by_prio)
        if len(self._deadlines) > 2 * live + 64:
            self._deadlines = [e for e in self._deadlines if e[1] in self._live]
            heapq.heapify(self._deadlines)

    def next_expiry(self) -> Optional[float]:
        """The earliest deadline among queued sequences, or None."""
        while self._deadlines and self._deadlines[0][1] not in self._live:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def expire(self, now: float) -> list[tuple[Hashable, int]]:
        """Drops every queued sequence of the requests whose deadline is at or before ``now``;
        returns (request key, sequences dropped) for each such request."""
        out = []
        while True:
            first = self.next_expiry()
            if first is None or first > now:
                break
            key = self._live[self._deadlines[0][1]].request_key
            out.append((key, self.remove_request(key)))
        return out

    # --- policy -----------------------------------------------------------------------------

    def oldest_arrival(self) -> Optional[float]:
        while self._oldest and self._oldest[0][1] not in self._live:
            heapq.heappop(self._oldest)
        return self._oldest[0][0] if self._oldest else None

    def _anchor(self, now: float) -> Sequence:
        oldest = self.oldest_arrival()
        assert oldest is not None
        if now - oldest >= self.max_wait_s or len(self._prio_counts) == 1:
            return self._live[self._oldest[0][1]]
        while self._by_prio[0][2] not in self._live:
            heapq.heappop(self._by_prio)
        return self._live[self._by_prio[0][2]]

    def _form(self, now: float) -> tuple[list[Sequence], bool]:
        """Builds the batch that would be handed out now; returns (batch, full). Pure: no removal."""
        batch, full = self._form_rules(now)
        if self.drain and self.min_fill and len(batch) < len(self._live):
            whole = self._whole_queue()
            if whole is not None:
                return whole, False
        return batch, full

    def _whole_queue(self) -> Optional[list[Sequence]]:
        """Every waiting sequence as one batch, where it fits one and costs less than the batches
        the floor would form from them (see Rules); None otherwise. Cached per queue state."""
        key = (self._next_id, len(self._live), self._queued_tokens)
        if self._drained[0] == key:
            return self._drained[1]
        whole = None
        if (len(self._live) <= self.max_batch_size and self._queued_tokens <= self.max_batch_tokens
                and len(self._prio_counts) == 1):
            live = list(self._live.values())
        else:
            live = []   # a long queue (the common case under load): the floor's batches
        if live and len({s.group for s in live}) == 1:
            lengths = [s.length for s in live]
            align = self.pack_align if live[0].group == 0 else None
            rows, width = shape(lengths, align)
            if rows * width <= self.max_batch_tokens and self._cost(rows, width) < self._plan_cost(live):
                whole = live
        self._drained = (key, whole)
        return whole

    def _plan_cost(self, live: list[Sequence]) -> float:
        """The cost of the batches the rules would form from ``live`` alone, to the last."""
        plan = Scheduler(self.max_batch_tokens, self.max_batch_size, 0.0, self.max_wait_s,
                         self.min_fill, self.pack_align, self._cost)
        plan.pack_widths, plan.drain = self.pack_widths, False
        plan.add_many(Sequence(None, i, s.length, s.arrival, s.priority, group=s.group)
                      for i, s in enumerate(live))
        total = 0.0
        while True:
            batch = plan.next_batch(float("inf"))
            if batch is None:
                return total
            align = self.pack_align if batch[0].group == 0 else None
            total += self._cost(*shape([s.length for s in batch], align))

    def _form_rules(self, now: float) -> tuple[list[Sequence], bool]:
        """The batch around the anchor: the padded walk's, or a packed one (see Rules)."""
        anchor = self._anchor(now)
        batch, full = self._form_padded(anchor)
        if not self.pack_align or anchor.group != 0 or len(self._live) < 2:
            return batch, full
        # each priced as the engine will run it: the padded walk's batch too may run packed
        real = sum(s.length for s in batch)
        best = (self._cost(*shape([s.length for s in batch], self.pack_align)) / real, batch, full)
        for blocks in range(min(self.pack_widths, packing.WIDTHS)):
            packed = self._form_packed(anchor, blocks)
            if packed is None:
                break
            chosen, packed_full, rows, width, real = packed
            each = self._cost(rows, width) / real
            if real >= self.min_fill * rows * width and each < best[0]:
                best = (each, chosen, packed_full)
        return best[1], best[2]

    def _form_packed(self, anchor: Sequence,
                     blocks: int = 0) -> Optional[tuple[list[Sequence], bool, int, int, int]]:
        """The packed candidate around ``anchor`` in rows ``blocks`` alignments wider than the
        anchor needs: (batch, full, rows, width, real tokens), or None when the width leaves no
        room for a second row."""
        budget, cap = self.max_batch_tokens, self.max_batch_size
        width = width_for(anchor.length, self.pack_align or 1) + blocks * (self.pack_align or 1)
        if 2 * width > budget:
            return None
        packer = Packer(width, budget // width)
        packer.add(anchor.length, anchor)
        chosen = [anchor]
        taken = {anchor.seq_id}
        index = self._by_len
        for prio in sorted(self._prio_counts, reverse=True):
            pos = bisect.bisect_right(index, (width, self._next_id)) - 1
            while pos >= 0 and len(chosen) < cap:
                length, sid = index[pos]
                if not packer.fits(length):
                    room = packer.largest_free
                    if room == 0:
                        break
                    # only what fits the rows' free room: jump down to it
                    pos = min(pos - 1, bisect.bisect_right(index, (room, self._next_id)) - 1)
                    continue
                if self._eligible(sid, prio, anchor.group, taken):
                    seq = self._live[sid]
                    packer.add(length, seq)
                    taken.add(sid)
                    chosen.append(seq)
                pos -= 1
        rows = len(packer.rows)
        full = (len(chosen) >= cap or len(chosen) < len(self._live)
                or (rows * width + width > budget and packer.largest_free == 0))
        return chosen, full, rows, width, packer.real

    def _form_padded(self, anchor: Sequence) -> tuple[list[Sequence], bool]:
        """The padded candidate: the anchor and the closest lengths (see Rules)."""
        budget, cap = self.max_batch_tokens, self.max_batch_size
        chosen = [anchor]
        taken = {anchor.seq_id}
        longest = anchor.length
        real = anchor.length
        floor = self.min_fill
        held_back = False  # a sequence was left out to keep the fill floor
        index = self._by_len
        pos = bisect.bisect_left(index, (anchor.length, anchor.seq_id))
        closed = False  # no further sequence of any length can fit
        for prio in sorted(self._prio_counts, reverse=True):
            if closed:
                break
            lo, hi = pos - 1, pos + 1
            hi_open = True
            while len(chosen) < cap:
                if (len(chosen) + 1) * longest > budget:
                    closed = True  # even a sequence no longer than the current longest won't fit
                    break
                while lo >= 0 and not self._eligible(index[lo][1], prio, anchor.group, taken):
                    lo -= 1
                while hi_open and hi < len(index) and not self._eligible(index[hi][1], prio, anchor.group, taken):
                    hi += 1
                lo_len = index[lo][0] if lo >= 0 else None
                hi_len = index[hi][0] if hi_open and hi < len(index) else None
                if hi_len is not None and (len(chosen) + 1) * max(longest, hi_len) > budget:
                    hi_len, hi_open = None, False  # longer ones cannot fit either
                if floor:
                    n = len(chosen) + 1
                    if lo_len is not None and real + lo_len < floor * n * longest:
                        lo_len, lo = None, -1  # shorter ones would pad more still
                        held_back = True
                    if hi_len is not None and real + hi_len < floor * n * max(longest, hi_len):
                        hi_len, hi_open = None, False  # longer ones would pad more still
                        held_back = True
                if lo_len is None and hi_len is None:
                    break
                take_lo = hi_len is None or (
                    lo_len is not None and anchor.length - lo_len <= hi_len - anchor.length)
                if take_lo:
                    sid = index[lo][1]
                    lo -= 1
                else:
                    sid = index[hi][1]
                    hi += 1
                    longest = max(longest, hi_len)  # type: ignore[arg-type]
                seq = self._live[sid]
                taken.add(sid)
                chosen.append(seq)
                real += seq.length
        full = (len(chosen) >= cap or (len(chosen) + 1) * longest > budget
                or len(chosen) < len(self._live) or held_back)
        return chosen, full

    def _eligible(self, sid: int, prio: int, group: int, taken: set[int]) -> bool:
        seq = self._live.get(sid)
        return (seq is not None and seq.priority == prio and seq.group == group
                and sid not in taken)

    def next_batch(self, now: float, engine_idle: bool = True) -> Optional[list[Sequence]]:
        """The next batch to run, removed from the queue, or None when it should wait.

        ``engine_idle``: True when nothing is running and nothing is waiting for the engine; False
        when a forward pass runs but the engine's input slot is free (only a full batch is formed).
        The caller must not ask while the engine's input slot is occupied.
        """
        if not self._live:
            return None
        batch, full = self._form(now)
        if not full:
            if not engine_idle:
                return None
            oldest = self.oldest_arrival()
            if oldest is not None and now < oldest + self.batch_timeout_s:
                return None
            self.idle_starts += 1
            first = min(s.arrival for s in batch)
            if any(s.arrival > first for s in batch):
                self.company_starts += 1
            else:
                self._company_until = first + self.company_window_s
        for seq in batch:
            self._forget(seq.seq_id)
        self._maybe_compact()
        return batch

    def next_deadline(self, now: float) -> Optional[float]:
        """When an idle engine's caller should call ``next_batch`` again if nothing arrives.

        None when the queue is empty. A value <= ``now`` means "now". Arrivals and the engine
        becoming idle are events the caller reacts to on its own.
        """
        oldest = self.oldest_arrival()
        if oldest is None:
            return None
        return oldest + self.batch_timeout_s


def padded_tokens(batch: Iterable[Sequence]) -> int:
    """The cost of a batch: longest length x count."""
    lengths = [s.length for s in batch]
    return max(lengths) * len(lengths) if lengths else 0
