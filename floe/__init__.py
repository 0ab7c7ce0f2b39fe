"""floe: a high-throughput text-embedding inference server.

``floe.Client`` and ``floe.AsyncClient`` are imported on first use, so ``import floe`` stays cheap
(no grpc, httpx or torch).
"""

from typing import Any

__all__ = ["Client", "AsyncClient"]


def __getattr__(name: str) -> Any:
    if name in ("Client", "AsyncClient"):
        from floe import client
        return getattr(client, name)
    raise AttributeError(f"module 'floe' has no attribute {name!r}")
