"""The load-balancing policy: a pure function of replica loads.

The manager owns the bookkeeping (which replica is healthy, how many tokens each has in flight);
this module only decides. It imports nothing but the standard library so it can be tested
exhaustively and reasoned about on its own.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

Part = tuple[int, int, int]   # (replica index, first item, end item): one slice of a request

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
      index taking all of it (an idle system would otherwise always pick replica 0). A request
      large enough is also cut across replicas (``spread``).
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

    def spread(self, loads: Sequence[ReplicaLoad], item_tokens: Sequence[int],
               min_part_tokens: int) -> list[Part]:
        """How ``least_loaded`` cuts one request of several inputs across replicas, so that it
        ends as early as the replicas' in-flight work allows: a sequential client (one large
        request at a time, as most indexing tools send) would otherwise keep one replica busy
        and leave the others idle.

        Only where the least-loaded healthy replica holds less than the request itself: a
        fleet queued deeper than that keeps every replica busy anyway, and a request cut there
        would only cost a second call. Water-filling: the request's tokens fill the
        least-loaded healthy replicas up to one
        level, ``level - in_flight_tokens`` each; a replica whose share would be under
        ``min_part_tokens`` (one already busier than the rest, or a request too small to be
        worth another call) takes none. The inputs are cut in order at the item boundaries
        nearest those shares; a part that comes out under ``min_part_tokens`` joins its
        neighbour. Returns the parts in item order, or [] when the request goes whole to one
        replica (``pick``): another policy, fewer than two inputs or healthy replicas, or a
        share too small, or the fleet queued deeper than the request."""
        n = len(item_tokens)
        if self.policy != "least_loaded" or min_part_tokens <= 0 or n < 2:
            return []
        total = sum(int(t) for t in item_tokens)
        ranked = sorted((l for l in loads if l.healthy), key=lambda l: (l.in_flight_tokens, l.index))
        if not ranked or ranked[0].in_flight_tokens >= total:
            return []
        k = min(len(ranked), total // min_part_tokens)
        while k >= 2:
            level = (total + sum(l.in_flight_tokens for l in ranked[:k])) / k
            if level - ranked[k - 1].in_flight_tokens >= min_part_tokens:
                break
            k -= 1
        if k < 2:
            return []
        shares = [level - l.in_flight_tokens for l in ranked[:k]]
        # cut at the item boundary nearest each cumulative share
        prefix = [0]
        for t in item_tokens:
            prefix.append(prefix[-1] + int(t))
        cuts, want, j = [0], 0.0, 0
        for share in shares[:-1]:
            want += share
            while j < n and prefix[j + 1] <= want:
                j += 1
            end = j + 1 if j < n and want - prefix[j] > prefix[j + 1] - want else j
            cuts.append(min(max(end, cuts[-1]), n))
        cuts.append(n)
        bounds = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
        # a part left small by the items' sizes joins its smaller neighbour
        while len(bounds) > 1:
            sizes = [prefix[b] - prefix[a] for a, b in bounds]
            i = min(range(len(bounds)), key=sizes.__getitem__)
            if sizes[i] >= min_part_tokens:
                break
            if i == 0 or (i + 1 < len(bounds) and sizes[i + 1] < sizes[i - 1]):
                bounds[i:i + 2] = [(bounds[i][0], bounds[i + 1][1])]
            else:
                bounds[i - 1:i + 1] = [(bounds[i - 1][0], bounds[i][1])]
        if len(bounds) < 2:
            return []
        # the largest part to the least-loaded replica
        order = sorted(range(len(bounds)), key=lambda i: -(prefix[bounds[i][1]] - prefix[bounds[i][0]]))
        replica = {i: ranked[r].index for r, i in enumerate(order)}
        return [(replica[i], a, b) for i, (a, b) in enumerate(bounds)]

    def donor(self, loads: Sequence[ReplicaLoad], idle: int,
              min_tokens: int) -> Optional[tuple[int, int]]:
        """Handing back (floe/fleet/router.py): replica ``idle`` has just answered its last
        request while another still holds work. Returns the busiest other healthy replica (the
        most in-flight tokens) and the tokens it is asked to give back, half of its in-flight
        ones (what would leave the two even), where it holds at least twice ``min_tokens``;
        None otherwise, or under another policy than ``least_loaded``."""
        if self.policy != "least_loaded" or min_tokens <= 0:
            return None
        me = next((l for l in loads if l.index == idle), None)
        if me is None or not me.healthy or me.in_flight_tokens or me.in_flight_requests:
            return None
        others = [l for l in loads if l.healthy and l.index != idle]
        if not others:
            return None
        busiest = max(others, key=lambda l: (l.in_flight_tokens, -l.index))
        if busiest.in_flight_tokens < 2 * min_tokens:
            return None
        return busiest.index, busiest.in_flight_tokens // 2
