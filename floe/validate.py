"""Request checks: pure functions over the model's limits, called once per request, at the edge.

The edge is whichever process receives the client's request: the front end (`floe serve`, HTTP
and gRPC alike), or a replica run on its own. Everything behind the edge trusts the request; the
replica core only asserts invariants.

Order matters: every check here runs before the work it protects. Counts and sizes come first
(one comparison each), then per-item checks (vectorized for token ids), and only then does
anything tokenize. Each error names the offending parameter (``input[3]``) and stays small.

The character limit counts every character the tokenizer will see for an input: the prompt (an
explicit ``prompt``, or the text a ``prompt_name`` resolves to) plus the input itself. A prompt is
prepended to every input, so an oversized prompt is refused outright, whatever the truncation
setting: cutting it would silently change what the model is asked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from floe.errors import ModelNotFoundError, TooLargeError, ValidationError
from floe.kinds import KINDS
from floe.protocol import ITEMSIZE, OUTPUT_DTYPES, EncodeOptions, TokenBatch

CHARS_PER_TOKEN_LIMIT = 250  # TEI's pre-limit: 250 characters per token the model accepts
_INT32_MIN, _INT32_MAX = -(2 ** 31), 2 ** 31 - 1


@dataclass(frozen=True)
class Limits:
    """Everything a check needs to know about the server and the model, fixed at start-up."""

    max_items: int              # inputs per request (--max-client-batch-size)
    max_input_chars: int        # characters per tokenized text, prompt included
    max_seq_length: int         # tokens per input, special tokens included
    vocab_size: int
    dim: int
    auto_truncate: bool = True
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt_name: Optional[str] = None
    served_names: tuple[str, ...] = ()   # names the `model` field may carry ("" always passes)
    strict_model_name: bool = False      # unknown names: 404 (strict) or accepted (default)
    accept_token_ids: bool = True
    pairs: bool = False                  # a cross-encoder: items may be (query, document) pairs
    pooling: str = "mean"                # the model's pooling (what late chunking can pool by span)

    @classmethod
    def build(cls, spec: Any, *, max_items: int, max_input_chars: Optional[int] = None,
              auto_truncate: bool = True, default_prompt_name: Optional[str] = None,
              served_names: Sequence[str] = (), strict_model_name: bool = False,
              accept_token_ids: bool = True) -> "Limits":
        return cls(
            max_items=max_items,
            max_input_chars=max_input_chars or CHARS_PER_TOKEN_LIMIT * spec.max_seq_length,
            max_seq_length=spec.max_seq_length, vocab_size=spec.vocab_size, dim=spec.dim,
            auto_truncate=auto_truncate, prompts=tuple(sorted(dict(spec.prompts).items())),
            default_prompt_name=default_prompt_name or spec.default_prompt_name,
            served_names=tuple(served_names) or (spec.name,), strict_model_name=strict_model_name,
            accept_token_ids=accept_token_ids, pairs=KINDS[getattr(spec, "task", "embed")].pairs,
            pooling=getattr(spec, "pooling", "mean"))

    @classmethod
    def for_server(cls, spec: Any, settings: Any) -> "Limits":
        """The limits a server applies: from the model spec and the settings tree."""
        from floe.models.st_config import served_names

        srv = settings.server
        return cls.build(
            spec, max_items=srv.max_client_batch_size, max_input_chars=srv.max_input_chars,
            auto_truncate=srv.auto_truncate, default_prompt_name=settings.model.default_prompt_name,
            served_names=served_names(settings.model) or (spec.name,),
            strict_model_name=settings.model.strict_model_name,
            accept_token_ids=srv.accept_token_ids)

    @property
    def max_ids_per_item(self) -> int:
        """Token ids one client item may carry before truncation (same budget as characters)."""
        return self.max_input_chars


@dataclass(frozen=True)
class Plan:
    """What validation decided for one request: the prompt text and the truncation to apply."""

    prompt: str
    truncate: bool
    direction: str


def _p(param: str, i: int) -> str:
    return f"{param}[{i}]"


# --- request-level ------------------------------------------------------------------------------

def check_model(limits: Limits, model: Optional[str]) -> bool:
    """True when ``model`` is empty or a served name. An unknown name is a 404 with
    ``strict_model_name``; otherwise it is answered by the one model served (returns False, so
    the caller can log it)."""
    if not model or model in limits.served_names:
        return True
    if limits.strict_model_name:
        raise ModelNotFoundError(
            f"model {model[:100]!r} is not served here; this server serves "
            f"{', '.join(repr(n) for n in limits.served_names)}", param="model")
    return False


def check_count(limits: Limits, n: int, param: str = "input") -> None:
    """Item count: one comparison, before any per-item work."""
    if n == 0:
        raise ValidationError(f"`{param}` must not be empty", param=param)
    if n > limits.max_items:
        raise TooLargeError(
            f"batch of {n} inputs is over the limit of {limits.max_items} per request "
            "(--max-client-batch-size); split it into several requests", param=param)


def check_options(limits: Limits, options: EncodeOptions) -> Plan:
    """Checks the options and resolves the prompt; returns what tokenization must apply."""
    d = options.dimensions
    if d is not None:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValidationError("`dimensions` must be a positive integer", param="dimensions")
        if d > limits.dim:
            raise ValidationError(
                f"`dimensions` is {d} but the model's embedding dimension is {limits.dim}",
                param="dimensions")
    if options.truncation_direction not in ("right", "left"):
        raise ValidationError("`truncation_direction` must be 'left' or 'right'",
                              param="truncation_direction")
    if options.output_dtype not in OUTPUT_DTYPES:
        raise ValidationError(f"unknown output dtype {options.output_dtype[:40]!r}",
                              param="output_dtype")
    if options.prompt is not None and options.prompt_name:
        raise ValidationError("pass either prompt or prompt_name, not both", param="prompt_name")
    if options.prompt is not None:
        prompt, param = options.prompt, "prompt"
    else:
        name = options.prompt_name or limits.default_prompt_name
        prompts = dict(limits.prompts)
        if name and name not in prompts:
            names = ", ".join(sorted(prompts)) or "none (the model defines no prompts)"
            raise ValidationError(f"unknown prompt_name {name[:100]!r}; available: {names}",
                                  param="prompt_name")
        prompt, param = (prompts[name] if name else ""), "prompt_name"
    if len(prompt) > limits.max_input_chars:
        raise TooLargeError(
            f"the prompt has {len(prompt)} characters, over the limit of {limits.max_input_chars} "
            "characters per input (the prompt is prepended to every input)", param=param)
    check_text(prompt, param)
    truncate = limits.auto_truncate if options.truncate is None else bool(options.truncate)
    return Plan(prompt=prompt, truncate=truncate, direction=options.truncation_direction)


# Poolings late chunking can apply to a span of a document's token states: the mean as it is, a
# last-token model's last token of the span (a causal model's state there has read everything
# before it, as its last token does for a whole text). A CLS model's one summary position stands
# for the whole document, so its chunks are pooled by the mean of their span, as Jina's late
# chunking does. Max and weighted-mean poolings are not defined per span here: refused.
LATE_POOLINGS = ("mean", "mean_sqrt_len_tokens", "cls", "last_token")


def check_chunking(limits: Limits, chunk: Any) -> Any:
    """A request's ChunkOptions (floe/chunking.py): the chunk size within [MIN_CHUNK_TOKENS, the
    model's max length], an overlap smaller than the chunk, late chunking only where the model's
    pooling applies to a span. Returns the options with the size settled."""
    from floe.chunking import MIN_CHUNK_TOKENS

    n = chunk.max_tokens
    low = min(MIN_CHUNK_TOKENS, limits.max_seq_length)
    if n is None:
        n = limits.max_seq_length
    elif isinstance(n, bool) or not isinstance(n, int) or not low <= n <= limits.max_seq_length:
        raise ValidationError(
            f"`chunking.max_tokens` must be an integer from {low} to the model's max length "
            f"{limits.max_seq_length}", param="chunking.max_tokens")
    m = chunk.overlap
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValidationError("`chunking.overlap` must be a non-negative integer",
                              param="chunking.overlap")
    if m >= n:
        raise ValidationError(f"`chunking.overlap` ({m}) must be smaller than "
                              f"`chunking.max_tokens` ({n})", param="chunking.overlap")
    if (chunk.late or chunk.late_inputs) and limits.pooling not in LATE_POOLINGS:
        raise ValidationError(
            f"late chunking pools each chunk from the document's token states; this model's "
            f"{limits.pooling!r} pooling has no per-span form here (it works with "
            f"{', '.join(LATE_POOLINGS)})", param="chunking.late")
    return dataclasses.replace(chunk, max_tokens=n)


def check_text(text: str, param: str) -> None:
    """A string the Rust tokenizer can take: encodable as UTF-8 (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(
            f"`{param}` is not valid Unicode text (it holds a lone surrogate or another code point "
            "UTF-8 cannot encode)", param=param) from None


# --- text inputs --------------------------------------------------------------------------------

def check_texts(limits: Limits, texts: Sequence[Any], plan: Plan, param: str = "input") -> list[str]:
    """Per-item text checks; returns the texts cut to the character budget when truncating.

    Each input's budget is the limit minus the prompt's length. Over it, the input is cut (its head
    kept for right truncation, its tail for left) when truncation is on, else 413. The cut cannot
    change the result unless the kept characters hold fewer tokens than max_seq_length, i.e. more
    than 250 characters per token on average.
    """
    check_count(limits, len(texts), param)
    budget = limits.max_input_chars - len(plan.prompt)
    out: list[str] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValidationError(f"`{_p(param, i)}` must be a string", param=_p(param, i))
        if len(text) > budget:
            if not plan.truncate:
                raise TooLargeError(
                    f"{_p(param, i)} has {len(text) + len(plan.prompt)} characters with its prompt; "
                    f"the limit is {limits.max_input_chars} when truncation is off",
                    param=_p(param, i))
            text = text[:budget] if plan.direction == "right" else text[len(text) - budget:]
        check_text(text, _p(param, i))
        out.append(text)
    return out


def check_query(limits: Limits, query: Any, plan: Plan, param: str = "query") -> str:
    """A reranker's query: a non-empty string within the character limit (cut when truncating,
    as inputs are)."""
    if not isinstance(query, str):
        raise ValidationError(f"`{param}` must be a string", param=param)
    if not query.strip():
        raise ValidationError(f"`{param}` must not be empty", param=param)
    if len(query) > limits.max_input_chars:
        if not plan.truncate:
            raise TooLargeError(f"`{param}` has {len(query)} characters; the limit is "
                                f"{limits.max_input_chars} when truncation is off", param=param)
        query = query[:limits.max_input_chars]
    check_text(query, param)
    return query


def context_error(limits: Limits, got: int, i: int, param: str = "input") -> ValidationError:
    # vLLM's wording, which clients and their retry logic already recognise.
    return ValidationError(
        f"This model's maximum context length is {limits.max_seq_length} tokens. However, you "
        f"requested {got} tokens in {_p(param, i)} for embedding generation. Please reduce the "
        "length of the input, or enable truncation.", param=_p(param, i))


def check_token_lengths(limits: Limits, lengths: np.ndarray, truncate: bool, param: str = "input",
                        base_index: int = 0) -> None:
    """After tokenizing: no item without tokens; over max_seq_length only when truncating."""
    if lengths.size and lengths.min() == 0:
        i = base_index + int(np.argmin(lengths))
        raise ValidationError(f"{_p(param, i)} produced no tokens", param=_p(param, i))
    if not truncate and lengths.size and lengths.max() > limits.max_seq_length:
        k = int(np.argmax(lengths > limits.max_seq_length))
        raise context_error(limits, int(lengths[k]), base_index + k, param)


# --- token-id inputs ----------------------------------------------------------------------------

def check_token_batch(limits: Limits, tokens: TokenBatch, plan: Plan,
                      param: str = "input") -> TokenBatch:
    """Client-sent ids, vectorized: count, no empty item, 0 <= id < vocab_size, length within
    max_seq_length (cut from the side ``plan.direction`` names when truncating)."""
    check_count(limits, tokens.n, param)
    if not limits.accept_token_ids:
        raise ValidationError(
            f"this server does not accept token ids in `{param}` (--no-accept-token-ids): send the "
            "text itself. LangChain's OpenAIEmbeddings sends token ids of its own tokenizer unless "
            "created with check_embedding_ctx_length=False", param=param)
    lengths = tokens.lengths
    splits = tokens.type_splits
    if splits is not None and not limits.pairs:
        raise ValidationError("type_splits are for a cross-encoder's pairs; this model reads "
                              "one segment per input", param="type_splits")
    if tokens.spans is not None:
        # a client's own late-chunking windows: every span is pooled where it is, so nothing may
        # be cut from the window
        if limits.pairs or limits.pooling not in LATE_POOLINGS:
            raise ValidationError("spans (late chunking) need an embedding model with one of the "
                                  f"poolings {', '.join(LATE_POOLINGS)}", param="spans")
        if lengths.size and lengths.max() > limits.max_seq_length:
            i = int(np.argmax(lengths > limits.max_seq_length))
            raise context_error(limits, int(lengths[i]), i, param)
        if tokens.spans.rows > limits.max_items:
            raise TooLargeError(f"{tokens.spans.rows} spans, over the limit of {limits.max_items} "
                                "rows per request", param="spans")
    if lengths.size and lengths.min() <= 0:
        i = int(np.argmin(lengths))
        raise ValidationError(f"{_p(param, i)} is an empty list of token ids", param=_p(param, i))
    if lengths.max() > limits.max_ids_per_item:
        i = int(np.argmax(lengths > limits.max_ids_per_item))
        raise TooLargeError(f"{_p(param, i)} has {int(lengths[i])} token ids, over the limit of "
                            f"{limits.max_ids_per_item}", param=_p(param, i))
    ids = tokens.ids
    bad = (ids < 0) | (ids >= limits.vocab_size)
    if bad.any():
        pos = int(np.argmax(bad))
        i = int(np.searchsorted(tokens.offsets(), pos, side="right") - 1)
        raise ValidationError(
            f"Token id {int(ids[pos])} in {_p(param, i)} is out of vocabulary "
            f"(valid ids are 0..{limits.vocab_size - 1})", param=_p(param, i))
    max_len = limits.max_seq_length
    if lengths.max() <= max_len:
        return tokens
    if not plan.truncate:
        i = int(np.argmax(lengths > max_len))
        raise context_error(limits, int(lengths[i]), i, param)
    # Keep, per item, the first (right truncation) or last (left) max_len ids: one mask over the
    # concatenated ids, no per-item Python loop.
    off = tokens.offsets()
    item_of = np.repeat(np.arange(tokens.n), lengths)
    pos_in_item = np.arange(ids.shape[0]) - off[item_of]
    if plan.direction == "right":
        keep = pos_in_item < max_len
        if splits is not None:
            splits = np.minimum(splits, max_len)
    else:
        keep = pos_in_item >= (lengths[item_of] - max_len)
        if splits is not None:
            splits = np.maximum(splits - np.maximum(lengths - max_len, 0), 0)
    return TokenBatch(ids=ids[keep], lengths=np.minimum(lengths, max_len), type_splits=splits)


# --- the JSON `input` field (OpenAI and TEI shapes) -----------------------------------------------

def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_json_input(limits: Limits, value: Any, param: str
                     ) -> tuple[Optional[list[str]], Optional[TokenBatch]]:
    """A string, a list of strings, a list of token ids, or a list of such lists.

    The item count is checked before any item is looked at, so a 2-million-item list costs one
    comparison. Token ids are range-checked against int32 here; vocabulary checks come later.
    """
    if isinstance(value, str):
        return [value], None
    if not isinstance(value, list):
        raise ValidationError(
            f"`{param}` must be a string, a list of strings, a list of token ids or a list of "
            "lists of token ids", param=param)
    if not value:
        raise ValidationError(f"`{param}` must not be empty", param=param)
    first = value[0]
    if _is_int(first):
        # one input given as token ids: its length is bounded by the per-item id limit
        if len(value) > limits.max_ids_per_item:
            raise TooLargeError(f"`{param}` has {len(value)} token ids, over the limit of "
                                f"{limits.max_ids_per_item}", param=param)
        return None, _ids_batch([value], param, single=True)
    check_count(limits, len(value), param)
    if isinstance(first, str):
        for i, x in enumerate(value):
            if not isinstance(x, str):
                raise ValidationError(f"`{_p(param, i)}` must be a string like the other items",
                                      param=_p(param, i))
        return value, None
    if isinstance(first, list):
        cap = limits.max_ids_per_item
        for i, item in enumerate(value):
            if not isinstance(item, list) or not item:
                raise ValidationError(f"`{_p(param, i)}` must be a non-empty list of token ids",
                                      param=_p(param, i))
            if len(item) > cap:
                raise TooLargeError(f"`{_p(param, i)}` has {len(item)} token ids, over the limit "
                                    f"of {cap}", param=_p(param, i))
        return None, _ids_batch(value, param, single=False)
    raise ValidationError(
        f"`{param}` items must be strings or token ids, got {type(first).__name__}",
        param=_p(param, 0))


def _ids_batch(items: list[list[Any]], param: str, single: bool) -> TokenBatch:
    lengths = np.fromiter((len(x) for x in items), dtype=np.int64, count=len(items))
    flat = [t for x in items for t in x]
    # one C-level pass decides whether every id is a plain int in int32 range
    try:
        ids = np.array(flat, dtype=np.int64)
        ok = ids.ndim == 1 and all(type(t) is int for t in flat)
    except (OverflowError, TypeError, ValueError):
        ok, ids = False, None
    if not ok or ids is None or (ids.size and (ids.min() < _INT32_MIN or ids.max() > _INT32_MAX)):
        pos = next((k for k, t in enumerate(flat)
                    if not _is_int(t) or not _INT32_MIN <= t <= _INT32_MAX), 0)
        item = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
        where = _p(param, pos) if single else f"{_p(param, item)}[{pos - int(lengths[:item].sum())}]"
        raise ValidationError(f"`{where}` must be a token id (an integer in int32 range)", param=where)
    return TokenBatch(ids=ids.astype(np.int32), lengths=lengths)


def invariants_hold(spec: Any, kind: Any, tokens: TokenBatch, options: EncodeOptions) -> bool:
    """What the checks above guarantee a request that reaches a replica's model, re-checked
    there in O(1) numpy passes (floe/replica/core.py): items of 1 to max_seq_length ids, each id
    in the vocabulary, dimensions and output dtype a replica produces, pairs and spans only for
    a kind that takes them."""
    return (tokens.n > 0 and int(tokens.lengths.min()) >= 1
            and int(tokens.lengths.max()) <= spec.max_seq_length
            and int(tokens.lengths.sum()) == tokens.total_tokens
            and int(tokens.ids.min()) >= 0 and int(tokens.ids.max()) < spec.vocab_size
            and (options.dimensions is None or 1 <= options.dimensions <= spec.dim)
            and options.output_dtype in ITEMSIZE
            and (tokens.type_splits is None or kind.pairs)
            and (tokens.spans is None or "embed" in kind.route_kinds))
