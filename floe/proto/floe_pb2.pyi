from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputDType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOAT32: _ClassVar[OutputDType]
    FLOAT16: _ClassVar[OutputDType]
    BFLOAT16: _ClassVar[OutputDType]
    INT8: _ClassVar[OutputDType]
    UINT8: _ClassVar[OutputDType]
    BINARY: _ClassVar[OutputDType]
    UBINARY: _ClassVar[OutputDType]

class TruncationDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RIGHT: _ClassVar[TruncationDirection]
    LEFT: _ClassVar[TruncationDirection]
FLOAT32: OutputDType
FLOAT16: OutputDType
BFLOAT16: OutputDType
INT8: OutputDType
UINT8: OutputDType
BINARY: OutputDType
UBINARY: OutputDType
RIGHT: TruncationDirection
LEFT: TruncationDirection

class EncodeOptions(_message.Message):
    __slots__ = ("normalize", "truncate", "truncation_direction", "prompt_name", "prompt", "dimensions", "output_dtype", "priority", "deadline_ms")
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    normalize: bool
    truncate: bool
    truncation_direction: TruncationDirection
    prompt_name: str
    prompt: str
    dimensions: int
    output_dtype: OutputDType
    priority: int
    deadline_ms: float
    def __init__(self, normalize: _Optional[bool] = ..., truncate: _Optional[bool] = ..., truncation_direction: _Optional[_Union[TruncationDirection, str]] = ..., prompt_name: _Optional[str] = ..., prompt: _Optional[str] = ..., dimensions: _Optional[int] = ..., output_dtype: _Optional[_Union[OutputDType, str]] = ..., priority: _Optional[int] = ..., deadline_ms: _Optional[float] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "model", "texts", "token_ids", "lengths", "options", "type_splits", "span_counts", "span_bounds", "chunking")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TYPE_SPLITS_FIELD_NUMBER: _ClassVar[int]
    SPAN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    SPAN_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    CHUNKING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    token_ids: bytes
    lengths: _containers.RepeatedScalarFieldContainer[int]
    options: EncodeOptions
    type_splits: _containers.RepeatedScalarFieldContainer[int]
    span_counts: _containers.RepeatedScalarFieldContainer[int]
    span_bounds: bytes
    chunking: ChunkOptions
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., token_ids: _Optional[bytes] = ..., lengths: _Optional[_Iterable[int]] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ..., type_splits: _Optional[_Iterable[int]] = ..., span_counts: _Optional[_Iterable[int]] = ..., span_bounds: _Optional[bytes] = ..., chunking: _Optional[_Union[ChunkOptions, _Mapping]] = ...) -> None: ...

class ChunkOptions(_message.Message):
    __slots__ = ("max_tokens", "overlap", "late")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    overlap: int
    late: bool
    def __init__(self, max_tokens: _Optional[int] = ..., overlap: _Optional[int] = ..., late: _Optional[bool] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("tokenize_s", "queue_s", "inference_s", "total_s")
    TOKENIZE_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    tokenize_s: float
    queue_s: float
    inference_s: float
    total_s: float
    def __init__(self, tokenize_s: _Optional[float] = ..., queue_s: _Optional[float] = ..., inference_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("request_id", "n", "dim", "dtype", "embeddings", "token_counts", "timings", "model", "sparse_counts", "sparse_indices", "sparse_values", "chunk_input_index", "chunk_index", "chunk_start", "chunk_end", "chunk_counts")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPARSE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    SPARSE_INDICES_FIELD_NUMBER: _ClassVar[int]
    SPARSE_VALUES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_START_FIELD_NUMBER: _ClassVar[int]
    CHUNK_END_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    n: int
    dim: int
    dtype: OutputDType
    embeddings: bytes
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    timings: Timings
    model: str
    sparse_counts: _containers.RepeatedScalarFieldContainer[int]
    sparse_indices: bytes
    sparse_values: bytes
    chunk_input_index: _containers.RepeatedScalarFieldContainer[int]
    chunk_index: _containers.RepeatedScalarFieldContainer[int]
    chunk_start: _containers.RepeatedScalarFieldContainer[int]
    chunk_end: _containers.RepeatedScalarFieldContainer[int]
    chunk_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., n: _Optional[int] = ..., dim: _Optional[int] = ..., dtype: _Optional[_Union[OutputDType, str]] = ..., embeddings: _Optional[bytes] = ..., token_counts: _Optional[_Iterable[int]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., model: _Optional[str] = ..., sparse_counts: _Optional[_Iterable[int]] = ..., sparse_indices: _Optional[bytes] = ..., sparse_values: _Optional[bytes] = ..., chunk_input_index: _Optional[_Iterable[int]] = ..., chunk_index: _Optional[_Iterable[int]] = ..., chunk_start: _Optional[_Iterable[int]] = ..., chunk_end: _Optional[_Iterable[int]] = ..., chunk_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("request_id", "model", "query", "documents", "top_n", "return_documents", "raw_scores", "truncate", "truncation_direction", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    RETURN_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_DIRECTION_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    top_n: int
    return_documents: bool
    raw_scores: bool
    truncate: bool
    truncation_direction: TruncationDirection
    priority: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., top_n: _Optional[int] = ..., return_documents: _Optional[bool] = ..., raw_scores: _Optional[bool] = ..., truncate: _Optional[bool] = ..., truncation_direction: _Optional[_Union[TruncationDirection, str]] = ..., priority: _Optional[int] = ...) -> None: ...

class RerankResult(_message.Message):
    __slots__ = ("index", "score", "document")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    document: str
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., document: _Optional[str] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("request_id", "model", "results", "tokens", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    results: _containers.RepeatedCompositeFieldContainer[RerankResult]
    tokens: int
    timings: Timings
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., results: _Optional[_Iterable[_Union[RerankResult, _Mapping]]] = ..., tokens: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class HealthCheckRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthCheckResponse(_message.Message):
    __slots__ = ("healthy", "message", "ready")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    message: str
    ready: bool
    def __init__(self, healthy: _Optional[bool] = ..., message: _Optional[str] = ..., ready: _Optional[bool] = ...) -> None: ...

class GetReplicaInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("name", "bounds", "counts", "sum", "count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BOUNDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    bounds: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    sum: float
    count: int
    def __init__(self, name: _Optional[str] = ..., bounds: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ..., sum: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class ReplicaStats(_message.Message):
    __slots__ = ("requests", "failed_requests", "sequences", "tokens", "padded_tokens", "batches", "dropped_sequences", "queued_sequences", "queued_tokens", "in_flight_requests", "rss_bytes", "device_memory_used_bytes", "device_memory_total_bytes", "histograms", "refused_requests", "expired_requests", "predicted_wait_seconds", "cost_fixed_seconds", "cost_per_token_seconds", "cost_per_token_length_seconds", "cost_relative_error", "batch_budget_tokens", "batch_timeout_seconds", "batch_min_fill", "tuning_changes", "cost_per_token_window_seconds", "cost_window_span", "packed_batches", "batch_packing_align")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PADDED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAMS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COST_FIXED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COST_PER_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COST_PER_TOKEN_LENGTH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COST_RELATIVE_ERROR_FIELD_NUMBER: _ClassVar[int]
    BATCH_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_MIN_FILL_FIELD_NUMBER: _ClassVar[int]
    TUNING_CHANGES_FIELD_NUMBER: _ClassVar[int]
    COST_PER_TOKEN_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COST_WINDOW_SPAN_FIELD_NUMBER: _ClassVar[int]
    PACKED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCH_PACKING_ALIGN_FIELD_NUMBER: _ClassVar[int]
    requests: int
    failed_requests: int
    sequences: int
    tokens: int
    padded_tokens: int
    batches: int
    dropped_sequences: int
    queued_sequences: int
    queued_tokens: int
    in_flight_requests: int
    rss_bytes: int
    device_memory_used_bytes: int
    device_memory_total_bytes: int
    histograms: _containers.RepeatedCompositeFieldContainer[Histogram]
    refused_requests: int
    expired_requests: int
    predicted_wait_seconds: float
    cost_fixed_seconds: float
    cost_per_token_seconds: float
    cost_per_token_length_seconds: float
    cost_relative_error: float
    batch_budget_tokens: int
    batch_timeout_seconds: float
    batch_min_fill: float
    tuning_changes: int
    cost_per_token_window_seconds: float
    cost_window_span: int
    packed_batches: int
    batch_packing_align: int
    def __init__(self, requests: _Optional[int] = ..., failed_requests: _Optional[int] = ..., sequences: _Optional[int] = ..., tokens: _Optional[int] = ..., padded_tokens: _Optional[int] = ..., batches: _Optional[int] = ..., dropped_sequences: _Optional[int] = ..., queued_sequences: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., in_flight_requests: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., device_memory_used_bytes: _Optional[int] = ..., device_memory_total_bytes: _Optional[int] = ..., histograms: _Optional[_Iterable[_Union[Histogram, _Mapping]]] = ..., refused_requests: _Optional[int] = ..., expired_requests: _Optional[int] = ..., predicted_wait_seconds: _Optional[float] = ..., cost_fixed_seconds: _Optional[float] = ..., cost_per_token_seconds: _Optional[float] = ..., cost_per_token_length_seconds: _Optional[float] = ..., cost_relative_error: _Optional[float] = ..., batch_budget_tokens: _Optional[int] = ..., batch_timeout_seconds: _Optional[float] = ..., batch_min_fill: _Optional[float] = ..., tuning_changes: _Optional[int] = ..., cost_per_token_window_seconds: _Optional[float] = ..., cost_window_span: _Optional[int] = ..., packed_batches: _Optional[int] = ..., batch_packing_align: _Optional[int] = ...) -> None: ...

class ReplicaInfo(_message.Message):
    __slots__ = ("replica_id", "model", "architecture", "dtype", "device", "ready", "healthy", "dim", "max_seq_length", "pooling", "prompts", "default_prompt_name", "matryoshka_dims", "max_batch_tokens", "max_batch_size", "batch_timeout_ms", "pid", "restarts", "status_message", "address", "stats", "vocab_size", "task")
    class PromptsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LENGTH_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    MATRYOSHKA_DIMS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    model: str
    architecture: str
    dtype: str
    device: str
    ready: bool
    healthy: bool
    dim: int
    max_seq_length: int
    pooling: str
    prompts: _containers.ScalarMap[str, str]
    default_prompt_name: str
    matryoshka_dims: _containers.RepeatedScalarFieldContainer[int]
    max_batch_tokens: int
    max_batch_size: int
    batch_timeout_ms: float
    pid: int
    restarts: int
    status_message: str
    address: str
    stats: ReplicaStats
    vocab_size: int
    task: str
    def __init__(self, replica_id: _Optional[str] = ..., model: _Optional[str] = ..., architecture: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., ready: _Optional[bool] = ..., healthy: _Optional[bool] = ..., dim: _Optional[int] = ..., max_seq_length: _Optional[int] = ..., pooling: _Optional[str] = ..., prompts: _Optional[_Mapping[str, str]] = ..., default_prompt_name: _Optional[str] = ..., matryoshka_dims: _Optional[_Iterable[int]] = ..., max_batch_tokens: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., batch_timeout_ms: _Optional[float] = ..., pid: _Optional[int] = ..., restarts: _Optional[int] = ..., status_message: _Optional[str] = ..., address: _Optional[str] = ..., stats: _Optional[_Union[ReplicaStats, _Mapping]] = ..., vocab_size: _Optional[int] = ..., task: _Optional[str] = ...) -> None: ...

class GetReplicaInfoResponse(_message.Message):
    __slots__ = ("replicas", "n_replicas", "n_healthy_replicas")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    N_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    N_HEALTHY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaInfo]
    n_replicas: int
    n_healthy_replicas: int
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaInfo, _Mapping]]] = ..., n_replicas: _Optional[int] = ..., n_healthy_replicas: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
