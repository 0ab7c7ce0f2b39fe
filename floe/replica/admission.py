"""Deadline-aware admission: may this request join the replica's queue?

A pure policy over numbers the replica core hands it (no clock, no lock): the time now, the
predicted seconds of the work already ahead of the request (``ahead_s``: the running pass, the
prepared one, and the queue, from the cost model), the predicted seconds of the request's own
work, and its deadline.

Rules
-----
* A request with its own deadline (a gRPC deadline, the ``x-request-timeout-ms`` header) is
  admitted only if it is predicted to finish before it.
* With a latency target (``--latency-target-ms``) a request without a deadline of its own gets
  ``arrival + target`` as its limit, the same test. A deadline of its own overrides the target,
  longer or shorter.
* Without either, the queue is bounded in time: a request is refused while the work ahead of it
  is predicted to take more than ``max_queue_s`` (the default bound, ``--max-queue-ms``).
* A refusal carries the seconds after which the same request would be admitted: the predicted
  completion's excess over its limit (the queue drains at the rate the cost model predicts).

A refused request costs nothing on the engine. What is admitted is computed: a request with a
target but no deadline is never dropped for being late, since its client is still waiting for
it; a request with a deadline of its own is dropped before compute once the deadline passes (the
scheduler's ``expire``), because its client has stopped waiting.

The cost model is only a prediction: ``safety`` (0-1) admits against that share of the limit, so
that a prediction off by 10-20% still meets the target. An uncalibrated model predicts zero and
admits everything; the token bound (``max_queued_tokens``) still holds in the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# the shortest Retry-After a refusal suggests: less would invite a client to spin
MIN_RETRY_AFTER_S = 0.05


@dataclass(frozen=True)
class Decision:
    admit: bool
    predicted_s: float          # predicted seconds from now until the request's last row is done
    limit_s: Optional[float]    # seconds from now it must finish within (None: no limit)
    retry_after_s: float = 0.0  # when refused: after how long the same request would fit
    reason: str = ""            # when refused: "deadline", "target" or "queue"


class AdmissionPolicy:
    def __init__(self, target_s: Optional[float], max_queue_s: Optional[float],
                 safety: float = 0.85) -> None:
        if target_s is not None and target_s <= 0:
            raise ValueError("the latency target must be positive")
        if max_queue_s is not None and max_queue_s <= 0:
            raise ValueError("the queue bound must be positive")
        if not 0 < safety <= 1:
            raise ValueError("safety must be in (0, 1]")
        self.target_s = target_s
        self.max_queue_s = max_queue_s
        self.safety = safety

    def decide(self, now: float, ahead_s: float, own_s: float,
               deadline: Optional[float] = None) -> Decision:
        """``deadline``: the request's own, on the clock of ``now``; None for none."""
        predicted = max(0.0, ahead_s) + max(0.0, own_s)
        limit, reason = None, ""
        if deadline is not None:
            limit, reason = deadline - now, "deadline"
        elif self.target_s is not None:   # a request's own deadline overrides the target
            limit, reason = self.target_s, "target"
        if limit is not None:
            allowed = limit * self.safety
            if predicted > allowed:
                return Decision(False, predicted, limit,
                                max(MIN_RETRY_AFTER_S, predicted - allowed), reason)
            return Decision(True, predicted, limit)
        if self.max_queue_s is not None and ahead_s > self.max_queue_s:
            return Decision(False, predicted, None,
                            max(MIN_RETRY_AFTER_S, ahead_s - self.max_queue_s), "queue")
        return Decision(True, predicted, None)


def refusal_message(decision) -> str:
    """The client's message for a refused request: why, with the prediction."""
    if decision.reason == "queue":
        return (f"the queue holds {decision.predicted_s:.1f} s of work, more than the server's "
                "bound; retry later")
    what = "its deadline" if decision.reason == "deadline" else "the server's latency target"
    return (f"the request is predicted to finish in {decision.predicted_s * 1000:.0f} ms, past "
            f"{what} ({max(0.0, decision.limit_s) * 1000:.0f} ms left); retry later")


def wall_factor(current: float, seconds: float, idle_s: float, predicted_s: float) -> float:
    """The moving wall-per-predicted-second factor after a window of ``seconds`` in which the
    engine waited ``idle_s`` and ran batches the cost model priced at ``predicted_s``. A window
    with little work says nothing (the factor stays); the factor is kept within [0.5, 10]."""
    if seconds <= 0 or predicted_s < 0.2 * seconds:
        return current
    ratio = min(10.0, max(0.5, max(0.0, seconds - idle_s) / predicted_s))
    return current + 0.3 * (ratio - current)
