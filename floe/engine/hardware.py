"""What the CPU can do, read from /proc/cpuinfo flags (never from the vendor name).

Kept apart from the torch engine so that the OpenVINO engine and the engine choice can ask without
importing torch.
"""

from __future__ import annotations

from typing import Optional


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16(flags: Optional[set[str]] = None) -> bool:
    """True on CPUs with bf16 matmul instructions (Intel AMX, or avx512_bf16 on Intel/AMD)."""
    flags = cpu_flags() if flags is None else flags
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def cpu_has_amx(flags: Optional[set[str]] = None) -> bool:
    """True on CPUs with AMX tiles for bf16 (Intel Xeon since Sapphire Rapids), where OpenVINO's
    CPU plugin takes other kernels and fusions than on AVX-512 alone."""
    flags = cpu_flags() if flags is None else flags
    return "amx_bf16" in flags
