"""One typed tree of settings.

Every knob floe has is declared here once, with its help text, its default and its validation.
The CLI flag (``--max-batch-tokens``) and the environment variable (``FLOE_MAX_BATCH_TOKENS``) are
derived from the field name, so a flag can never drift from the setting it sets. Components receive
the sub-tree they need (``BatchSettings`` for the scheduler, ``ReplicaSetSettings`` for the manager)
and read no ``FLOE_*`` variable themselves, with one exception: the OpenVINO engine's default
cache folder honours ``FLOE_ENGINE_CACHE_DIR`` (the same variable as ``--engine-cache-dir``), so
that code built without a settings tree (``floe embed-corpus``, the bench scripts) shares the
server's converted models.

Precedence: command-line flag > ``FLOE_*`` environment variable > default.

Every command builds its parser from this tree (``add_arguments``; ``only`` picks the fields a
command takes): ``floe serve``, ``floe info``, ``python -m floe.replica``, ``floe embed-corpus``
(for the knobs it shares with the server), and the Ray Serve deployment reads its arguments by
field name (``sections_of``). A field left at None means "the default for this machine and
model": floe/resolve.py settles those once, before any process starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from floe.errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16", "int8"]
Balancing = Literal["round_robin", "random", "least_loaded"]
GpuAssignment = Literal["dedicated", "shared"]
EngineKind = Literal["auto", "torch", "openvino", "fake"]
LogFormat = Literal["text", "json"]


def _knob(default: Any, help: str, *, flag: Optional[str] = None, factory: Any = None,
          repeat_into: Optional[str] = None) -> Any:
    """A settings field: ``help`` becomes the ``--help`` text; ``flag`` overrides the flag name;
    ``repeat_into``: the flag may be given again, and its later values go to that tuple field
    (which has no flag of its own)."""
    meta = {"help": help, "flag": flag, "repeat_into": repeat_into}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelSettings:
    """What to load and how to run it."""

    model: str = _knob(
        "default",
        "Model to serve: a local sentence-transformers or transformers folder, 'default' for the "
        "embedded all-MiniLM-L6-v2, or a hub id (resolved through huggingface_hub; needs a network). "
        "An embedding model, a cross-encoder (reranker) or a SPLADE model. Give --model again to "
        "serve several side by side (an embedder and a reranker), each with its own replicas; the "
        "first is the default.",
        repeat_into="also_serve",
    )
    also_serve: tuple[str, ...] = _knob(
        (), "Further models served beside `model`, named by their folders (the second and later "
        "--model; env: comma-separated).")
    served_model_name: Optional[str] = _knob(
        None, "Name(s) of the model, comma-separated: the first is reported by /v1/models and in "
        "responses, every one is accepted in the request's `model` field (default: the model "
        "folder's name)."
    )
    strict_model_name: bool = _knob(
        False, "Refuse (404) a request whose `model` is none of the served names. Off: a single-model "
        "server answers any name, logging each unknown name once, as TEI does (clients such as "
        "LangChain send their own default name)."
    )
    device: Device = _knob("auto", "auto (cuda when present, else cpu), cpu or cuda.")
    dtype: DType = _knob(
        "auto",
        "Compute precision. auto: bfloat16 on CPUs with AMX/avx512_bf16 and on GPUs that support it, "
        "float16 on older GPUs, float32 otherwise. int8 (OpenVINO on a CPU, embedding models, "
        "needs nncf: the int8 extra): the model quantized once on first start and served only "
        "if it keeps mean cosine >= 0.99 and top-10 neighbour agreement >= 0.95 with float32 on "
        "real prose, else refused with the figures (docs/models.md).",
    )
    max_seq_length: Optional[int] = _knob(
        None, "Override the model's max_seq_length (tokens per input, special tokens included)."
    )
    pooling: Optional[Literal["mean", "cls", "last_token", "max"]] = _knob(
        None, "Override the pooling mode read from the model folder."
    )
    default_prompt_name: Optional[str] = _knob(
        None, "Prompt (from the model's config_sentence_transformers.json) applied when a request "
        "names none."
    )
    revision: Optional[str] = _knob(None, "Hub revision, for a hub id.")


@dataclass(frozen=True)
class BatchSettings:
    """The dynamic batcher inside each replica (see floe/replica/scheduler.py)."""

    max_batch_tokens: Optional[int] = _knob(
        None,
        "Token budget of one forward pass, counted in padded tokens (longest input x batch size). "
        "Default: 2048 on CPU (measured faster there than larger budgets: batches of closer "
        "lengths, less padding, activations in cache), 16384 on GPUs (larger budgets raise "
        "throughput until the device saturates; they cost memory); never below the model's max "
        "length, up to 16384.",
    )
    max_batch_size: int = _knob(256, "Most sequences in one forward pass.")
    min_batch_fill: Optional[float] = _knob(
        None,
        "Fill floor of a batch (real tokens / padded tokens, 0-1): an input joins a batch only if "
        "the batch stays at least this full, so a short input does not pad a hundred rows up to "
        "the longest of them. Default: 0.95 on CPU, where a pass costs its padded tokens and little "
        "else; 0 (off) on GPUs, where fewer, larger passes pay more than padding costs.",
    )
    batch_timeout_ms: float = _knob(
        2.0,
        "Longest a sequence waits for its batch to fill while the engine is idle. 0 runs whatever "
        "is queued at once; a few ms raises fill under light concurrent load.",
    )
    max_queued_tokens: int = _knob(
        4_000_000,
        "Memory bound of a replica's queue: tokens waiting for a forward pass. Beyond it requests "
        "get 429 / RESOURCE_EXHAUSTED with Retry-After (the time bounds below usually refuse "
        "first).",
    )
    latency_target_ms: Optional[float] = _knob(
        None,
        "Latency target of a request: a replica admits a request only if its cost model predicts "
        "it finishes within this many ms of its arrival (the work queued ahead included); others "
        "get 429 / RESOURCE_EXHAUSTED at once, with a Retry-After from the model. A request's own "
        "deadline (the gRPC deadline, the x-request-timeout-ms header) overrides it. Unset: the "
        "queue is bounded in time by max_queue_ms instead (docs/operations.md).",
    )
    max_queue_ms: float = _knob(
        30_000.0,
        "Time bound of a replica's queue when no latency target is set: a request is refused "
        "(429 with Retry-After) while the work queued ahead of it is predicted to take longer "
        "than this.",
    )
    tuning: bool = _knob(
        True,
        "Online tuning of the batcher from the live load and the cost model: the batch wait "
        "(0 at light load), the token budget (the throughput-optimal one under load, never "
        "below max_batch_tokens unless the latency target needs it) and the fill floor (follows "
        "the measured padding). Every change is logged and exported. --no-tuning keeps the "
        "configured values, for reproducible benchmarks.",
    )


@dataclass(frozen=True)
class ReplicaSetSettings:
    """Replica processes behind one endpoint (see floe/fleet/)."""

    num_replicas: int = _knob(2, "Model replica processes behind the endpoint.")
    replica_transport: Literal["unix", "tcp"] = _knob(
        "unix",
        "How the front end reaches its replicas. unix: a Unix socket in a private directory "
        "(mode 0700) that only this user can open, no ports to collide, and the link's frames "
        "(floe/transport/frames.py: a fraction of gRPC's cost per call on both sides). tcp: "
        "the same frames on replica_host:start_port + i, behind the launch token, for replicas "
        "another host must reach.")
    replica_host: str = _knob("127.0.0.1", "Address replicas bind to (replica_transport tcp).")
    start_port: int = _knob(50100, "Replica i listens on start_port + i (replica_transport tcp).")
    num_gpus: int = _knob(1, "GPUs to place replicas on.")
    gpu_assignment: GpuAssignment = _knob(
        "dedicated",
        "dedicated: replica i gets GPU (i mod num_gpus) alone through CUDA_VISIBLE_DEVICES; "
        "shared: every replica sees all num_gpus GPUs and they share them (several replicas on one GPU).",
    )
    tensor_parallel_size: int = _knob(
        1, "GPUs per replica. The torch engine runs a replica on one device: values > 1 are refused."
    )
    gpu_memory_utilization: float = _knob(
        0.9,
        "Fraction of one GPU's memory that all replicas on it may use together; split evenly "
        "between them, and it bounds each replica's batch token budget.",
    )
    load_balancing: Balancing = _knob(
        "least_loaded",
        "round_robin, random, or least_loaded (fewest in-flight tokens, counted by the front end).",
    )
    split_min_tokens: int = _knob(
        256, "With least_loaded balancing, a request of several inputs is cut across replicas "
        "when that ends it sooner: water-filling of the replicas' in-flight tokens, each part "
        "at least this many tokens (one client sending one large request at a time then gets "
        "every replica, not one). Under steady load requests stay whole. 0: never cut.")
    hand_back_min_tokens: int = _knob(
        512, "With least_loaded balancing, when a replica answers its last request while another "
        "still has a queue (the end of a client's wave of requests), the busy one gives back "
        "queued inputs it has not started, up to half of its work, and the idle one computes "
        "them; the requests' answers are joined in the front end. Only queues holding twice "
        "this many tokens are asked, and only shares of at least this many are given. 0: never.")
    health_interval: float = _knob(1.0, "Seconds between health probes of each replica.")
    forward_timeout: float = _knob(
        120.0, "Seconds a replica may take to answer one request. Past it the request gets 503 / "
        "UNAVAILABLE with Retry-After (it is not retried: the replica is busy, not dead); a replica "
        "that is hung is found and restarted by its health probes."
    )
    replica_wait: float = _knob(
        10.0, "Seconds a request waits for a replica to come back into rotation when none is "
        "healthy (one restarting, or out of rotation after a failed call or a missed probe) "
        "before it gets 503 with Retry-After; replicas given up are not waited for. 0: at once.")
    coalesce_tokens: int = _knob(
        4096, "Requests that reach the same replica in one turn of the front end's event loop "
        "with the same options travel as one call of up to this many tokens (the hop's cost paid "
        "once per wave of small requests; each still gets exactly its own answer). A merged call "
        "also stays within one forward pass (the batch token budget and --max-batch-size). "
        "Larger requests go alone; 0 sends every request as its own call.")
    startup_timeout: float = _knob(
        300.0, "Seconds a replica may take to load and become ready. The first start of a model "
        "with the OpenVINO engine includes its conversion (about 30 s for MiniLM on 2 cores, more "
        "for larger models); later starts load the converted model from the cache in seconds.")
    max_restarts: int = _knob(
        5, "Restarts of one child process (a replica or a front-end worker) within restart_window before it is given up (crash loop)."
    )
    restart_window: float = _knob(300.0, "Seconds over which max_restarts is counted.")
    workers: int = _knob(
        4, "Threads per replica for tokenizing string requests sent to the replica directly."
    )
    engine: EngineKind = _knob(
        "auto",
        "auto: OpenVINO on the CPU for the architectures verified with it (floe info says which), "
        "torch on GPUs and for everything else; torch: transformers in torch; openvino: the model "
        "converted to OpenVINO (CPU only; falls back to torch when it does not convert); fake: a "
        "deterministic stand-in for API and load tests."
    )
    engine_cache_dir: Optional[str] = _knob(
        None, "Where converted models are cached (OpenVINO), so that later starts skip the "
        "conversion (default: $XDG_CACHE_HOME/floe, else ~/.cache/floe)."
    )
    packing: bool = _knob(
        True, "Let several short inputs share one row of a forward pass (block-diagonal "
        "attention, positions per input) where that is cheaper than padding them: the OpenVINO "
        "engine, BERT-family embedding models. The replica's batcher then forms packed batches "
        "where its cost model prices them lower per token."
    )
    native_attention: bool = _knob(
        True, "Run attention on floe's own kernel (floe/engine/native/) where it applies: the "
        "OpenVINO engine in bf16 on a CPU with AVX-512 BF16 and without AMX, BERT-family models "
        "with heads of 32 dimensions (all-MiniLM, BGE-small, e5-small ...). It computes each "
        "input's attention over its own keys only; it is built with the machine's C++ compiler "
        "at the first start and checked against OpenVINO's attention before it is used. "
        "Anything that stops it leaves OpenVINO's attention running (`floe info` says which).")
    fake_seconds_per_token: float = _knob(
        0.0, "fake engine only: simulated compute time per padded token (load and failover tests).")
    fake_seconds_per_batch: float = _knob(
        0.0, "fake engine only: simulated compute time per forward pass.")
    fake_crash_token_id: Optional[int] = _knob(
        None, "fake engine only: a forward pass holding this token id makes the replica process "
        "exit at once, as an input that crashes a model's kernels would (poison-input tests).")
    threads_per_replica: Optional[int] = _knob(
        None, "CPU threads per replica (default: the machine's cores split between replicas)."
    )


@dataclass(frozen=True)
class ServerSettings:
    """The front end: HTTP and gRPC listeners, admission and validation limits."""

    host: str = _knob("127.0.0.1", "Address the HTTP and gRPC listeners bind to.")
    port: int = _knob(8080, "HTTP port (OpenAI /v1/embeddings, /embed, /metrics ...). 0 disables HTTP.")
    grpc_port: int = _knob(50050, "Public gRPC port (floe.v1.Embedder and arctic_inference). 0 disables it.")
    api_key: Optional[str] = _knob(
        None, "Require `Authorization: Bearer KEY` (HTTP) or `authorization` metadata (gRPC)."
    )
    auto_truncate: bool = _knob(
        True, "Truncate inputs longer than max_seq_length unless a request says otherwise."
    )
    max_client_batch_size: int = _knob(2048, "Most inputs in one request (more: 413).")
    accept_token_ids: bool = _knob(
        True, "Accept token ids as input (OpenAI and TEI allow lists of ids). Turn off when clients "
        "may send ids of another tokenizer (LangChain's OpenAIEmbeddings sends tiktoken ids unless "
        "check_embedding_ctx_length=False): they would be embedded as the wrong text.")
    max_input_chars: Optional[int] = _knob(
        None, "Longest input string in characters, checked before tokenizing (default 250 x max_seq_length)."
    )
    payload_limit: int = _knob(16_000_000, "Largest HTTP request body in bytes (more: 413).")
    grpc_payload_limit: int = _knob(
        32 * 1024 * 1024,
        "Largest gRPC request message in bytes (more: RESOURCE_EXHAUSTED). 2048 inputs of 4096 "
        "token ids are 32 MiB.")
    http_header_timeout: float = _knob(
        10.0, "Seconds a connection may take to send a request's headers (also a new connection's "
        "first request); then it is closed.")
    http_body_timeout: float = _knob(
        60.0, "Seconds a client may take to send a request body once its headers are in.")
    keep_alive_timeout: float = _knob(
        75.0, "Seconds an idle keep-alive connection stays open between requests. Keep it above "
        "the idle timeout of any proxy in front (most use 60 s).")
    max_connections: int = _knob(
        2048, "Open HTTP connections at once; past it a new connection gets 503 and is closed.")
    max_header_count: int = _knob(
        100, "Most headers in one HTTP request (hyper's limit); more: 431, before any work.")
    max_header_bytes: int = _knob(
        32 * 1024, "Largest size of one HTTP request's request line and headers together, in "
        "bytes (nginx's 4 x 8 KiB buffers); more: 431, before any work.")
    max_concurrent_requests: int = _knob(
        1024, "Requests admitted at once across the endpoint; beyond it 429 with Retry-After."
    )
    tokenization_workers: Optional[int] = _knob(
        None, "Tokenizer threads in each front-end process (default: the cores, shared between "
        "the front-end processes, at least 1 each)."
    )
    frontend_workers: Optional[int] = _knob(
        None, "Front-end processes sharing the HTTP and gRPC ports and the replicas (default: 1 "
        "when the replicas compute on the CPU's cores; on GPU hosts what the cores allow beside "
        "the replicas, one per 4 free cores, at most 8).")
    drain_timeout: float = _knob(30.0, "Seconds SIGTERM waits for in-flight requests before exit.")
    log_level: str = _knob("info", "debug, info, warning or error.")
    log_format: LogFormat = _knob("text", "text or json (one object per line).")


@dataclass(frozen=True)
class CorpusSettings:
    """``floe embed-corpus``: how the offline job commits its work (floe/corpus/commit.py)."""

    commit_seconds: float = _knob(
        30.0, "Most seconds of compute a kill of `floe embed-corpus` may lose: rows embedded in a "
        "shard that is not finished yet are committed (a hidden part of the output folder) before "
        "this much compute is at risk, whatever the model, the corpus or --shard-rows; a rerun "
        "redoes only rows not committed. Smaller commits more often (each commit writes the "
        "rows finished since the last one).")


@dataclass(frozen=True)
class Settings:
    model: ModelSettings = field(default_factory=ModelSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    replicas: ReplicaSetSettings = field(default_factory=ReplicaSetSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    corpus: CorpusSettings = field(default_factory=CorpusSettings)

    def validate(self) -> "Settings":
        """Refuse values that cannot be honoured, with a message that says what to change."""
        b, r, s = self.batch, self.replicas, self.server
        if (b.max_batch_tokens is not None and b.max_batch_tokens < 1) or b.max_batch_size < 1:
            raise ConfigError("--max-batch-tokens and --max-batch-size must be positive")
        if b.batch_timeout_ms < 0:
            raise ConfigError("--batch-timeout-ms must be >= 0")
        if b.min_batch_fill is not None and not 0.0 <= b.min_batch_fill <= 1.0:
            raise ConfigError("--min-batch-fill must be between 0 and 1")
        if b.latency_target_ms is not None and not 0 < b.latency_target_ms < math.inf:
            raise ConfigError("--latency-target-ms must be a positive number of milliseconds")
        if not 0 < b.max_queue_ms < math.inf:
            raise ConfigError("--max-queue-ms must be a positive number of milliseconds")
        if r.num_replicas < 1:
            raise ConfigError("--num-replicas must be at least 1")
        if r.num_gpus < 1:
            raise ConfigError("--num-gpus must be at least 1")
        if r.tensor_parallel_size != 1:
            raise ConfigError(
                f"--tensor-parallel-size {r.tensor_parallel_size} is not supported: the torch engine "
                "runs each replica on one device. Use --num-replicas with --gpu-assignment dedicated "
                "to use several GPUs."
            )
        if not 0.0 < r.gpu_memory_utilization <= 1.0:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1]")
        for name in ("health_interval", "forward_timeout", "startup_timeout", "restart_window"):
            if not getattr(r, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if not r.replica_wait >= 0 or r.max_restarts < 0 or r.coalesce_tokens < 0 \
                or r.split_min_tokens < 0 or r.hand_back_min_tokens < 0:
            raise ConfigError("--replica-wait, --max-restarts, --coalesce-tokens, "
                              "--split-min-tokens and --hand-back-min-tokens must be >= 0")
        if s.max_client_batch_size < 1:
            raise ConfigError("--max-client-batch-size must be positive")
        if s.api_key is not None and not s.api_key.strip():
            raise ConfigError("--api-key is empty: give a key, or leave the setting out to serve "
                              "without authentication")
        for name in ("payload_limit", "grpc_payload_limit", "max_connections", "max_header_count",
                     "max_header_bytes",
                     "max_concurrent_requests"):
            if getattr(s, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        for name in ("http_header_timeout", "http_body_timeout", "keep_alive_timeout",
                     "drain_timeout"):
            if getattr(s, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if s.frontend_workers is not None and not 1 <= s.frontend_workers <= 64:
            raise ConfigError("--frontend-workers must be between 1 and 64")
        if s.max_input_chars is not None and s.max_input_chars < 1:
            raise ConfigError("--max-input-chars must be positive")
        if self.model.max_seq_length is not None and self.model.max_seq_length < 1:
            raise ConfigError("--max-seq-length must be positive")
        if not self.corpus.commit_seconds > 0:
            raise ConfigError("--commit-seconds must be positive")
        return self


SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "batch": BatchSettings,
    "replicas": ReplicaSetSettings,
    "server": ServerSettings,
    "corpus": CorpusSettings,
}
# the sections whose flags `floe serve` (and a replica) takes; "corpus" is `floe embed-corpus`'s
SERVE_SECTIONS: tuple[str, ...] = ("model", "batch", "replicas", "server")


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _env(f: dataclasses.Field) -> str:
    return "FLOE_" + f.name.upper()


def _base_type(tp: Any) -> Any:
    """Optional[X] -> X."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _parse_value(f: dataclasses.Field, tp: Any, raw: str) -> Any:
    tp = _base_type(tp)
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if raw not in choices:
            raise ConfigError(f"{_flag(f)}: {raw!r} is not one of {', '.join(choices)}")
        return raw
    if typing.get_origin(tp) is tuple:
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    if tp is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{_flag(f)}: {raw!r} is not a boolean")
    try:
        value = tp(raw)
    except ValueError:
        raise ConfigError(f"{_flag(f)}: {raw!r} is not a valid {tp.__name__}") from None
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{_flag(f)}: {raw!r} is not a finite number")
    return value


def _argparse_type(f: dataclasses.Field, tp: Any):
    def convert(raw: str) -> Any:
        try:
            return _parse_value(f, tp, raw)
        except ConfigError as e:  # argparse prints usage + message and exits 2
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = f.name
    return convert


def add_arguments(parser: argparse.ArgumentParser, sections: tuple[str, ...] = SERVE_SECTIONS,
                  skip: tuple[str, ...] = (), only: Optional[tuple[str, ...]] = None,
                  group: Optional[Any] = None, env: bool = True) -> None:
    """Adds one flag per settings field of the named sections (defaults come from the tree);
    ``skip`` leaves fields out, ``only`` keeps just the fields it names; ``group``: add them to
    this argument group instead of one per section. ``settings_from(args)`` reads them back;
    ``env=False``: a command that takes the flags but not their FLOE_* variables (its help then
    names none), whose values ``flag_value`` reads."""
    for name in sections:
        cls = SECTIONS[name]
        hints = typing.get_type_hints(cls)
        target = group or parser.add_argument_group(f"{name} settings")
        for f in dataclasses.fields(cls):
            if f.name in skip or (only is not None and f.name not in only):
                continue
            tp = _base_type(hints[f.name])
            if typing.get_origin(tp) is tuple:
                continue   # filled by a repeated flag (repeat_into) or the environment
            default = f.default if f.default is not dataclasses.MISSING else None
            where = f"env {_env(f)}; " if env else ""
            help_text = f"{f.metadata.get('help', '')} [{where}default {default}]"
            dest = f"{name}.{f.name}"
            if tp is bool:
                target.add_argument(_flag(f), dest=dest, default=None,
                                    action=argparse.BooleanOptionalAction, help=help_text)
            else:
                choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
                target.add_argument(_flag(f), dest=dest, default=None,
                                    metavar=None if choices else f.name.upper(),
                                    choices=choices, help=help_text,
                                    action="append" if f.metadata.get("repeat_into") else "store",
                                    type=_argparse_type(f, tp))


def flag_value(args: argparse.Namespace, section: str, name: str) -> Any:
    """The value of a field's flag (``add_arguments``) as given on the command line, else the
    tree's default; no FLOE_* variable is read. A repeatable flag gives its last value."""
    value = getattr(args, f"{section}.{name}", None)
    if isinstance(value, list):
        value = value[-1]
    if value is None:
        f = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
        value = f.default if f.default is not dataclasses.MISSING else None
    return value


def settings_to_dict(settings: Settings) -> dict:
    """The tree as plain JSON-able data (what crosses to a replica process): tuples as lists,
    as JSON gives them back."""
    return {name: {k: list(v) if isinstance(v, tuple) else v for k, v in section.items()}
            for name, section in dataclasses.asdict(settings).items()}


def settings_from_dict(data: dict) -> Settings:
    """The inverse of settings_to_dict; unknown sections or fields are a ConfigError."""
    built = {}
    for name, cls in SECTIONS.items():
        values = dict(data.get(name) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown {name} settings: {', '.join(sorted(unknown))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        built[name] = cls(**values)
    extra = set(data) - set(SECTIONS)
    if extra:
        raise ConfigError(f"unknown settings sections: {', '.join(sorted(extra))}")
    return Settings(**built).validate()


def sections_of(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat settings (``{"max_batch_tokens": "4096", "engine": "torch"}``: a Ray Serve
    application's arguments) sorted into their sections, a string parsed as its flag's value
    would be; ``settings_from(**sections_of(values))`` builds the tree. An unknown name is a
    ConfigError."""
    out: dict[str, dict[str, Any]] = {}
    for key, raw in values.items():
        for name, cls in SECTIONS.items():
            fields = {f.name: f for f in dataclasses.fields(cls)}
            if key in fields:
                value = raw
                if isinstance(raw, str):
                    value = _parse_value(fields[key], typing.get_type_hints(cls)[key], raw)
                out.setdefault(name, {})[key] = value
                break
        else:
            raise ConfigError(f"unknown setting {key!r}")
    return out


def settings_from(args: Optional[argparse.Namespace] = None, env: Optional[dict[str, str]] = None,
                  **overrides: dict[str, Any]) -> Settings:
    """Builds the tree: defaults, then FLOE_* variables, then flags, then ``overrides`` per section."""
    env = os.environ if env is None else env
    ns = vars(args) if args is not None else {}
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if _env(f) in env and env[_env(f)] != "":
                values[f.name] = _parse_value(f, hints[f.name], env[_env(f)])
            v = ns.get(f"{name}.{f.name}")
            if isinstance(v, list):   # a repeatable flag: the first value, the rest elsewhere
                values[f.metadata["repeat_into"]] = tuple(v[1:])
                v = v[0]
            if v is not None:
                values[f.name] = v
        values.update(overrides.get(name, {}))
        built[name] = cls(**values)
    return Settings(**built).validate()
