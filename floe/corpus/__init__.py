"""Offline corpus embedding: ``floe embed-corpus INPUT -o OUTPUT``, on one machine or on Ray Data.

The job is cut into *shards*: fixed ranges of input rows (``--shard-rows``). Each shard is read,
tokenized, batched by length, embedded and written as one Parquet part file, committed by an
atomic rename. A part file that exists is finished; one that does not is redone. That makes the
job resumable after any kill (SIGKILL included) with every row written exactly once, and lets the
local path and the Ray path share the same reader, the same embedding step and the same writer:

    reader.py   INPUT -> a shard plan (row ranges) -> rows of one shard (ids, texts, bad rows)
    embed.py    rows -> token ids (in parallel) -> length-sorted batches -> engine -> post step
    writer.py   the output folder: manifest (fingerprints), part files, the final atomic output
    local.py    the in-process pipeline: read/tokenize, compute on N engine workers, write, overlapped
    ray_pool.py the same job on Ray: a pool of floe engine actors that read, embed and commit shards
    args.py     the command-line options (imported by floe.entrypoints.cli; imports nothing heavy)

Nothing here is imported by ``floe serve``.
"""
