"""Concurrent requests to one replica merged into one call: the hop's cost paid per wave, not per
request.

A replica call costs the same fixed work on both sides whatever it carries (a gRPC call, a task,
the replica core's hand-over between its threads). Under load many small requests reach the same
replica in one turn of the event loop; ``Coalescer.submit`` queues each one, and one callback at
the end of the turn sends every request queued for the same options as one call (its token ids
concatenated) and splits the answer back by item. A request alone in its turn still goes at once:
nothing waits for company.

Merging is exact: the replica applies the options (normalize, dimensions, output dtype) per row,
and its batcher splits the call into sequences anyway, so each request gets the bytes it would
have got alone. A call's failure is each member's failure (the same kind, so the router retries or
answers each as it would alone). A member cancelled by its caller is left out of the answer; when
every member is gone the call itself is cancelled, so the replica drops the queued work.

A call carries at most ``max_tokens`` tokens and ``max_items`` inputs: a group reaching either is
sent at once, and a request as large goes alone. The replica answers a call when its last row is
done, so a merged call is kept to what one forward pass takes (the replica's batch budget and size):
a request then waits no longer inside a merged call than it would have waited alone, and a
``--forward-timeout`` that one request meets is met by the call.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

import numpy as np

from floe.errors import CancelledError as FloeCancelled, InternalError
from floe.protocol import EmbedResult, EncodeOptions, SparseRows, Timings, TokenBatch, row_bytes

Call = Callable[[TokenBatch, EncodeOptions, str, Optional[float]], Awaitable[EmbedResult]]


@dataclass(eq=False)
class _Member:
    tokens: TokenBatch
    request_id: str
    future: asyncio.Future


@dataclass(eq=False)
class _Group:
    options: EncodeOptions
    timeout: Optional[float]
    members: list[_Member] = field(default_factory=list)
    tokens: int = 0
    items: int = 0
    task: Optional[asyncio.Task] = None
    answered: bool = False   # the call returned or raised: nothing left to cancel


class Coalescer:
    """Merges the calls submitted in one event-loop turn with equal options and timeout."""

    def __init__(self, call: Call, max_tokens: int, max_items: int = 256) -> None:
        self._call = call
        self.max_tokens = max_tokens
        self.max_items = max_items
        self._open: dict[tuple[EncodeOptions, Optional[float]], _Group] = {}
        self._flush_scheduled = False
        self._sent: set[_Group] = set()   # groups whose call is in flight
        self.calls = 0                    # replica calls made (merged or not)

    async def submit(self, tokens: TokenBatch, options: EncodeOptions, request_id: str,
                     timeout: Optional[float] = None) -> EmbedResult:
        """Embeds one request, possibly inside a merged call; raises what the call raised."""
        if (self.max_tokens <= 0 or self.max_items <= 1 or tokens.total_tokens >= self.max_tokens
                or tokens.n >= self.max_items):
            self.calls += 1
            return await self._call(tokens, options, request_id, timeout)
        loop = asyncio.get_running_loop()
        key = (options, timeout)
        group = self._open.get(key)
        if group is not None and (group.tokens + tokens.total_tokens > self.max_tokens
                                  or group.items + tokens.n > self.max_items):
            self._send(self._open.pop(key))
            group = None
        if group is None:
            group = self._open[key] = _Group(options, timeout)
        member = _Member(tokens, request_id, loop.create_future())
        group.members.append(member)
        group.tokens += tokens.total_tokens
        group.items += tokens.n
        member.future.add_done_callback(lambda _f, g=group: self._member_done(g))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await member.future

    @property
    def queued(self) -> int:
        """Requests submitted this turn whose call has not been sent yet."""
        return sum(1 for g in self._open.values() for m in g.members if not m.future.done())

    def abort(self, request_id: str) -> bool:
        """Fails the queued or in-flight members with this id with CancelledError (the FloeError).
        False when none is held here (the caller then asks the replica itself)."""
        found = False
        for group in [*self._open.values(), *self._sent]:
            for m in group.members:
                if m.request_id == request_id and not m.future.done():
                    m.future.set_exception(FloeCancelled(f"request {request_id} was aborted"))
                    found = True
        return found

    # --- internals --------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        groups, self._open = list(self._open.values()), {}
        for group in groups:
            self._send(group)

    def _send(self, group: _Group) -> None:
        live = [m for m in group.members if not m.future.done()]
        if not live:
            return
        group.members = live
        self.calls += 1
        self._sent.add(group)
        group.task = asyncio.get_running_loop().create_task(self._run(group))

    async def _run(self, group: _Group) -> None:
        members = group.members
        try:
            if len(members) == 1:
                m = members[0]
                result = await self._call(m.tokens, group.options, m.request_id, group.timeout)
                group.answered = True
                if not m.future.done():
                    m.future.set_result(result)
                return
            splits = None
            if any(m.tokens.type_splits is not None for m in members):
                splits = np.concatenate([m.tokens.lengths if m.tokens.type_splits is None
                                         else m.tokens.type_splits for m in members])
            merged = TokenBatch(ids=np.concatenate([m.tokens.ids for m in members]),
                                lengths=np.concatenate([m.tokens.lengths for m in members]),
                                type_splits=splits)
            result = await self._call(merged, group.options, members[0].request_id + "+merged",
                                      group.timeout)
            group.answered = True
            for m, part in zip(members, split(result, [m.tokens.n for m in members])):
                if not m.future.done():
                    part.request_id = m.request_id
                    m.future.set_result(part)
        except asyncio.CancelledError:
            # every member went away (see _member_done), or the loop is closing
            for m in members:
                if not m.future.done():
                    m.future.cancel()
        except BaseException as err:  # noqa: BLE001 - each member raises what the call raised
            group.answered = True
            for m in members:
                if not m.future.done():
                    m.future.set_exception(_clone(err))
        finally:
            self._sent.discard(group)
            for m in members:   # never leave a caller waiting, whatever went wrong above
                if not m.future.done():
                    m.future.set_exception(InternalError("the merged call ended without an answer"))

    def _member_done(self, group: _Group) -> None:
        # the last member gone before the answer: nobody needs the call any more
        task = group.task
        if task is not None and not group.answered and not task.done() and all(m.future.done() for m in group.members):
            task.cancel()


def _clone(err: BaseException) -> BaseException:
    """The same error as a distinct object for each member (each raise writes its own traceback
    into it). Not copy.copy: that rebuilds from ``args`` and breaks errors with extra fields."""
    try:
        new = type(err).__new__(type(err))
        new.__dict__.update(err.__dict__)
        new.args = err.args
        return new
    except Exception:  # noqa: BLE001 - an exotic exception type: share the one object
        return err


def split(result: EmbedResult, counts: list[int]) -> list[EmbedResult]:
    """One EmbedResult per consecutive run of ``counts`` items (the timings are the call's)."""
    row = 0 if result.sparse is not None else row_bytes(result.dtype, result.dim)
    view = memoryview(result.data)
    offsets = result.sparse.offsets() if result.sparse is not None else None
    out, start = [], 0
    for n in counts:
        t = result.timings
        sparse = None
        if offsets is not None:
            a, b = offsets[start], offsets[start + n]
            sparse = SparseRows(counts=result.sparse.counts[start:start + n],
                                indices=result.sparse.indices[a:b], values=result.sparse.values[a:b])
        out.append(EmbedResult(
            n=n, dim=result.dim, dtype=result.dtype,
            data=bytes(view[start * row:(start + n) * row]),
            token_counts=result.token_counts[start:start + n], model=result.model,
            timings=Timings(t.tokenize_s, t.queue_s, t.inference_s, t.total_s), sparse=sparse))
        start += n
    return out
