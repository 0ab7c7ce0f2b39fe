#!/usr/bin/env python
"""Resume and Ray on the same corpus job, side by side in one run (issue 28's targets).

Per run, on one synthetic Parquet corpus (bench_corpus.py's random words, by default the issue's
12,000 rows of 3-120 words), each side a fresh `python -m floe embed-corpus` process:

  full     the job uninterrupted: wall time T, and its own time from the summary line
           (start-up = T minus that)
  resume   the same job SIGKILLed at --kill-at x T (default 0.6), then the same command again:
           the rerun's wall R. Target: R <= (1 - kill_at) x T + commit_seconds + start-up. Also
           reported: the rows committed at the kill (part files and pieces), and the compute lost
           (the rows not committed, at the full run's rate)
  ray      `--ray` (a new local Ray instance, inside a loopback-only network namespace: Ray
           listens on every interface): its wall time against T (target >= 0.9x), its rate after
           the first shard against the local one (target >= 0.95x), and Ray's fixed-cost line
           (connect, actor placement, class load, engine load)
  ray-cluster  the same with `--ray 127.0.0.1:PORT` on a head node started beforehand with
           `ray start --head` in the same namespace (a user's running cluster): the floe
           command's own wall time

Prints one JSON line per measurement and a summary line. Keep the machine otherwise idle.

  python scripts/bench_corpus_resume.py                       # 12,000 rows, one run
  python scripts/bench_corpus_resume.py --runs 2 -- --engine openvino
  python scripts/bench_corpus_resume.py --rows 300 --no-ray   # smoke
  python scripts/bench_corpus_resume.py -- --shard-rows 2000  # the steady rate over 5 shards
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_corpus import count_tokens, make_corpus  # noqa: E402

SUMMARY = re.compile(r"embedded (\d+) rows in ([0-9.]+) s")
STEADY = re.compile(r"([0-9.]+) rows/s after the first shard")


def floe_cmd(corpus: str, out: str, extra: list[str], level: str = "warning") -> list[str]:
    return [sys.executable, "-m", "floe", "embed-corpus", corpus, "-o", out, "--no-progress",
            "--log-level", level, *extra]


def run(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return wall, r.stdout + r.stderr


def job_seconds(text: str) -> Optional[float]:
    m = SUMMARY.search(text)
    return float(m.group(2)) if m else None


def steady(text: str) -> Optional[float]:
    m = STEADY.search(text)
    return float(m.group(1)) if m else None


def committed_rows(out: str) -> tuple[int, int]:
    """(rows in part files, rows in pieces) of an interrupted OUTPUT."""
    import pyarrow.parquet as pq

    from floe.corpus.writer import CorpusOutput

    o = CorpusOutput(out)
    if not os.path.isdir(o.work):
        return 0, 0
    parts = sum(pq.ParquetFile(os.path.join(o.work, n)).metadata.num_rows
                for n in os.listdir(o.work) if n.startswith("part-"))
    return parts, sum(o.piece_rows().values())


def loopback_only() -> bool:
    return set(os.listdir("/sys/class/net")) <= {"lo"}


def isolated(cmd: list[str]) -> Optional[list[str]]:
    """``cmd`` in a new network namespace with only loopback (unless this already is one);
    None where one cannot be made."""
    if loopback_only():
        return cmd
    if not shutil.which("unshare"):
        return None
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]


def resume(i: int, corpus: str, work: str, extra: list, env: dict, args, wall: float,
           job, full: dict, rows: int) -> dict:
    """The job SIGKILLed at kill_at x T, then the same command again."""
    out = os.path.join(work, f"resume-{i}.parquet")
    kill_after = args.kill_at * wall
    t0 = time.monotonic()
    proc = subprocess.Popen(floe_cmd(corpus, out, extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=kill_after)
        sys.exit("the job ended before it could be killed: raise --rows")
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_s = time.monotonic() - t0
    parts, pieces = committed_rows(out)
    rerun, text = run(floe_cmd(corpus, out, extra), env)
    remaining = (1 - args.kill_at) * wall
    rate = rows / job if job else None
    lost_rows = None
    if full["steady_rows_per_s"] or rate:
        # rows the killed run had computed (at the full run's pace after its start-up) but
        # not committed
        done_by_kill = max(0.0, killed_s - (full["startup_s"] or 0)) * (rate or 0)
        lost_rows = max(0, round(min(rows, done_by_kill) - parts - pieces))
    target = remaining + args.commit_seconds + (full["startup_s"] or 0)
    return {"run": i, "side": "resume", "killed_at_s": round(killed_s, 2),
            "committed_rows_at_kill": parts + pieces, "in_parts": parts, "in_pieces": pieces,
            "lost_rows_estimate": lost_rows,
            "lost_compute_s_estimate": round(lost_rows / rate, 1) if lost_rows is not None and rate else None,
            "rerun_wall_s": round(rerun, 2), "rerun_job_s": job_seconds(text),
            "target_s": round(target, 2), "met": rerun <= target,
            "killed_plus_rerun_over_full": round((killed_s + rerun) / wall, 3)}


CLUSTER_PORT = 6391


def ray_side(i: int, side: str, rwall: float, text: str, wall: float, full: dict) -> dict:
    cost = re.search(r"Ray fixed cost: .*", text)
    rs, ls = steady(text), full["steady_rows_per_s"]
    return {"run": i, "side": side, "wall_s": round(rwall, 2), "job_s": job_seconds(text),
            "ray_over_local_wall": round(wall / rwall, 3), "steady_rows_per_s": rs,
            "ray_steady_over_local": round(rs / ls, 3) if rs and ls else None,
            "fixed_cost": cost.group(0) if cost else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--min-words", type=int, default=3)
    ap.add_argument("--max-words", type=int, default=120)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--kill-at", type=float, default=0.6, help="share of the full run's wall time")
    ap.add_argument("--commit-seconds", type=float, default=30.0,
                    help="the bound the resume target allows (the job's --commit-seconds)")
    ap.add_argument("--no-ray", action="store_true", help="resume only")
    ap.add_argument("--no-resume", action="store_true", help="the uninterrupted job and Ray only")
    ap.add_argument("--no-cluster", action="store_true",
                    help="Ray on a new local instance only (not also on a running head node)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("floe_args", nargs="*", help="extra floe embed-corpus arguments (after --)")
    args = ap.parse_args()

    from floe.models.source import embedded_model_path

    model = embedded_model_path()
    work = args.workdir or tempfile.mkdtemp(prefix="floe-bench-resume-")
    corpus = os.path.join(work, "corpus.parquet")
    rows = make_corpus(corpus, "words", args.rows, args.min_words, args.max_words, args.seed)
    tokens = count_tokens(corpus, model)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    extra = ["--model", model, "--commit-seconds", str(args.commit_seconds), *args.floe_args]
    lines = []

    def emit(obj: dict) -> None:
        lines.append(obj)
        print(json.dumps(obj), flush=True)

    for i in range(args.runs):
        # full
        out = os.path.join(work, f"full-{i}.parquet")
        wall, text = run(floe_cmd(corpus, out, extra), env)
        job = job_seconds(text)
        full = {"run": i, "side": "full", "wall_s": round(wall, 2), "job_s": job,
                "startup_s": round(wall - job, 2) if job else None, "steady_rows_per_s": steady(text),
                "rows": rows, "tokens": tokens}
        emit(full)
        if not args.no_resume:
            emit(resume(i, corpus, work, extra, env, args, wall, job, full, rows))
        # Ray
        if args.no_ray:
            continue
        out = os.path.join(work, f"ray-{i}.parquet")
        cmd = isolated(floe_cmd(corpus, out, extra + ["--ray"], level="info"))
        if cmd is None:
            emit({"run": i, "side": "ray", "skipped": "no loopback-only network namespace can be "
                  "made here (run as root, or inside `unshare --net`)"})
            continue
        ray_env = dict(env, RAY_USAGE_STATS_ENABLED="0")
        rwall, text = run(cmd, ray_env)
        emit(ray_side(i, "ray", rwall, text, wall, full))
        if args.no_cluster:
            continue
        # the same job on a Ray cluster already running (a head node started beforehand in the
        # same namespace, as a user's cluster is): the job's wall is the floe command's alone
        out = os.path.join(work, f"ray-cluster-{i}.parquet")
        job_cmd = " ".join(shlex.quote(c) for c in floe_cmd(corpus, out, extra + [
            "--ray", f"127.0.0.1:{CLUSTER_PORT}"], level="info"))
        ray_bin = shlex.quote(os.path.join(os.path.dirname(sys.executable), "ray"))
        script = (f"{ray_bin} start --head --port {CLUSTER_PORT} --num-cpus {os.cpu_count()} "
                  f"--include-dashboard=false --disable-usage-stats >&2 || exit 3; "
                  f"t0=$(date +%s%N); {job_cmd}; rc=$?; t1=$(date +%s%N); "
                  f"{ray_bin} stop --force >&2; echo \"JOB_NS $((t1 - t0))\"; exit $rc")
        # Ray 2.60 starts a head node with token authentication: the job presents the same token
        # (docs/scale-out.md's recipe)
        _, text = run(isolated(["sh", "-c", script]),
                      dict(ray_env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32)))
        cwall = int(re.search(r"JOB_NS (\d+)", text).group(1)) / 1e9
        emit(ray_side(i, "ray-cluster", cwall, text, wall, full))
    resumes = [x for x in lines if x["side"] == "resume"]
    rays = [x for x in lines if x["side"].startswith("ray") and "wall_s" in x]
    emit({"summary": True, "cpu_count": os.cpu_count(),
          "resume_met": all(x["met"] for x in resumes) if resumes else None,
          "best_rerun_over_target": min((x["rerun_wall_s"] / x["target_s"] for x in resumes),
                                        default=None),
          **{f"best_{side}_over_local_wall": max((x["ray_over_local_wall"] for x in rays
                                                   if x["side"] == side), default=None)
             for side in ("ray", "ray-cluster")},
          **{f"best_{side}_steady_over_local": max((x["ray_steady_over_local"] or 0 for x in rays
                                                     if x["side"] == side), default=None)
             for side in ("ray", "ray-cluster")}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
