"""The batch budget of an offline job, measured on the job's own first batches.

An offline job has no latency target: its batch budget (padded tokens per forward pass) should be
the one the engine runs fastest at on this machine. That is not a constant: on a 2-core AMD EPYC
(Zen 2, float32) 4,096 tokens ran 5-7% faster than 16,384 on a length-sorted corpus, and the cache
sizes and kernels of other CPUs (AMX tiles, larger L2) move the best point. So the job measures it.

``BudgetTuner`` takes a contiguous run of a length-sorted shard around its median by tokens (the
lengths most of the job will run), splits it into segments, and cuts each segment at one candidate
budget, in the order c0 c1 .. cn cn .. c1 c0 so that the slow rise of lengths along the run
weighs on every candidate alike. Every trial batch is real work: its rows are part of the output.
Each batch is timed by whoever runs it (``record``); the rate of a candidate is its batches'
modelled cost (padded rows x width x (1 + width / attention_scale), the attention term making
long and short segments comparable) over their time. Once every trial batch is recorded the
fastest candidate is chosen and every later batch is cut at it.

The tuner is pure apart from a lock and an event: no engine, no clock (callers pass seconds).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from floe.resolve import GPU_BATCH_TOKENS   # a GPU's budget when none is given, as floe serve's

log = logging.getLogger("floe.corpus")

CPU_CANDIDATES = (2048, 4096, 8192, 16384)
ROUNDS = 2   # each candidate is measured this many times (palindromic order)


def plan_batches(lengths: np.ndarray, max_tokens: int, max_size: int) -> list[np.ndarray]:
    """Indices into ``lengths`` grouped into batches: sorted by length, each batch's padded cost
    (longest x count) within ``max_tokens`` and at most ``max_size`` sequences. A sequence longer
    than the budget runs alone."""
    if max_tokens < 1 or max_size < 1:
        raise ValueError("max_tokens and max_size must be positive")
    order = np.argsort(lengths, kind="stable")
    return _cut_sorted(order, lengths, max_tokens, max_size)


def _cut_sorted(order: np.ndarray, lengths: np.ndarray, max_tokens: int, max_size: int) -> list[np.ndarray]:
    batches: list[np.ndarray] = []
    start, n = 0, len(order)
    while start < n:
        end = start + 1
        # lengths ascend, so the batch's longest is its last sequence
        while end < n and end - start < max_size and (end - start + 1) * int(lengths[order[end]]) <= max_tokens:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


@dataclass
class Batch:
    """Positions (into the shard's sequences) of one forward pass, and the candidate budget it
    measures (None: not a trial)."""

    idx: np.ndarray
    trial: Optional[int] = None


@dataclass
class _Tally:
    cost: float = 0.0
    seconds: float = 0.0
    left: int = 0
    failed: bool = False


@dataclass
class BudgetTuner:
    """Chooses among ``candidates`` on the first shard big enough to measure them, then cuts every
    batch at the choice. ``fixed`` (an explicit --batch-tokens) turns tuning off."""

    candidates: Sequence[int] = CPU_CANDIDATES
    max_size: int = 256
    attention_scale: float = 2304.0     # 2 x hidden + intermediate (MiniLM); see cost()
    fallback: int = 4096                # used until (and if) the measurement completes
    fixed: Optional[int] = None
    chosen: Optional[int] = None
    rates: dict = field(default_factory=dict)
    _tally: dict = field(default_factory=dict)
    _state: str = "idle"                # idle -> measuring -> done
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.fixed is not None:
            self.chosen = self.fixed
            self._state = "done"
            self._done.set()

    @classmethod
    def for_model(cls, hidden: int, max_size: int, fixed: Optional[int] = None,
                  candidates: Sequence[int] = CPU_CANDIDATES) -> "BudgetTuner":
        """A tuner for an encoder of width ``hidden`` (its MLP taken as the usual 4 x hidden)."""
        return cls(candidates=tuple(candidates), max_size=max_size,
                   attention_scale=float(6 * hidden), fixed=fixed)

    @property
    def budget(self) -> int:
        """The budget batches are cut at now (the choice, or the fallback before it)."""
        return self.chosen if self.chosen is not None else self.fallback

    def cost(self, width: int, rows: int) -> float:
        """Modelled work of a padded batch. Per token an encoder layer does 4h^2 + 2hi multiply-
        adds in its projections and 2Lh in attention, so relative to a zero-length token the cost
        is 1 + L / (2h + i) (h: hidden, i: intermediate, L: the padded width)."""
        return rows * width * (1.0 + width / self.attention_scale)

    # --- cutting ----------------------------------------------------------------------------

    def cut(self, lengths: np.ndarray) -> Iterator[Batch]:
        """The batches of one shard. The trial batches come first; the rest are cut only after
        every trial batch has been recorded (this generator waits for it), at the chosen budget."""
        with self._lock:
            start_trial = self._state == "idle" and self._trial_fits(lengths)
            if start_trial:
                self._state = "measuring"
        if not start_trial:
            if self._state == "measuring":
                self._done.wait()   # another shard is measuring: its answer is moments away
            yield from (Batch(b) for b in plan_batches(lengths, self.budget, self.max_size))
            return
        order = np.argsort(lengths, kind="stable")
        lo, hi = self._trial_span(order, lengths)
        segments = self._segments(order[lo:hi], lengths)
        trials = [(c, _cut_sorted(seg, lengths, c, self.max_size)) for c, seg in segments]
        with self._lock:
            for c, batches in trials:
                self._tally.setdefault(c, _Tally()).left += len(batches)
        for c, batches in trials:
            for b in batches:
                yield Batch(b, trial=c)
        self._done.wait()
        rest = np.concatenate([order[:lo], order[hi:]])
        yield from (Batch(b) for b in _cut_sorted(rest, lengths, self.budget, self.max_size))

    def _trial_tokens(self) -> int:
        return ROUNDS * len(self.candidates) * max(self.candidates)

    def _trial_fits(self, lengths: np.ndarray) -> bool:
        # measure only where the trial is at most half of the shard: the rest shows the choice
        return len(self.candidates) > 1 and int(lengths.sum()) >= 2 * self._trial_tokens()

    def _trial_span(self, order: np.ndarray, lengths: np.ndarray) -> tuple[int, int]:
        """[lo, hi) of the sorted order: a run of about the trial's tokens around the median."""
        cum = np.cumsum(lengths[order])
        need = self._trial_tokens()
        centre = int(np.searchsorted(cum, cum[-1] / 2))
        lo = int(np.searchsorted(cum, max(0, cum[centre] - need / 2)))
        hi = int(np.searchsorted(cum, cum[lo] + need)) + 1
        if hi > len(order):
            hi = len(order)
            lo = int(np.searchsorted(cum, max(0, cum[-1] - need)))
        return lo, hi

    def _segments(self, run: np.ndarray, lengths: np.ndarray) -> list[tuple[int, np.ndarray]]:
        plan = list(self.candidates) + list(reversed(self.candidates))
        plan = (plan * ((ROUNDS + 1) // 2))[: ROUNDS * len(self.candidates)]
        cum = np.cumsum(lengths[run])
        bounds = np.searchsorted(cum, np.linspace(0, cum[-1], len(plan) + 1)[1:-1])
        return list(zip(plan, np.split(run, bounds)))

    # --- measuring ----------------------------------------------------------------------------

    def record(self, batch: Batch, width: int, seconds: Optional[float]) -> None:
        """One trial batch ran in ``seconds`` (None: it failed or was dropped)."""
        if batch.trial is None:
            return
        with self._lock:
            t = self._tally[batch.trial]
            t.left -= 1
            if seconds is None:
                t.failed = True
            else:
                t.cost += self.cost(width, len(batch.idx))
                t.seconds += seconds
            if all(x.left == 0 for x in self._tally.values()):
                self._decide()

    def _decide(self) -> None:
        if any(t.failed or t.seconds <= 0 for t in self._tally.values()):
            self.chosen = self.fallback
            log.info("batch budget: the measurement did not complete; using %d tokens", self.fallback)
        else:
            self.rates = {c: t.cost / t.seconds for c, t in self._tally.items()}
            self.chosen = max(self.rates, key=self.rates.get)
            best = self.rates[self.chosen]
            log.info("batch budget %d tokens, measured on this job's first batches (relative rate %s)",
                     self.chosen, ", ".join(f"{c}: {r / best:.3f}" for c, r in sorted(self.rates.items())))
        self._state = "done"
        self._done.set()

    def abandon(self) -> None:
        """The job stopped: nothing waits for a measurement any more."""
        with self._lock:
            if self.chosen is None:
                self.chosen = self.fallback
            self._state = "done"
            self._done.set()


def tuner_for(spec, batch_tokens: Optional[int], max_batch_size: int, gpu: bool) -> BudgetTuner:
    """The job's batch budget: the one given; else on a GPU its default (a larger budget than
    the warm-up proved might not fit in its memory); else measured on the CPU at hand."""
    fixed = batch_tokens
    if fixed is None and gpu:
        fixed = GPU_BATCH_TOKENS
    return BudgetTuner.for_model(spec.hidden_size, max_batch_size, fixed=fixed)
