#!/usr/bin/env python3
"""Attention alone, bf16, one thread: how close each kernel gets to the matmul peak for a head shape.

Times softmax(Q K^T / sqrt(d) + mask) V over (rows, heads, tokens, head_dim) tensors on:
OpenVINO's ScaledDotProductAttention op, OpenVINO's MatMul-Softmax-MatMul pattern (which its CPU
plugin fuses into the MHA kernel, as in a converted encoder), and torch's
``scaled_dot_product_attention``. The FLOPs are the two matmuls' (4 x tokens^2 x head_dim per
head); the softmax's vector work is not counted, which is the point: with small heads it is not
small (docs/benchmarks.md section 12).

    .venv/bin/python scripts/bench_attention.py --shapes 8x256x12x32,64x32x12x32

Run it with nothing else on the cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def rate(fn, flops: float, seconds: float) -> float:
    fn()
    fn()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        count += 1
    return flops * count / (time.perf_counter() - t0) / 1e9


def openvino_attention(rows: int, heads: int, tokens: int, dim: int, fused_op: bool):
    import openvino as ov
    import openvino.opset13 as ops

    shape = [rows, heads, tokens, dim]
    q, k, v = (ops.parameter(shape, ov.Type.f32, name=n) for n in "qkv")
    mask = ops.parameter([rows, 1, 1, tokens], ov.Type.f32, name="mask")
    if fused_op:
        out = ops.scaled_dot_product_attention(q, k, v, mask, causal=False)
    else:
        scores = ops.add(ops.multiply(ops.matmul(q, k, False, True),
                                      ops.constant(np.float32(dim ** -0.5))), mask)
        out = ops.matmul(ops.softmax(scores, -1), v, False, False)
    compiled = ov.Core().compile_model(ov.Model([out], [q, k, v, mask]), "CPU", {
        "INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "bf16",
        "PERFORMANCE_HINT": "LATENCY"})
    return compiled.create_infer_request()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="8x256x12x32,64x32x12x32",
                   help="rows x tokens x heads x head_dim, comma-separated")
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args(argv)

    import openvino as ov
    import torch

    torch.set_num_threads(1)
    print(f"{'shape':<16} {'OpenVINO SDPA':>14} {'OpenVINO MHA':>13} {'torch SDPA':>11}  (GFLOP/s)")
    for text in args.shapes.split(","):
        rows, tokens, heads, dim = (int(x) for x in text.split("x"))
        flops = 4.0 * tokens * tokens * dim * heads * rows
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((rows, heads, tokens, dim), dtype=np.float32) for _ in range(3))
        mask = np.zeros((rows, 1, 1, tokens), np.float32)
        found = []
        for fused in (True, False):
            request = openvino_attention(rows, heads, tokens, dim, fused)
            for i, a in enumerate((q, k, v, mask)):
                request.set_input_tensor(i, ov.Tensor(a))
            found.append(rate(request.infer, flops, args.seconds))
        tq, tk, tv = (torch.from_numpy(a).bfloat16() for a in (q, k, v))
        tmask = torch.from_numpy(mask).bfloat16()
        with torch.inference_mode():
            found.append(rate(lambda: torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=tmask), flops, args.seconds))
        print(f"{text:<16} {found[0]:>14.1f} {found[1]:>13.1f} {found[2]:>11.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
