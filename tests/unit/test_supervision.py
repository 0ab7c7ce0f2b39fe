"""The shared child-process supervisor (floe/child_process.py) over tiny `python -c` children:
handshake, stdin, log re-emission, restart and give-up, refusal, stop with SIGTERM then SIGKILL."""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import pytest

import floe.child_process as supervision
from floe.config import ReplicaSetSettings
from floe.protocol import FrontendHello
from floe.child_process import ChildProcess, Command

# runs `before`, reads its first stdin line, logs it as a JSON warning, says hello, runs `then`
CHILD = r"""
import json, os, signal, sys, time
{before}
first = sys.stdin.readline().strip()
print(json.dumps({"level": "warning", "message": "got " + first}), file=sys.stderr, flush=True)
print('FLOE_FRONTEND_READY {"index": 1, "pid": %d}' % os.getpid(), flush=True)
{then}
"""


class Child(ChildProcess):
    HELLO = FrontendHello

    def __init__(self, then: str = "", before: str = "", refuse: bool = False, **limits) -> None:
        limits = {"startup_timeout": 30.0, "max_restarts": 2, "restart_window": 60.0, **limits}
        self.states: list[str] = []
        self.restarting = asyncio.Event()
        super().__init__("child 1", ReplicaSetSettings(**limits), "floe.test.child", self._seen)
        self.code = CHILD.replace("{before}", before).replace("{then}", then)
        self.refuse, self.exits = refuse, 0

    def _seen(self) -> None:
        self.states.append(self.state)
        if self.state == "restarting":
            self.restarting.set()

    def _command(self) -> Command:
        return Command([sys.executable, "-c", self.code], dict(os.environ), stdin=b"table\n")

    async def _on_exit(self) -> None:
        self.exits += 1

    def _refusal(self):
        return "refused" if self.refuse else None


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(supervision, "BACKOFF_START_S", 0.01)


async def test_ready_then_stopped_by_sigterm(caplog):
    caplog.set_level(logging.INFO)
    c = Child("time.sleep(60)")
    c.start()
    await c.ready_event.wait()
    assert c.state == "ready" and c.pid and c.states == ["starting", "ready"]
    assert list(c.stderr_tail) == ["got table"]   # the first stdin bytes reached it
    assert any(r.name == "floe.test.child" and r.levelno == logging.WARNING
               and r.getMessage() == "got table" for r in caplog.records)
    await c.stop(grace=10)
    assert c.state == "stopped" and c.last_exit == "killed by SIGTERM" and c.restarts == 0
    assert c.exits == 1 and c.pid is None and c.states[-1] == "stopped"


async def test_a_crash_loop_is_given_up_with_its_last_failure():
    c = Child("print('boom', file=sys.stderr); sys.exit(3)", max_restarts=2)
    c.start()
    await c.ready_event.wait()   # the first ready
    await c._task
    assert c.state == "failed" and c.restarts == 2 and c.exits == 3
    assert c.message.startswith("given up: crash-looped: 2 restarts within 60 s")
    assert "exit code 3" in c.message and "boom" in c.message
    await c.stop(grace=1)
    assert c.state == "failed"


async def test_a_refused_first_start_is_given_up_at_once():
    c = Child(before="print('bad config', file=sys.stderr); sys.exit(2)", refuse=True)
    c.start()
    await c.ready_event.wait()
    assert c.state == "failed" and c.restarts == 0
    assert c.message == "given up: refused; last failure: exit code 2 before becoming ready; stderr: bad config"


async def test_stop_kills_a_child_that_ignores_sigterm():
    c = Child(before="signal.signal(signal.SIGTERM, signal.SIG_IGN)", then="time.sleep(60)")
    c.start()
    await c.ready_event.wait()
    await c.stop(grace=0.5)
    assert c.state == "stopped" and c.last_exit == "killed by SIGKILL"


async def test_stop_during_the_backoff_does_not_restart():
    c = Child("sys.exit(1)", max_restarts=5)
    supervision.BACKOFF_START_S = 30.0   # undone by the fixture
    c.start()
    await c.ready_event.wait()
    await c.restarting.wait()
    await c.stop(grace=1)
    assert c.state == "stopped" and c.restarts == 0


async def test_a_spawn_the_os_refuses_is_given_up_not_hung():
    c = Child()
    c._command = lambda: Command(["/nonexistent/python"], dict(os.environ))
    c.start()
    await asyncio.wait_for(c.ready_event.wait(), 10)
    assert c.state == "failed" and "supervision failed: FileNotFoundError" in c.message
