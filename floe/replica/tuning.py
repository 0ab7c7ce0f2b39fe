"""Online tuning of the batcher: its wait, its token budget and its fill floor follow the load.

A pure policy, like the scheduler: the replica core measures a window (about a second) of its own
work and hands it to ``Tuner.step`` with the cost model (floe/replica/cost.py); the tuner returns
the knobs to change and why, and the core applies them to its Scheduler, logs each change and
exports them. Tests drive it with hand-made windows and cost models.

Rules
-----
* **Load level, with hysteresis.** The engine's busy share of the window is the load. The level
  turns *light* below 20% and *busy* above 40%; in between it stays what it was, so a load near
  a threshold does not flip the knobs back and forth.
* **Batch wait.** Light: 0, so a lone request runs at once (waiting for company that does not come
  only adds latency). Busy: the configured wait (``--batch-timeout-ms``), at most a twentieth of
  the latency target, so a partial batch under a moderate load still fills; but 0 where the
  window shows that company does not come: of at least ``MIN_BATCHES`` partial batches started
  on an idle engine, fewer than a tenth shared it with a second request or were followed by one
  within the configured wait (the scheduler's ``company_starts``). A client that sends one
  request and waits for its answer can keep a replica 20-40% busy, inside the band, and never
  has company: after a busy spell the wait was all of its queue time.
* **Token budget.** Busy: the throughput-optimal budget at the traffic's measured padded length,
  from the cost model: the smallest candidate (powers of two up to the largest allowed budget,
  from the configured one) whose predicted seconds per token is within 3% of the best, so the
  batcher gains throughput where the device has it to give (a GPU's fixed cost per pass) and
  keeps batches small (closer lengths, activations in cache, short passes) where it does not.
  With a latency target a pass may take at most a quarter of it, which may take the budget below
  the configured one (down to the model's length). On a GPU whose memory is above 90% used the budget halves
  (the batching guide's rule), whatever the model says.
* **Fill floor.** When the padding fill (real / padded tokens) of a window's batches is below
  70%, the floor rises by 0.1 (up to 0.9); when it is above 90% and the floor is above its
  configured value, it comes back down by 0.1.
* **Cooldown.** A knob that changed stays put for ``cooldown`` windows.

What it does not decide: how many replicas share a device (a fleet's choice, made at start-up).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

LIGHT_BELOW = 0.2
BUSY_ABOVE = 0.4
FILL_LOW = 0.7
FILL_HIGH = 0.9
FILL_STEP = 0.1
FILL_CAP = 0.9
BUDGET_SLACK = 1.03      # a budget within 3% of the best throughput counts as the best
GPU_MEMORY_HIGH = 0.9
MIN_BATCHES = 4          # fewer batches in a window say too little about padding or shape
COMPANY_SHARE = 0.1      # waiting pays where at least this share of idle starts had company


@dataclass(frozen=True)
class Knobs:
    max_batch_tokens: int
    batch_timeout_s: float
    min_fill: float


@dataclass(frozen=True)
class Window:
    """What the replica measured over one tuning window."""

    seconds: float           # the window's wall length
    busy_s: float            # forward-pass seconds in it
    batches: int
    sequences: int
    real_tokens: int
    padded_tokens: int
    device_used: int = 0     # GPU bytes in use at the window's end (0 on CPU)
    device_total: int = 0
    idle_starts: int = 0     # partial batches handed to an idle engine
    company_starts: int = 0  # of those, with (or followed within the wait by) another request


@dataclass(frozen=True)
class Change:
    knob: str
    old: Any
    new: Any
    reason: str

    def __str__(self) -> str:
        def text(v: Any) -> str:
            return f"{v:g}" if isinstance(v, float) else str(v)
        return f"{self.knob} {text(self.old)} -> {text(self.new)} ({self.reason})"


class Tuner:
    def __init__(self, base: Knobs, *, min_budget: int, max_budget: int, max_batch_size: int,
                 target_s: Optional[float] = None, cooldown: int = 3) -> None:
        if min_budget < 1 or max_budget < min_budget:
            raise ValueError("need 1 <= min_budget <= max_budget")
        self.base = base
        self.knobs = base
        self.min_budget = min_budget
        self.max_budget = max_budget
        self.max_batch_size = max_batch_size
        self.target_s = target_s
        self.cooldown = cooldown
        self.level = "busy"          # as configured until a window says otherwise
        self._quiet: dict[str, int] = {}   # knob -> windows left before it may change again
        self.changes = 0

    def _candidates(self) -> list[int]:
        out, b = [], 1
        while b < self.min_budget:
            b *= 2
        out.append(self.min_budget)
        while b <= self.max_budget:
            if b > self.min_budget:
                out.append(b)
            b *= 2
        if out[-1] != self.max_budget:
            out.append(self.max_budget)
        return out

    def best_budget(self, cost: Any, padded_len: float) -> int:
        """The throughput-optimal budget at rows of ``padded_len`` tokens (see the rules)."""
        rates = []
        for budget in self._candidates():
            count = max(1, min(self.max_batch_size, int(budget // padded_len)))
            seconds = cost.seconds(count, padded_len)
            if (self.target_s is not None and seconds > self.target_s / 4
                    and budget > self.min_budget):
                break
            rates.append((seconds / (count * padded_len), budget))
        best = min(r for r, _ in rates)
        # Never below the configured budget for throughput's sake: the cost model times the
        # forward pass alone, and each extra pass also costs its preparation and finish on the
        # other threads (on a small CPU, the same cores). Only the latency target goes below it.
        good = [b for r, b in rates if r <= best * BUDGET_SLACK and b >= self.base.max_batch_tokens]
        return good[0] if good else rates[-1][1]

    def step(self, window: Window, cost: Any) -> list[Change]:
        """The knobs to change after ``window``; they are already applied to ``self.knobs``."""
        for k in list(self._quiet):
            self._quiet[k] -= 1
            if self._quiet[k] <= 0:
                del self._quiet[k]
        if window.seconds <= 0:
            return []
        load = window.busy_s / window.seconds
        if load < LIGHT_BELOW:
            self.level = "light"
        elif load > BUSY_ABOVE:
            self.level = "busy"
        want: dict[str, tuple[Any, str]] = {}

        timeout = 0.0 if self.level == "light" else self.base.batch_timeout_s
        if self.target_s is not None:
            timeout = min(timeout, self.target_s / 20)
        why = f"{self.level} load ({load:.0%} busy)"
        if (timeout and window.idle_starts >= MIN_BATCHES
                and window.company_starts < COMPANY_SHARE * window.idle_starts):
            timeout = 0.0
            why += (f", but {window.idle_starts - window.company_starts} of the "
                    f"{window.idle_starts} batches started on an idle engine had no company "
                    "within the wait")
        want["batch_timeout_s"] = (timeout, why)

        if window.device_total > 0 and window.device_used > GPU_MEMORY_HIGH * window.device_total:
            want["max_batch_tokens"] = (
                max(self.min_budget, self.knobs.max_batch_tokens // 2),
                f"device memory {window.device_used / window.device_total:.0%} used")
        elif (self.level == "busy" and window.batches >= MIN_BATCHES and window.sequences
              and getattr(cost, "calibrated", True)):
            padded_len = window.padded_tokens / window.sequences
            want["max_batch_tokens"] = (
                self.best_budget(cost, padded_len),
                f"throughput-optimal at {padded_len:.0f} padded tokens per input")

        if window.batches >= MIN_BATCHES and window.padded_tokens:
            fill = window.real_tokens / window.padded_tokens
            floor = self.knobs.min_fill
            if fill < FILL_LOW and floor < FILL_CAP:
                want["min_fill"] = (round(min(FILL_CAP, floor + FILL_STEP), 3),
                                    f"padding fill {fill:.0%}")
            elif fill > FILL_HIGH and floor > self.base.min_fill:
                want["min_fill"] = (round(max(self.base.min_fill, floor - FILL_STEP), 3),
                                    f"padding fill {fill:.0%}")

        changes = []
        for knob, (new, reason) in want.items():
            old = getattr(self.knobs, knob)
            if new == old or knob in self._quiet:
                continue
            self.knobs = replace(self.knobs, **{knob: new})
            self._quiet[knob] = self.cooldown
            changes.append(Change(knob, old, new, reason))
        self.changes += len(changes)
        return changes
