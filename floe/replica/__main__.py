"""`python -m floe.replica`: one model replica process (floe/replica/main.py).

A replica started by the fleet's supervisor finds its ``ReplicaLaunch`` (floe/protocol.py) in
FLOE_REPLICA_LAUNCH. Before anything heavy is imported it applies what must precede the first
thread pool: its CPU affinity (so torch's and OpenVINO's pools are sized and placed inside its
cores), and a request to the kernel to SIGTERM it when the supervising process dies (a preexec_fn
would do the same but is unsafe in a parent that runs gRPC threads). Run by hand, without a
launch, it is a standalone replica (``--help``).
"""

import os
import sys


def _apply_launch_placement() -> None:
    """Affinity and parent-death signal from the launch, with the standard library only."""
    import json
    import signal

    launch = json.loads(os.environ["FLOE_REPLICA_LAUNCH"])   # the name ReplicaLaunch.ENV holds
    cores = (launch.get("placement") or {}).get("cpu_cores")
    if cores:
        os.sched_setaffinity(0, cores)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the replica's own watch of its parent covers it
        pass
    if os.getppid() != launch["parent_pid"]:
        sys.exit(0)  # the supervisor died before the death signal was armed


if __name__ == "__main__":
    if os.environ.get("FLOE_REPLICA_LAUNCH"):
        _apply_launch_placement()
    from floe.replica.main import main

    sys.exit(main())
