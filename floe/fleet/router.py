"""The router: pick a replica, send the request, retry once elsewhere when the replica failed.

It knows replicas only through the small ``Target`` interface (a supervisor slot in production,
a fake in the unit tests), and decides by the kind of error (floe/fleet/link.py tells them apart):

- ``ReplicaLost`` / ``ReplicaDraining`` (connection lost, replica stopping), an OverloadedError
  from a replica's own queue, or an InternalError after which the replica's process is seen to
  exit: nothing useful was computed, so the request goes once to another healthy replica;
- ``ReplicaTimeout``: 503 with Retry-After, not retried (the replica is busy or hung; the
  supervisor finds out which) and the input is not blamed;
- anything else (validation, too large, an engine error the replica survived) is the answer.

**An input that kills the model process.** When the replica running a request crashes (its
process exits without having been asked to), every request it held is a suspect. A suspect's
retry runs alone (never merged with other requests) and one suspect at a time across the fleet
(``_suspects``), so that when a replica crashes again under a lone suspect, that suspect is the
cause: it is answered ``PoisonInputError`` (422, not retryable: a 503 would invite the client to
kill a third replica), and its fingerprint is remembered so that the same input sent again is
refused before it reaches a replica. Innocent requests that happened to share the first crashed
replica pay one serialized retry, no more.

When no healthy replica can take an attempt but one may come back (it is starting or
restarting, or a failed call took it out of rotation until its next good probe), the request
waits up to ``replica_wait`` seconds for it instead of failing at once: on a loaded machine a
single replica misses a probe or a connection handshake, and a client indexing a corpus should
not see that as a 503. A replica given up (crash loop) or stopping is not waited for. The
replica a failed attempt left, once back in rotation, may take the retry: with one replica
there is nowhere else to go.

**A request cut across replicas.** Under ``least_loaded``, a request of several inputs that
would leave a replica idle while another works through it alone is cut into consecutive parts,
one per replica (floe/fleet/balance.py ``spread``: water-filling of the replicas' in-flight
tokens), sent side by side and answered as one. Each part is routed as a request of its own
(its replica's failure retried elsewhere, a crash suspect isolated), the first part to fail
fails the request with its error and withdraws the others, and a request aborted by its client
aborts every part. A sequential client, one large request at a time, then gets every replica.

**Handing back.** A client that sends a wave of requests and waits for all of them (an indexing
tool's batch of calls) ends each wave with one replica still working through its queue while
the other, done, waits: on two cores 0.2-0.3 s of a 4 s prose pass. When a replica answers its
last request while another holds at least twice ``hand_back_min_tokens`` in flight
(``Balancer.donor``), the router asks the busy one to give back queued inputs no batch has
taken yet, up to half its work, of this front end's calls only, most recent first (the
replica's ``hand_back``); each call that gave some is answered without them, and the rows are
routed as a request of their own, to the idle replica first, then joined into the call's answer
(floe/fleet/replica_client.py). Nothing computed is computed twice, and rows the other replica
cannot take go back to the first one: a hand-back never loses a row. Rows that crash the model
there make the call's requests crash suspects, retried alone as after any crash. One hand-back
at a time.

Client-facing messages never name replica addresses; the log line does.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from typing import Optional, Protocol, Sequence

from floe import metrics
from floe.errors import FloeError, InternalError, OverloadedError, PoisonInputError, UnavailableError
from floe.protocol import EmbedResult, EncodeOptions, TokenBatch
from floe.fleet.balance import Balancer, Part, ReplicaLoad
from floe.fleet.replica_client import ReplicaClient
from floe.fleet.link import ReplicaDraining, ReplicaLost, ReplicaTimeout

log = logging.getLogger("floe.router")


class Target(Protocol):
    index: int

    @property
    def client(self) -> Optional[ReplicaClient]: ...

    def load(self) -> ReplicaLoad: ...

    def leave_rotation(self) -> None:
        """Takes the replica out of rotation until its next good health probe."""

    def may_recover(self) -> bool:
        """True while the replica, if not in rotation now, may come back (starting, restarting,
        or out of rotation after a failed call); False once given up or stopping."""

    async def crashed_under(self, client: ReplicaClient, seconds: float) -> bool:
        """True when the process behind ``client`` exits within ``seconds`` without having been
        asked to (not a drain, not its supervisor's kill of a hung process)."""


# How often a request waiting for a replica to come back looks again: the balancer's pick is a
# few comparisons, and a tenth of a second is small next to a restart or a probe interval.
WAIT_POLL_S = 0.1
# How long after a failed call the router watches for the replica's process to exit: a crash is
# seen by its supervisor within milliseconds; a second is generous on a loaded machine.
CRASH_WATCH_S = 1.0
POISON_MEMORY = 1024   # fingerprints of inputs that crashed two replicas, most recent kept


def fingerprint(tokens: TokenBatch) -> bytes:
    """What identifies a request's inputs: its token ids and how they split into items."""
    h = hashlib.blake2b(tokens.ids.tobytes(), digest_size=16)
    h.update(tokens.lengths.tobytes())
    return h.digest()


class Router:
    def __init__(self, balancer: Balancer, targets: Sequence[Target], forward_timeout: float,
                 replica_wait: float, split_min_tokens: int = 0,
                 hand_back_min_tokens: int = 0) -> None:
        self.balancer = balancer
        self.targets = list(targets)
        self.forward_timeout = forward_timeout
        self.replica_wait = replica_wait
        self.split_min_tokens = split_min_tokens
        self.hand_back_min_tokens = hand_back_min_tokens
        self._handing_back: Optional[asyncio.Task] = None
        self._routes: dict[str, Target] = {}   # request id -> replica running it (for abort)
        self._parts: dict[str, list[str]] = {}   # request id -> its parts' ids (a split request)
        self._suspects = asyncio.Lock()        # one crash suspect in flight at a time
        self._poison: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        # replica index -> when its last refusal said a request like that one would fit again
        # (time.monotonic()); cleared by its next answer (early_refusal)
        self._refused_until: dict[int, float] = {}
        self.early_refused = 0    # requests refused here, without a replica's round trip
        self.retried = 0          # requests that succeeded on their retry replica
        self.failed_retries = 0   # requests whose retry failed too
        self.poisoned = 0         # requests refused as inputs that crash the model
        self.split = 0            # requests cut across replicas
        self.handed_back = 0      # rows a replica gave back to be computed on another

    def _pick(self, exclude: list[int]) -> Optional[Target]:
        i = self.balancer.pick([t.load() for t in self.targets], exclude)
        return None if i is None else self.targets[i]

    async def _next_target(self, exclude: list[int], prefer: Optional[int] = None) -> Optional[Target]:
        """A healthy replica not in ``exclude`` (``prefer``, a replica index, when it is one),
        waiting up to ``replica_wait`` seconds for one that may come back; None when there is
        none to wait for or the wait ran out."""
        if prefer is not None and prefer not in exclude:
            target = self.targets[prefer]
            if target.load().healthy and target.client is not None:
                return target
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.replica_wait
        while True:
            target = self._pick(exclude)
            if target is not None and target.client is not None:
                return target
            if loop.time() >= deadline or not any(
                    t.may_recover() for t in self.targets if t.index not in exclude):
                return None
            await asyncio.sleep(WAIT_POLL_S)

    def early_refusal(self) -> Optional[OverloadedError]:
        """The refusal a request without a deadline of its own gets before it is even tokenized,
        while every healthy replica's last answer was a refusal whose Retry-After has not passed
        (each is the time until the replica's queue has drained enough for a request like the
        one it refused). Under overload most requests are refused, and each refusal would cost a
        tokenization and a round trip to every replica, CPU the replicas' forward passes share on
        a small machine. None: try the replicas."""
        if not self._refused_until:
            return None
        now = time.monotonic()
        waits = []
        for t in self.targets:
            if not t.load().healthy:
                continue
            until = self._refused_until.get(t.index)
            if until is None or until <= now:
                return None
            waits.append(until - now)
        if not waits:
            return None
        self.early_refused += 1
        return OverloadedError("every replica refused a request like this one moments ago and "
                               "is not predicted to have room yet; retry later",
                               retry_after=min(waits))

    def _refuse_known_poison(self, tokens: TokenBatch) -> None:
        if not self._poison:
            return   # the common case costs nothing: no hashing until an input has crashed twice
        why = self._poison.get(fingerprint(tokens))
        if why is not None:
            self.poisoned += 1
            metrics.POISON_INPUTS.inc()
            raise PoisonInputError(why + "; it is refused without being sent again", param="input")

    def _remember_poison(self, tokens: TokenBatch, count: bool = True) -> PoisonInputError:
        """Remembers ``tokens`` as an input that crashes the model; the error to answer it with.
        ``count=False``: the same request already counted (a split request, remembered whole
        beside the part that crashed, so that sent again it is refused before any replica)."""
        n = tokens.n
        what = ("the input" if n == 1 else f"one or more of these {n} inputs")
        why = (f"{what} ({tokens.total_tokens} tokens, fingerprint "
               f"{fingerprint(tokens).hex()[:16]}) made the model's process exit on two replicas")
        self._poison[fingerprint(tokens)] = why
        while len(self._poison) > POISON_MEMORY:
            self._poison.popitem(last=False)
        if count:
            self.poisoned += 1
            metrics.POISON_INPUTS.inc()
        return PoisonInputError(why + "; it is not retried", param="input")

    def _spread(self, tokens: TokenBatch) -> list[Part]:
        if self.split_min_tokens <= 0 or tokens.n < 2 or tokens.total_tokens < 2 * self.split_min_tokens:
            return []
        loads = [t.load() for t in self.targets]
        ready = [l if t.client is not None else ReplicaLoad(l.index, False)
                 for t, l in zip(self.targets, loads)]
        return self.balancer.spread(ready, tokens.lengths.tolist(), self.split_min_tokens)

    async def encode(self, tokens: TokenBatch, options: EncodeOptions, request_id: str) -> EmbedResult:
        self._refuse_known_poison(tokens)
        parts = self._spread(tokens)
        if parts:
            return await self._encode_split(tokens, options, request_id, parts)
        return await self._encode_whole(tokens, options, request_id)

    async def _encode_split(self, tokens: TokenBatch, options: EncodeOptions, request_id: str,
                            parts: list[Part]) -> EmbedResult:
        """The parts side by side, each routed as a request of its own; their answers joined in
        item order, or the first failure (in item order among those failed together), the
        other parts withdrawn."""
        self.split += 1
        metrics.SPLIT_REQUESTS.inc()
        ids = [f"{request_id}/{k}" for k in range(len(parts))]
        self._parts[request_id] = ids
        tasks = [asyncio.ensure_future(self._encode_whole(tokens.take(a, b), options, part_id,
                                                          prefer=replica))
                 for part_id, (replica, a, b) in zip(ids, parts)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
            if failed:
                err = failed[0].exception()
                if isinstance(err, PoisonInputError):
                    self._remember_poison(tokens, count=False)
                raise err
            return EmbedResult.concat([t.result() for t in tasks], request_id)
        finally:
            self._parts.pop(request_id, None)
            pending = [t for t in tasks if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                # each part's cancellation reaches its replica (the coalescer withdraws the call)
                await asyncio.gather(*pending, return_exceptions=True)

    async def _encode_whole(self, tokens: TokenBatch, options: EncodeOptions, request_id: str,
                            prefer: Optional[int] = None) -> EmbedResult:
        exclude: list[int] = []   # tried replicas the retry must not go back to
        last: Optional[FloeError] = None
        tried = crashes = 0
        refused: list[float] = []   # Retry-After of each replica that refused it
        try:
            for attempt in range(2):
                if crashes:
                    # a crash suspect: alone, and one at a time (see the module docstring)
                    async with self._suspects:
                        outcome = await self._attempt(tokens, options, request_id, exclude, alone=True)
                else:
                    outcome = await self._attempt(tokens, options, request_id, exclude, alone=False,
                                                  prefer=None if attempt else prefer)
                if outcome is None:
                    break
                result, err, crashed = outcome
                tried += 1
                if err is None:
                    if attempt:
                        self.retried += 1
                        metrics.RETRIES.inc()
                    return result
                last = err
                if isinstance(err, OverloadedError) and err.retry_after:
                    refused.append(err.retry_after)
                crashes += crashed
                if crashes == 2:
                    raise self._remember_poison(tokens)
                log.warning("request %s failed on a replica (%s); %s", request_id, err.message,
                            "retrying" if attempt == 0 else "giving up")
        finally:
            self._routes.pop(request_id, None)
        if tried > 1:
            self.failed_retries += 1
            metrics.FAILED_RETRIES.inc()
        if isinstance(last, OverloadedError):
            # the replica's own reason (its queue, or a deadline or target its cost model says
            # cannot be met), and the soonest any replica tried said it would fit
            raise OverloadedError(f"every replica tried refused it: {last.message}",
                                  retry_after=min(refused) if refused else 1.0)
        raise UnavailableError("no healthy replica could take the request, retry later")

    async def _attempt(self, tokens: TokenBatch, options: EncodeOptions, request_id: str,
                       exclude: list[int], alone: bool, prefer: Optional[int] = None):
        """One try on one replica: (result, None, False), or (None, the error, whether the
        replica crashed under it) for an error worth a retry; None when no replica is there.
        Raises the answer for errors that are the answer."""
        target = await self._next_target(exclude, prefer)
        if target is None:
            return None
        client = target.client
        self._routes[request_id] = target
        comes_back = False   # this replica may take the retry once back in rotation
        crashed = False
        try:
            result = await client.encode(tokens, options, request_id, timeout=self.forward_timeout,
                                         alone=alone)
            self._refused_until.pop(target.index, None)
            self._maybe_hand_back(target)
            return result, None, False
        except ReplicaTimeout as e:
            log.warning("request %s: %s; answered 503", request_id, e.message)
            raise UnavailableError(
                f"the model did not answer within {self.forward_timeout:g} s; the server "
                "is busy, retry later") from None
        except (ReplicaLost, ReplicaDraining) as e:
            if target.client is client:
                target.leave_rotation()
            comes_back = True
            if isinstance(e, ReplicaLost):
                crashed = await target.crashed_under(client, CRASH_WATCH_S)
            err: FloeError = e
        except OverloadedError as e:
            if e.retry_after and options.deadline is None:
                self._refused_until[target.index] = time.monotonic() + e.retry_after
            err = e
        except InternalError as e:
            if not await target.crashed_under(client, CRASH_WATCH_S):
                raise
            crashed = comes_back = True   # as its restarted process
            err = e
        if not comes_back:
            exclude.append(target.index)
        log.warning("request %s: replica %d: %s%s", request_id, target.index, err.message,
                    " (its process crashed)" if crashed else "")
        return None, err, crashed

    def _maybe_hand_back(self, idle: Target) -> None:
        """After an answer: where its replica has nothing left in flight and another has a
        queue, that one hands back part of it (module docstring, "Handing back")."""
        if self.hand_back_min_tokens <= 0 or self._handing_back is not None:
            return
        decision = self.balancer.donor([t.load() for t in self.targets], idle.index,
                                       self.hand_back_min_tokens)
        client = None if decision is None else self.targets[decision[0]].client
        if client is not None:
            self._handing_back = asyncio.ensure_future(
                self._hand_back(client, idle.index, decision[1]))

    async def _hand_back(self, client: ReplicaClient, idle: int, max_tokens: int) -> None:
        async def rehome(tokens: TokenBatch, options: EncodeOptions, request_id: str,
                         _timeout: Optional[float]) -> EmbedResult:
            return await self._encode_whole(tokens, options, request_id, prefer=idle)

        try:
            rows = await client.hand_back(max_tokens, self.hand_back_min_tokens, rehome)
        except FloeError as e:   # the rows it may have given are computed where they were
            log.info("replica %d did not answer a hand-back: %s", client.replica_index, e.message)
            rows = 0
        finally:
            self._handing_back = None
        if rows:
            self.handed_back += rows
            metrics.HANDED_BACK_ROWS.inc(rows)

    def status(self, replicas: list[dict], ready: bool, stopping: bool) -> dict:
        """The /info summary of the replicas behind this router (``replicas``: one dict each,
        with at least ``index``, ``state`` and ``healthy``), with the router's own counters."""
        reason = "" if ready else ("stopping" if stopping else "no healthy replica: " + "; ".join(
            f"replica {r['index']} {r['state']}" for r in replicas))
        return {"ready": ready, "reason": reason, "load_balancing": self.balancer.policy,
                "healthy_replicas": sum(bool(r["healthy"]) for r in replicas),
                "num_replicas": len(replicas), "retried_requests": self.retried,
                "failed_retries": self.failed_retries, "poisoned_requests": self.poisoned,
                "early_refused_requests": self.early_refused, "split_requests": self.split,
                "handed_back_rows": self.handed_back,
                "replicas": replicas}

    async def abort(self, request_id: str) -> bool:
        """Asks the replica running ``request_id`` (each, for a split request) to drop its
        queued sequences."""
        parts = self._parts.get(request_id)
        if parts is not None:
            found = await asyncio.gather(*(self.abort(p) for p in parts))
            return any(found)
        target = self._routes.get(request_id)
        if target is None or target.client is None:
            return False
        return await target.client.abort(request_id)


class Routed:
    """The request side of a set of replicas behind one Router: the manager that supervises them
    (floe/fleet/manager.py) and a front-end worker's view of them (floe/fleet/remote.py)."""

    router: Router

    async def encode(self, tokens: TokenBatch, options: EncodeOptions, request_id: str) -> EmbedResult:
        return await self.router.encode(tokens, options, request_id)

    async def abort(self, request_id: str) -> bool:
        return await self.router.abort(request_id)

