"""Offline corpus embedding: ``floe embed-corpus INPUT -o OUTPUT``, on one machine or on Ray.

The job is cut into *shards*: fixed ranges of input rows (``--shard-rows``). Each shard is read,
tokenized, batched by length, embedded and written as one Parquet part file, committed by an
atomic rename. A part file that exists is finished. While a shard computes, its finished rows are
committed as *pieces* at least every ``--commit-seconds`` of compute (commit.py); a rerun embeds
only the rows of unfinished shards that no piece holds. That makes the job resumable after any
kill (SIGKILL included), losing at most that much compute, with every row written exactly once,
and lets the local path and the Ray path share the same reader, embedding step and writer:

    reader.py   INPUT -> a shard plan (row ranges) -> rows of one shard (ids, texts, bad rows)
    embed.py    rows -> token ids (in parallel) -> length-sorted batches -> engine -> post step
    writer.py   the output folder: manifest (fingerprints), part files, pieces, the final output
    commit.py   when to commit pieces (a pure policy, clock injected); a shard's rows as it computes
    plan.py     CorpusJob and Plan: what the driver hands to a runner
    job.py      the driver: the model, the shard plan, the manifest; a runner; the final output
    local.py    the in-process pipeline: read/tokenize, compute on N engine workers, write, overlapped
    ray_pool.py the same job on Ray: a pool of floe engine actors that read, embed and commit shards
    args.py     the command-line options (imported by floe.entrypoints.cli; imports nothing heavy)

Nothing here is imported by ``floe serve``.
"""
