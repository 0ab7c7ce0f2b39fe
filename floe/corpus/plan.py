"""What a corpus job is and what its set-up found: ``CorpusJob`` and ``Plan``.

The module both the job's driver (job.py) and its two runners (local.py, ray_pool.py) import, so
that none of them imports another: job.py builds a Plan and hands it to a runner; a runner reads
it and imports nothing of job.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from floe.config import CorpusSettings, ReplicaSetSettings
from floe.corpus.embed import CorpusOptions, ShardEmbedder
from floe.corpus.reader import Shard, Source
from floe.corpus.writer import CorpusOutput


@dataclass(frozen=True)
class CorpusJob:
    """One ``floe embed-corpus`` invocation. ``options`` decide the output's content; the rest
    decides only how fast it is computed (and may change between a run and its resumption)."""

    input: str
    output: str
    options: CorpusOptions = field(default_factory=CorpusOptions)
    model: str = "default"
    engine: Optional[str] = None         # None: create_engine's default
    device: str = "auto"
    dtype: str = "auto"
    workers: Optional[int] = None        # engine workers (local) or actors (Ray); None: default_workers
    threads: Optional[int] = None        # compute threads in all (local) or per actor (Ray)
    tokenize_threads: Optional[int] = None
    batch_tokens: Optional[int] = None   # None: measured on the job's first batches (CPU)
    max_batch_size: int = 256
    input_format: Optional[str] = None
    ray: Optional[str] = None            # None: local; "local": a new local Ray; else an address
    progress: Optional[bool] = None      # None: a bar when stderr is a terminal
    corpus: CorpusSettings = field(default_factory=CorpusSettings)   # commit_seconds
    # the engines' settings section: the fake engine's simulated costs, the converted-model cache
    replicas: ReplicaSetSettings = field(default_factory=ReplicaSetSettings)


@dataclass
class Plan:
    """What ``prepare`` found: the model, the input's shards, the output and the work left."""

    job: CorpusJob
    spec: object
    embedder: ShardEmbedder
    source: Source
    shards: list[Shard]
    output: CorpusOutput
    manifest: dict
    pending: list[Shard]
    finished: bool = False
    partial: dict = field(default_factory=dict)   # pending shard -> rows committed in its pieces

    @property
    def total_rows(self) -> int:
        return self.shards[-1].end if self.shards else 0

    @property
    def done_rows(self) -> int:
        pending = {s.index for s in self.pending}
        return (sum(s.rows for s in self.shards if s.index not in pending)
                + sum(self.partial.values()))
