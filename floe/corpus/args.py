"""``floe embed-corpus`` options. Imported by floe.entrypoints.cli: nothing heavy at import time."""

from __future__ import annotations

import argparse
import logging
import sys

DESCRIPTION = """\
Embed a corpus offline: INPUT (a Parquet file or dataset folder, JSONL or CSV) -> OUTPUT, a
Parquet file (OUTPUT ending in .parquet) or a Parquet dataset folder with columns `id` and
`embedding` (fixed-size list), rows in input order. The engine runs in-process (no HTTP);
--ray runs the same job on a Ray cluster. Killed at any point, the same command resumes it; a changed
input, model or option is refused."""


def _budget(text: str):
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help="Parquet file or folder, .jsonl or .csv file")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help="output: NAME.parquet (one file, appears when complete) or a folder")
    p.add_argument("--model", default="default",
                   help="model folder, 'default' (the embedded all-MiniLM-L6-v2) or hub id")
    p.add_argument("--text-column", default="text", help="column (or JSON key) holding the text")
    p.add_argument("--id-column", default=None,
                   help="column copied to the output's `id` (default: the row number)")
    p.add_argument("--input-format", choices=("parquet", "jsonl", "csv"), default=None,
                   help="input format (default: from the name)")
    p.add_argument("--prompt-name", default=None, help="prompt from the model's config (e.g. query)")
    p.add_argument("--dimensions", type=int, default=None, help="Matryoshka: keep the first N dims")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalize (default: as the model's pipeline does)")
    p.add_argument("--output-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="bad rows (null or non-string text): fail naming the row, or skip them "
                        "and list them in a side file (OUTPUT/_skipped.jsonl or OUTPUT.skipped.jsonl)")
    p.add_argument("--workers", type=int, default=None,
                   help="engine workers (Ray: actors); on CPU they share the compute threads. "
                        "Default: 2 on a CPU with 2 or more cores, 1 per job on a GPU, 1 Ray actor")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads in all (Ray: per actor; default: all cores)")
    p.add_argument("--tokenize-threads", type=int, default=None, help="tokenizer threads")
    p.add_argument("--batch-tokens", type=_budget, default=None, metavar="N|auto",
                   help="token budget of one forward pass (padded: longest x count). Default "
                        "auto: on a CPU, the fastest of 2048-16384 measured on the job's first "
                        "batches (they are real work); on a GPU, 16384")
    p.add_argument("--shard-rows", type=int, default=10_000,
                   help="rows per output part: the unit of length-sorting and of the output's "
                        "files (commits come at least every --commit-seconds of compute)")
    p.add_argument("--chunk-tokens", type=int, default=None, metavar="N",
                   help="documents of any length: one output row per chunk of at most N tokens "
                        "(special tokens and prompt included; 16 to the model's max length), with "
                        "columns id, chunk, start, end (character offsets) and embedding; cuts fall "
                        "on sentence or word boundaries (docs/api.md). Default: one row per input "
                        "row, cut to the max length")
    p.add_argument("--chunk-overlap", type=int, default=0, metavar="M",
                   help="tokens consecutive chunks share (less than the chunk's text)")
    p.add_argument("--late-chunking", action="store_true",
                   help="pool each chunk from its whole document's token states (late chunking; "
                        "with --chunk-tokens, or alone for chunks of the max length)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray actors: a new local Ray instance, or the cluster at ADDRESS "
                        "('auto' for the one this machine belongs to); needs floe[ray]")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal; log lines otherwise)")
    from floe.config import add_arguments as add_settings

    # knobs the job shares with floe serve: flag, type, choices and help from the settings tree
    # (floe/config.py); the job takes them from its command line only, not from FLOE_* variables
    shared = p.add_argument_group("settings shared with floe serve")
    for section, names in (("model", ("device", "dtype")), ("replicas", ("engine",)),
                           ("batch", ("max_batch_size",)), ("server", ("log_level",))):
        add_settings(p, sections=(section,), only=names, group=shared, env=False)
    # the job's settings-tree section (floe/config.py CorpusSettings): flag and FLOE_* variable
    # derived from the field, as for floe serve's
    add_settings(p, sections=("corpus",))


def job_from_args(args: argparse.Namespace):
    from floe.config import flag_value, settings_from
    from floe.corpus.embed import CorpusOptions
    from floe.corpus.plan import CorpusJob

    options = CorpusOptions(
        text_column=args.text_column, id_column=args.id_column, prompt_name=args.prompt_name,
        dimensions=args.dimensions, normalize=args.normalize, output_dtype=args.output_dtype,
        on_error=args.on_error, shard_rows=args.shard_rows, chunk_tokens=args.chunk_tokens,
        chunk_overlap=args.chunk_overlap, late_chunking=args.late_chunking)
    # the tree, read once here: the corpus section, and the engine's (the fake engine's
    # simulated costs, the converted-model cache) which the job hands to its engines
    settings = settings_from(args)
    return CorpusJob(
        input=args.input, output=args.output, options=options, model=args.model,
        engine=getattr(args, "replicas.engine"),   # None: the engine factory's default
        device=flag_value(args, "model", "device"), dtype=flag_value(args, "model", "dtype"),
        workers=args.workers, threads=args.threads,
        tokenize_threads=args.tokenize_threads, batch_tokens=args.batch_tokens,
        max_batch_size=flag_value(args, "batch", "max_batch_size"),
        input_format=args.input_format, ray=args.ray,
        progress=args.progress, corpus=settings.corpus, replicas=settings.replicas)


def main(args: argparse.Namespace) -> int:
    """Runs the job; prints the one-line summary on stdout. Exit 2 on a refused or failed job."""
    from floe.config import flag_value
    from floe.logs import setup_logging

    setup_logging(flag_value(args, "server", "log_level"))
    from floe.corpus.job import run
    from floe.errors import ConfigError, FloeError, ModelLoadError

    try:
        result = run(job_from_args(args))
    except (FloeError, ConfigError, ModelLoadError) as exc:
        print(f"floe embed-corpus: error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("floe.corpus").debug("result %s", result)
    print(result["summary"])
    return 0
