#!/usr/bin/env python
"""The corpus job on a real two-node Ray cluster against the local path, at the same total cores.

Per run, on one synthetic Parquet corpus (bench_corpus.py's random words; by default issue 28's
12,000 rows of 3-120 words, in shards of 2,000 so that the rate after the first shard spans five):

  local    `floe embed-corpus` on this machine with its defaults (on 2 cores: two engines of one
           thread)
  cluster  a Ray head and a Ray worker node of one CPU each, in two network namespaces joined by a
           veth pair (floe/bench/ray_cluster.py: the same cluster as the `ray_cluster` tests), and
           `floe embed-corpus --ray HEAD:PORT --workers 2 --threads 1` run on the head: one actor
           of one thread on each node, so the cluster has the local path's two 1-thread engines

Prints one JSON line per side and run: the job's time; the rate after the first shard (the
progress line's steady rate, which flatters a pool of actors: their first shards end together);
the rate after the fixed cost (rows over the time after Ray's first shard started, against the
local job's time after its engines loaded; target: at least 0.95x); Ray's fixed-cost line (with
the end's tail: how long one node waited for the other's last shard) and whether the outputs are
identical. Each side's log is kept in the work folder. Needs root (the namespaces) and Ray. Keep the machine otherwise idle.

  sudo python scripts/bench_ray_cluster.py --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_corpus import make_corpus  # noqa: E402
from bench_corpus_resume import job_seconds, steady  # noqa: E402


def clock(hms: str) -> float:
    h, m, rest = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(rest.replace(",", "."))


def identical(a: str, b: str) -> bool:
    import pyarrow.parquet as pq

    return pq.read_table(a).equals(pq.read_table(b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--shard-rows", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("floe_args", nargs="*", help="extra floe embed-corpus arguments, both sides (after --)")
    args = ap.parse_args()

    from floe.bench.ray_cluster import HEAD_IP, PORT, TwoNodes, problem
    from floe.models.source import embedded_model_path

    why = problem()
    if why:
        sys.exit(why)
    work = args.workdir or tempfile.mkdtemp(prefix="floe-bench-cluster-", dir="/tmp")
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.parquet")
    make_corpus(corpus, "words", args.rows, 3, 120, 0)
    base = [sys.executable, "-m", "floe", "embed-corpus", corpus, "--no-progress",
            "--log-level", "info", "--model", embedded_model_path(),
            "--shard-rows", str(args.shard_rows), *args.floe_args]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    results = []
    for i in range(args.runs):
        local_out = os.path.join(work, f"local-{i}.parquet")
        r = subprocess.run([*base, "-o", local_out], env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        text = r.stdout + r.stderr
        with open(os.path.join(work, f"local-{i}.log"), "w") as f:
            f.write(text)
        # until its engines were loaded: the local path's fixed cost
        loaded = re.search(r"(\d\d:\d\d:\d\d,\d+) INFO floe.corpus: \d+ engine worker", text)
        begun = re.search(r"(\d\d:\d\d:\d\d,\d+) ", text)
        local = {"run": i, "side": "local", "job_s": job_seconds(text),
                 "steady_rows_per_s": steady(text),
                 "startup_s": clock(loaded.group(1)) - clock(begun.group(1)) if loaded else 0.0}
        print(json.dumps(local), flush=True)
        nodes = TwoNodes(head_cpus=1, worker_cpus=1)
        try:
            nodes.make_network()
            nodes.start_ray()
            out = os.path.join(work, f"cluster-{i}.parquet")
            p = nodes.popen("head", [*base, "-o", out, "--ray", f"{HEAD_IP}:{PORT}",
                                     "--workers", "2", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            text, _ = p.communicate(timeout=3600)
        finally:
            nodes.close()
        with open(os.path.join(work, f"cluster-{i}.log"), "w") as f:
            f.write(text)
        if p.returncode:
            sys.exit(text[-3000:])
        cost = re.search(r"Ray fixed cost: .*", text)
        rs = steady(text)
        first = re.search(r"([0-9.]+) s into the job", text)
        job, ljob = job_seconds(text), local["job_s"]
        # the rate once both paths compute: rows over the job's time after Ray's fixed cost (the
        # first shard's start), against the local job's time after its engine load
        after = args.rows / (job - float(first.group(1))) if first else None
        local_after = args.rows / (ljob - local["startup_s"])
        # the nodes' rates while each computed, summed (neither the fixed cost nor the tail)
        m = re.search(r"together ([0-9.]+) rows/s", text)
        together = float(m.group(1)) if m else None
        row = {"run": i, "side": "cluster", "job_s": job_seconds(text), "steady_rows_per_s": rs,
               "steady_over_local": round(rs / local["steady_rows_per_s"], 3) if rs else None,
               "rows_per_s_after_fixed_cost": round(after, 1) if after else None,
               "after_fixed_cost_over_local": round(after / local_after, 3) if after else None,
               "wall_over_local": round(local["job_s"] / job_seconds(text), 3),
               "node_rates_together": together,
               "together_over_local": round(together / local_after, 3) if together else None,
               "identical_output": identical(out, local_out),
               "fixed_cost": cost.group(0) if cost else None}
        print(json.dumps(row), flush=True)
        results.append(row)
    print(json.dumps({"summary": True, "cpu_count": os.cpu_count(),
                      "steady_over_local": [r["steady_over_local"] for r in results],
                      "after_fixed_cost_over_local": [r["after_fixed_cost_over_local"]
                                                      for r in results],
                      "together_over_local": [r["together_over_local"] for r in results],
                      "all_identical": all(r["identical_output"] for r in results)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
