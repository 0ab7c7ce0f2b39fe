"""A corpus job's driver: the set-up shared by the local and the Ray path.

``run(job)`` resolves the model, plans the input's shards, opens (or checks) the output's
manifest, then hands the shards still to do (a ``Plan``, plan.py) to ``local.run_local`` or
``ray_pool.run_ray``, and finalizes the output. It returns the summary line's numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional

from floe.corpus.budget import tuner_for
from floe.corpus.cores import cpu_engines
from floe.corpus.embed import ShardEmbedder
from floe.corpus.plan import CorpusJob, Plan
from floe.corpus.reader import CorpusError, open_source
from floe.corpus.writer import FORMAT_VERSION, CorpusOutput, model_fingerprint
from floe.resolve import core_count

__all__ = ["CorpusJob", "Plan", "default_workers", "on_gpu", "prepare", "run"]

log = logging.getLogger("floe.corpus")


def _id_type_name(t) -> str:
    return str(t)


def on_gpu(device: str) -> bool:
    """Whether the job's engines run on a GPU (``auto``: when one is usable here)."""
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    from floe.engine.choice import gpu_available

    return gpu_available()


def default_workers(job: CorpusJob, cores: Optional[int] = None) -> int:
    """Engine workers when --workers is not given. Ray: one actor per job (Ray places more on
    request; each actor runs ``cpu_engines`` engines on its threads). A GPU: one. A CPU:
    ``cores.cpu_engines``."""
    if job.ray is not None or on_gpu(job.device):
        return 1
    return cpu_engines(cores if cores is not None else (job.threads or core_count()))


def prepare(job: CorpusJob) -> Plan:
    from floe.config import ModelSettings
    from floe.models import load_spec
    from floe.tokenize import Tokenizer

    opts = job.options
    if opts.on_error not in ("fail", "skip"):
        raise CorpusError(f"--on-error must be fail or skip, not {opts.on_error!r}")
    if opts.shard_rows < 1:
        raise CorpusError("--shard-rows must be positive")
    if (job.batch_tokens is not None and job.batch_tokens < 1) or job.max_batch_size < 1:
        raise CorpusError("--batch-tokens and --max-batch-size must be positive")
    if not job.corpus.commit_seconds > 0:
        raise CorpusError("--commit-seconds must be positive")
    if job.workers is not None and job.workers < 1:
        raise CorpusError("--workers must be at least 1")
    if job.workers is None:
        job = dataclasses.replace(job, workers=default_workers(job))
    spec = load_spec(ModelSettings(model=job.model))
    tuner = tuner_for(spec, job.batch_tokens, job.max_batch_size, on_gpu(job.device))
    embedder = ShardEmbedder(spec, Tokenizer(spec), opts, tuner)
    source = open_source(job.input, opts.text_column, opts.id_column, job.input_format)
    output = CorpusOutput(job.output)
    if os.path.abspath(job.input) in (output.output, output.work):
        raise CorpusError("the output must not be the input")
    t0 = time.monotonic()
    shards = source.plan(opts.shard_rows)
    log.info("planned %d rows in %d shard(s) of %d rows (%.1f s)", shards[-1].end, len(shards),
             opts.shard_rows, time.monotonic() - t0)
    manifest = {
        "floe_corpus": FORMAT_VERSION,
        "input": source.fingerprint(),
        "model": model_fingerprint(spec),
        "options": dict(opts.to_json(), engine=job.engine or "default", dtype=job.dtype),
        "shards": len(shards),
        "rows": shards[-1].end,
        "id_type": _id_type_name(source.id_type),
        "dim": embedder.dim,
    }
    if output.finished(manifest):
        return Plan(job, spec, embedder, source, shards, output, manifest, [], finished=True)
    done = output.open(manifest)
    pending = [s for s in shards if s.index not in done]
    partial = {i: n for i, n in output.piece_rows().items() if i not in done}
    return Plan(job, spec, embedder, source, shards, output, manifest, pending, partial=partial)


def run(job: CorpusJob) -> dict:
    """Runs (or resumes) the job; returns {"rows", "skipped", "wall_s", "summary", ...}."""
    from floe.corpus.progress import Progress

    t0 = time.monotonic()
    plan = prepare(job)
    if plan.finished:
        msg = f"{job.output} is already complete ({plan.total_rows} input rows); nothing to do"
        return {"rows": None, "skipped": None, "wall_s": time.monotonic() - t0, "summary": msg,
                "already_complete": True}
    if plan.done_rows:
        log.info("resuming: %d of %d shards already written, and %d rows of %d unfinished "
                 "shard(s)", len(plan.shards) - len(plan.pending), len(plan.shards),
                 sum(plan.partial.values()), len(plan.partial))
    progress = Progress(plan.total_rows, plan.done_rows, enabled=job.progress)
    try:
        if plan.pending:
            if job.ray is not None:
                from floe.corpus.ray_pool import run_ray

                run_ray(plan, progress)
            else:
                from floe.corpus.local import run_local

                run_local(plan, progress)
    finally:
        progress.close()
    result = plan.output.finalize()
    wall = time.monotonic() - t0
    result.update(wall_s=wall, tokens=progress.tokens, new_rows=progress.rows - progress.start_rows,
                  summary=progress.summary(job.output, result["rows"], result["skipped"], wall))
    return result
