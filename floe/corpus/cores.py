"""How a corpus job's engines and background threads share a machine's cores (local.py and
ray_pool.py alike)."""

from __future__ import annotations

import os
import threading

BACKGROUND_NICE = 10   # reading, tokenizing and writing yield the cores to the forward pass


def background_thread() -> None:
    """Pool initializer: this thread runs at a lower priority than the engine's threads.

    Reading, tokenizing and writing are a few percent of the job, but a thread of theirs that
    preempts one of the engine's threads stalls the whole forward at its next barrier. At nice 10
    they take the CPU the forward leaves idle (between batches, at the end of a shard), and when
    the engine waits for their next shard they have the cores to themselves. Linux applies
    niceness per thread; elsewhere this does nothing.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):
        pass


def cpu_engines(threads: int) -> int:
    """How many engines ``threads`` compute threads run as on a CPU: two from 2 threads up, each
    on half of them (unpinned). On a 2-core AMD EPYC Zen 4 (bf16) the random-word corpus ran at
    232 rows/s as 2 engines x 1 thread and 205 as 1 x 2 threads, in the same pipeline
    (docs/scale-out.md): a small model's forward has many short operations, and every one ends at
    a barrier of all of its engine's threads."""
    return 2 if threads >= 2 else 1


def warm_up(engines: list, spec) -> None:
    """One tiny forward per engine, before their threads start: the first call into OpenVINO's
    Python bindings initializes function-local statics under a C++ guard that waits while holding
    what the other thread needs, and two engines making their first call at once deadlocked
    (py-spy: both in __cxa_guard_acquire under InferRequest.infer)."""
    import numpy as np

    probe = [np.full(min(8, spec.max_seq_length), min(1000, spec.vocab_size - 1), np.int32)]
    for engine in engines:
        engine.run(engine.prepare(probe))
