#!/usr/bin/env python3
"""Where one forward pass spends its time, per operation, on each engine.

OpenVINO: the compiled model's performance counters (``PERF_COUNT``): every executed node's
type (MatMul, Softmax, MVN (layer norm), Gelu, Eltwise, Reorder ...), the kernel that ran it
(``exec_type``: ``brgemm_avx512_amx`` / ``brgemm_avx2`` / ``jit_avx512`` ..., which says whether
AMX ran) and its time. torch: ``torch.profiler`` CPU time by aten op. Both run the same padded
batch shapes, after a warm-up, and print each category's share of the forward.

    .venv/bin/python scripts/profile_engine.py --dtype auto --shapes 64x50,16x256,256x64
    .venv/bin/python scripts/profile_engine.py --engines openvino --dtype int8 --shapes 64x50
    .venv/bin/python scripts/profile_engine.py --engines openvino-native --dtype bfloat16 --threads 1 --shapes 64x18,40x50

Run it with nothing else on the cores.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torch aten ops grouped like OpenVINO's node types, so the two tables line up.
_TORCH_GROUPS = {
    "matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear",
               "mkldnn", "onednn", "aten::_mkl"),
    "attention": ("scaled_dot_product", "aten::_softmax", "aten::softmax", "flash_attention"),
    "layer norm": ("layer_norm",),
    "gelu / activation": ("gelu", "aten::tanh", "aten::relu", "silu"),
    "copies / reorders": ("aten::copy_", "aten::contiguous", "aten::clone", "aten::to",
                          "aten::_to_copy", "aten::transpose", "aten::permute", "aten::view",
                          "aten::reshape", "aten::expand", "aten::cat", "aten::empty"),
    "eltwise": ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::sum", "aten::where",
                "aten::masked_fill", "aten::index", "aten::embedding"),
}


def shapes_arg(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",")]  # type: ignore[misc]


def batch(engine, rows: int, length: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return engine.prepare([rng.integers(min(1000, vocab - 1), vocab, length).astype(np.int32) for _ in range(rows)])


def profile_openvino(spec, dtype: str, threads: int, shapes, repeats: int,
                     native: bool = False) -> None:
    from floe.engine.openvino_engine import OpenVINOEngine

    engine = OpenVINOEngine(spec, dtype=dtype, threads=threads, profile=True,
                            native_attention=native)
    attention = f", attention: {engine.attention}" if native else ""
    print(f"## OpenVINO {engine.dtype}, {threads} threads{attention}")
    for rows, length in shapes:
        prepared = batch(engine, rows, length, spec.vocab_size)
        for _ in range(2):
            engine.run(prepared)
        by_type: collections.Counter = collections.Counter()
        by_kernel: collections.Counter = collections.Counter()
        wall = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.run(prepared)
            wall += time.perf_counter() - t0
            for info in engine.profiling_info():
                if str(info.status).endswith("EXECUTED") and not str(info.status).endswith("NOT_EXECUTED"):
                    us = info.real_time.total_seconds() * 1e6
                    by_type[info.node_type] += us
                    by_kernel[f"{info.node_type} [{info.exec_type}]"] += us
        total = sum(by_type.values())
        tokens = rows * length
        print(f"\n### {rows} x {length}: {wall / repeats * 1e3:.1f} ms per forward "
              f"({tokens * repeats / wall:,.0f} tokens/s), counters sum {total / repeats / 1e3:.1f} ms")
        print("| node type | share | ms |")
        print("|---|---|---|")
        for name, us in by_type.most_common(12):
            print(f"| {name} | {100 * us / total:.1f}% | {us / repeats / 1e3:.2f} |")
        print("\n| node type [kernel] | share |")
        print("|---|---|")
        for name, us in by_kernel.most_common(10):
            print(f"| {name} | {100 * us / total:.1f}% |")


def profile_torch(spec, dtype: str, threads: int, shapes, repeats: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from floe.engine.torch_engine import TorchEngine

    engine = TorchEngine(spec, device="cpu", dtype=dtype, threads=threads)
    print(f"\n## torch {engine.dtype}, {threads} threads (oneDNN verbose: ONEDNN_VERBOSE=1 shows "
          f"the ISA, e.g. avx512_core_amx)")
    for rows, length in shapes:
        prepared = batch(engine, rows, length, spec.vocab_size)
        for _ in range(2):
            engine.run(prepared)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                engine.run(prepared)
        wall = time.perf_counter() - t0
        groups: collections.Counter = collections.Counter()
        for evt in prof.key_averages():
            us = evt.self_cpu_time_total
            name = evt.key
            for group, keys in _TORCH_GROUPS.items():
                if any(k in name for k in keys):
                    groups[group] += us
                    break
            else:
                groups["other (python, dispatch, " + name.split("::")[0] + ")"] += us
        total = sum(groups.values())
        print(f"\n### {rows} x {length}: {wall / repeats * 1e3:.1f} ms per forward under the "
              f"profiler ({rows * length * repeats / wall:,.0f} tokens/s)")
        print("| group | share of self CPU time |")
        print("|---|---|")
        for name, us in groups.most_common(8):
            print(f"| {name} | {100 * us / total:.1f}% |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--engines", default="openvino,torch")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 (int8: OpenVINO only)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--shapes", type=shapes_arg, default=shapes_arg("64x50,16x256,256x64"))
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from floe.config import ModelSettings
    from floe.engine.hardware import cpu_flags
    from floe.models import load_spec

    spec = load_spec(ModelSettings(model=args.model))
    isa = sorted(cpu_flags() & {"amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f",
                                "avx_vnni", "avx2"})
    print(f"# {spec.name}; CPU flags of note: {', '.join(isa) or 'none'}")
    for kind in args.engines.split(","):
        if kind in ("openvino", "openvino-native"):
            profile_openvino(spec, args.dtype, args.threads, args.shapes, args.repeats,
                             native=kind == "openvino-native")
        elif kind == "torch":
            dtype = args.dtype
            if dtype == "int8":
                print("\n## torch: no int8 engine (skipped)")
                continue
            profile_torch(spec, dtype, args.threads, args.shapes, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
