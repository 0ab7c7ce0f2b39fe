"""The load-balancing policy: a pure function of replica loads.

The manager owns the bookkeeping (which replica is healthy, how many tokens each has in flight);
this module only decides. It imports nothing but the standard library so it can be tested
exhaustively and reasoned about on its own.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

POLICIES = ("round_robin", "random", "least_loaded")


@dataclass(frozen=True)
class ReplicaLoad:
    """What the balancer knows about one replica at the moment of a pick."""

    index: int
    healthy: bool
    in_flight_tokens: int = 0
    in_flight_requests: int = 0


class Balancer:
    """Picks one healthy replica per request.

    - ``round_robin``: cycles over the healthy replicas in index order.
    - ``random``: uniform over the healthy replicas (``rng`` injectable for tests).
    - ``least_loaded``: fewest in-flight tokens (then fewest in-flight requests); ties are broken
      from a rotating offset, so equally loaded replicas share the traffic instead of the lowest
      index taking all of it (an idle system would otherwise always pick replica 0).
    """

    def __init__(self, policy: str = "least_loaded", rng: Optional[_random.Random] = None,
                 start: int = 0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown load-balancing policy {policy!r}; one of {', '.join(POLICIES)}")
        self.policy = policy
        self._rng = rng or _random.Random()
        # round-robin cursor / tie-break offset; a replica index, not a position. Front-end
        # worker k starts at k: each worker balances only the load it sees, and equal starts
        # would send every worker's first request (and every idle-time request) to replica 0.
        self._next = start

    def pick(self, loads: Sequence[ReplicaLoad], exclude: Iterable[int] = ()) -> Optional[int]:
        """The index of the chosen replica, or None when no healthy, non-excluded replica exists."""
        excluded = set(exclude)
        candidates = sorted((l for l in loads if l.healthy and l.index not in excluded),
                            key=lambda l: l.index)
        if not candidates:
            return None
        if self.policy == "random":
            return self._rng.choice(candidates).index
        # Rotate the candidate list so it starts at the first index >= the cursor: round robin
        # keeps its order when a replica leaves or rejoins rotation.
        start = next((k for k, l in enumerate(candidates) if l.index >= self._next), 0)
        rotated = candidates[start:] + candidates[:start]
        if self.policy == "round_robin":
            chosen = rotated[0]
        else:
            # min() keeps the first of equal keys, i.e. the first after the rotating offset.
            chosen = min(rotated, key=lambda l: (l.in_flight_tokens, l.in_flight_requests))
        self._next = chosen.index + 1
        return chosen.index
