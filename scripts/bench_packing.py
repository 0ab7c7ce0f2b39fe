#!/usr/bin/env python3
"""Sequence packing on OpenVINO, measured before it is built: several short rows share one row of
the batch (attention kept block-diagonal, positions restarting per row, pooling by a matrix of
per-row weights), against the padded graph floe runs, on the prose workload's rows.

A BERT-family embedding model (the embedded all-MiniLM by default) is traced twice with floe's
OpenVINO tailoring (the query scale folded, keys aligned to 16: floe/engine/aligned_keys.py):

- padded: (input_ids, attention_mask) -> mean-pooled rows, what floe's graph computes;
- packed: (input_ids, position_ids, segments, pool) -> pool @ hidden states, where ``segments``
  numbers the rows inside each packed row (0: padding, which attends only to itself) and ``pool``
  holds each row's mean-pooling weights.

It checks that a packed row equals the row alone (float32, torch; and the compiled bf16 graph
against it), then times, in alternating turns, real tokens per CPU second of

- the padded graph on the rows sorted and cut at the budget (the best cut: no fill floor),
- the padded graph on the batches a served replica's scheduler forms (512 rows waiting,
  requests of 16, the CPU's fill floor of 0.95),
- the packed graph on the rows packed first-fit decreasing into rows of their length rounded up
  to ``--align``, rows of one width grouped up to the budget.

    .venv/bin/python scripts/bench_packing.py --threads 1 --turns 4

Run it with nothing else on the cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))


def padded_feed(rows: list[np.ndarray]) -> dict[str, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pack(lengths: list[int], align: int) -> list[tuple[int, list[int]]]:
    """First-fit decreasing: (width, row indices) per packed row; a packed row is as wide as its
    first (longest) row rounded up to ``align``, and shorter rows fill what it leaves."""
    packed: list[tuple[int, list[int]]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        for b, room in enumerate(free):
            if room >= n:
                packed[b][1].append(i)
                free[b] -= n
                break
        else:
            width = align * -(-n // align)
            packed.append((width, [i]))
            free.append(width - n)
    return packed


def packed_feed(rows: list[np.ndarray], packed: list[list[int]], width: int):
    """The packed graph's inputs for packed rows of ``width``, and (row, packed row, slot) of
    every input row."""
    count, slots = len(packed), max(len(p) for p in packed)
    ids = np.zeros((count, width), np.int64)
    pos = np.zeros((count, width), np.int64)
    seg = np.zeros((count, width), np.int64)
    pool = np.zeros((count, slots, width), np.float32)
    where = []
    for b, members in enumerate(packed):
        at = 0
        for slot, i in enumerate(members):
            n = len(rows[i])
            ids[b, at:at + n] = rows[i]
            pos[b, at:at + n] = np.arange(n)
            seg[b, at:at + n] = slot + 1
            pool[b, slot, at:at + n] = 1.0 / n
            where.append((i, b, slot))
            at += n
    return {"input_ids": ids, "position_ids": pos, "segments": seg, "pool": pool}, where


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="a BERT-family model folder (default: MiniLM)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=int, default=2048, help="tokens per batch (the CPU's default)")
    p.add_argument("--align", type=int, default=16, help="packed rows' width rounds up to this")
    p.add_argument("--turns", type=int, default=4)
    args = p.parse_args(argv)

    import openvino as ov
    import torch
    from transformers import AutoModel

    from bench_engines import prose_lengths
    from floe.bench.workload import load_model_spec
    from floe.engine import aligned_keys
    from floe.engine.openvino_convert import fold_query_scale
    from floe.models.source import embedded_model_path
    from floe.replica.scheduler import Scheduler, Sequence

    spec = load_model_spec(str(embedded_model_path()) if args.model == "default" else args.model)
    bert = AutoModel.from_pretrained(spec.backbone_path, attn_implementation="sdpa").eval()
    fold_query_scale(bert)
    if not aligned_keys.install(bert):
        sys.exit("the model's attention is not transformers' SDPA: not a BERT-family encoder")

    class Padded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert   # a submodule: traced with its weights as the graph's constants

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            weights = attention_mask.to(hidden.dtype)
            weights = weights / weights.sum(1, keepdim=True)
            return torch.matmul(weights[:, None, :], hidden)[:, 0]

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, position_ids, segments, pool):
            # a token sees the keys of its own row only; padding (segment 0) sees padding
            mask = (segments[:, :, None] == segments[:, None, :])[:, None]
            hidden = self.bert(input_ids=input_ids, attention_mask=mask,
                               position_ids=position_ids).last_hidden_state
            return torch.matmul(pool, hidden)

    rng = np.random.default_rng(0)
    lengths = prose_lengths(spec)
    rows = [rng.integers(min(1000, spec.vocab_size - 1), spec.vocab_size, n) for n in lengths]
    total = sum(lengths)
    print(f"# {spec.name}: {len(rows)} prose rows, {total} tokens, median {int(np.median(lengths))}")

    def torch_run(module, feed):
        with torch.no_grad():
            return module(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()

    sample = rows[:40]
    want = torch_run(Padded(), padded_feed(sample))
    width = 16 * -(-max(len(r) for r in sample) // 16)
    feed, where = packed_feed(sample, [m for _, m in pack([len(r) for r in sample], width)], width)
    out = torch_run(Packed(), feed)
    got = np.stack([out[b, slot] for _, b, slot in sorted(where)])
    print(f"# packed rows against each row alone, float32: max |diff| {np.abs(got - want).max():.2e}")

    # the three batch sets
    budget = args.budget
    best, cur = [], []
    for r in sorted(rows, key=len):
        if cur and len(r) * (len(cur) + 1) > budget:
            best.append(cur)
            cur = []
        cur.append(r)
    best.append(cur)
    sched = Scheduler(budget, 256, 0.0, min_fill=0.95)
    order = rng.permutation(len(rows))
    served, k, clock = [], 0, 0.0
    while k < len(order) or len(sched):
        while k < len(order) and len(sched) < 512:
            for j, i in enumerate(order[k:k + 16]):
                sched.add(Sequence(request_key=k, index=j, length=len(rows[i]), arrival=clock,
                                   payload=int(i)))
            k, clock = k + 16, clock + 1.0
        served.append([rows[s.payload] for s in sched.next_batch(now=clock + 100.0)])
    by_width: dict[int, list[list[int]]] = {}
    for w, members in pack(lengths, args.align):
        by_width.setdefault(w, []).append(members)
    packed = []
    for w, groups in sorted(by_width.items()):
        per = max(1, budget // w)
        packed += [packed_feed(rows, groups[i:i + per], w)[0] for i in range(0, len(groups), per)]

    def fill(batches):
        return total / sum(len(b) * max(len(r) for r in b) for b in batches)

    sets = {"padded, best cut": [padded_feed(b) for b in best],
            "padded, a replica's batches": [padded_feed(b) for b in served],
            "packed": packed}
    fills = {"padded, best cut": fill(best), "padded, a replica's batches": fill(served),
             "packed": total / sum(f["input_ids"].size for f in packed)}

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": args.threads,
              "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}

    def compiled(module, example):
        with torch.no_grad():
            model = ov.convert_model(module.eval(), example_input={
                k: torch.from_numpy(v) for k, v in example.items()})
        model.reshape({p.get_any_name(): ov.PartialShape([-1] * len(p.get_partial_shape()))
                       for p in model.inputs})
        return core.compile_model(model, "CPU", config).create_infer_request()

    requests = {"padded, best cut": compiled(Padded(), sets["padded, best cut"][len(best) // 2]),
                "packed": compiled(Packed(), packed[len(packed) // 2])}
    requests["padded, a replica's batches"] = requests["padded, best cut"]
    feed, where = packed_feed(sample, [m for _, m in pack([len(r) for r in sample], width)], width)
    requests["packed"].infer(feed)
    out = requests["packed"].get_output_tensor(0).data
    got = np.stack([out[b, slot] for _, b, slot in sorted(where)])
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    print(f"# the compiled packed graph (bf16) against float32: min cosine {cos.min():.5f}")

    def timed(name):
        c0 = time.process_time()
        for f in sets[name]:
            requests[name].infer(f)
        return total / (time.process_time() - c0)

    results: dict[str, list[float]] = {name: [] for name in sets}
    for name in sets:
        timed(name)
    for turn in range(args.turns):
        for name in (list(sets) if turn % 2 == 0 else list(sets)[::-1]):
            results[name].append(timed(name))
    print("| batches | count | padded tokens each | fill | real tokens per CPU-s (median) | / a replica's |")
    print("|---|---|---|---|---|---|")
    base = float(np.median(results["padded, a replica's batches"]))
    for name, fs in sets.items():
        med = float(np.median(results[name]))
        each = sum(f["input_ids"].size for f in fs) / len(fs)
        print(f"| {name} | {len(fs)} | {each:,.0f} | {fills[name]:.3f} | {med:,.0f} | {med / base:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
