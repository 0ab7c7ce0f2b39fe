#!/usr/bin/env python3
"""How well a replica's cost model predicts forward time, by batch shape: one quadratic in the
row length against the model with the sliding-window term (floe/replica/cost.py).

Both are fitted to the same calibration passes a replica would time (``calibration_shapes`` at
the budget, with and without the model's key span), then each shape of ``--shapes`` is timed
(the faster of 2 passes) and compared with both predictions.

    .venv/bin/python scripts/bench_cost_model.py --model DIR \\
        --shapes 16x128,4x384,3x640,1x700,2x768,1x900,2x1024,1x1536,1x2048

Run it with nothing else on the cores.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model folder or 'default' (embedded MiniLM)")
    p.add_argument("--engine", default="openvino", choices=("openvino", "torch"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1, help="a served replica's default on 2 cores")
    p.add_argument("--budget", type=int, default=None,
                   help="the replica's token budget (default: floe serve's on a CPU)")
    p.add_argument("--shapes", required=True, help="rows x tokens, comma-separated")
    args = p.parse_args(argv)

    from floe.bench.workload import load_model_spec
    from floe.engine import create_engine
    from floe.models.source import embedded_model_path
    from floe.replica.cost import (CostModel, calibrate, calibration_shapes, engine_runner,
                                   key_span)
    from floe.resolve import batch_budget

    path = str(embedded_model_path()) if args.model == "default" else args.model
    spec = load_model_spec(path)
    engine = create_engine(spec, args.engine, device="cpu", dtype=args.dtype, threads=args.threads)
    budget = args.budget or batch_budget(None, False, spec.max_seq_length)
    span = key_span(spec)
    run = engine_runner(engine)
    run(1, 16)
    plain = calibration_shapes(budget, spec.max_seq_length, 64)
    windowed = calibration_shapes(budget, spec.max_seq_length, 64, span)
    passes = {s: calibrate(run, [s])[0] for s in sorted(set(plain) | set(windowed))}
    quadratic = CostModel([passes[s] for s in plain])
    with_window = CostModel([passes[s] for s in windowed], span=span)
    print(f"# {spec.name}, {engine.backend} {engine.dtype}, {args.threads} thread(s), budget "
          f"{budget}, key span {span or 'none'}")
    print(f"# one quadratic: {quadratic.summary()}")
    print(f"# with the window term: {with_window.summary()}")
    print("| rows x tokens | measured ms | one quadratic | with the window term |")
    print("|---|---|---|---|")
    errors: dict[str, list[float]] = {"quadratic": [], "window": []}
    for text in args.shapes.split(","):
        count, length = (int(x) for x in text.split("x"))
        measured = calibrate(run, [(count, length)])[0][2]
        cells = []
        for name, model in (("quadratic", quadratic), ("window", with_window)):
            err = model.seconds(count, length) / measured - 1
            errors[name].append(abs(err))
            cells.append(f"{100 * err:+.1f}%")
        print(f"| {count} x {length} | {measured * 1e3:,.0f} | {cells[0]} | {cells[1]} |")
    print("| mean / worst abs error | | " + " | ".join(
        f"{100 * sum(v) / len(v):.1f}% / {100 * max(v):.1f}%" for v in errors.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
