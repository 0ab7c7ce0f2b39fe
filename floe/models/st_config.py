"""Reads a sentence-transformers (or plain transformers) folder into a ModelSpec, from JSON alone.

Three folder kinds, one reader each (``_embedding_modules``, ``_cross_encoder_modules``,
``_sparse_modules``, ``_plain_layout``):

- embedding models: Transformer -> Pooling -> Dense* -> Normalize?, the shape of nearly every
  published embedding model;
- cross-encoders (task "score"): a *ForSequenceClassification folder, as rerankers are published
  and as CrossEncoder saved before ST 6, or ST 6's CrossEncoder layout (modules.json with one
  sequence-classification Transformer);
- SPLADE (task "sparse"): SparseEncoder's MLM Transformer -> SpladePooling.

Anything else (Router/Asym, StaticEmbedding, LayerNorm, multi-mode pooling, prompt-excluding
pooling, causal-LM rerankers, inference-free SPLADE, CSR) is refused here with a message naming
the module, so a model never loads and then quietly computes something different from
sentence-transformers.

No torch import here: the front end reads the same spec to tokenize and validate.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from floe.config import ModelSettings
from floe.errors import ModelLoadError
from floe.models.families import find_known_model
from floe.models.source import resolve_model_path
from floe.models.spec import DenseSpec, ModelSpec

log = logging.getLogger(__name__)

# Module class names by role. ST <= 5 writes "sentence_transformers.models.X"; ST 6 writes the new
# homes ("sentence_transformers.base.modules.transformer.Transformer",
# "sentence_transformers.sentence_transformer.modules.pooling.Pooling", ...). Both are accepted by
# their class name, as long as the type lives in the sentence_transformers package.
_ROLES = {"Transformer": "transformer", "Pooling": "pooling", "Dense": "dense",
          "Normalize": "normalize", "Dropout": "dropout",
          "MLMTransformer": "transformer", "SpladePooling": "splade"}  # SparseEncoder (ST >= 5)
# Modules floe knows and does not run, with what they are.
_REFUSED_MODULES = {
    "LogitScore": "a causal-LM reranker (yes/no token logits); floe serves "
                  "*ForSequenceClassification cross-encoders",
    "SparseStaticEmbedding": "inference-free SPLADE (a static query-side weight per token)",
    "Router": "different modules per input kind (e.g. inference-free SPLADE's query side)",
    "Asym": "different modules per input kind",
    "SparseAutoEncoder": "a CSR sparse autoencoder",
    "StaticEmbedding": "a static token-embedding table",
}

# Pooling modes by their ST 6 names (config key "pooling_mode") and the legacy boolean keys.
_POOLING_FROM_ST = {"mean": "mean", "cls": "cls", "max": "max", "lasttoken": "last_token",
                    "mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "weightedmean": "weightedmean"}
_LEGACY_POOLING_KEYS = {  # in ST's concatenation order
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "last_token",
}
POOLING_MODES = tuple(_POOLING_FROM_ST.values())

# Dense activations the torch engine implements (torch.nn class names).
SUPPORTED_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU")
_DEFAULT_DENSE_ACTIVATION = "torch.nn.modules.activation.Tanh"  # ST's Dense default

# Cross-encoder activations (torch.nn class names) the replica applies to the logits.
SCORE_ACTIVATIONS = ("Sigmoid", "Identity", "Tanh", "ReLU", "Softmax")
# SpladePooling's options (sentence_transformers.sparse_encoder.modules.SpladePooling).
SPLADE_POOLING = ("max", "sum")
SPLADE_ACTIVATIONS = ("relu", "log1p_relu")

# Learned absolute positions offset by padding_idx + 1 (RoBERTa family): the usable length is
# max_position_embeddings - pad_token_id - 1 (514 -> 512 for XLM-R).
_OFFSET_POSITION_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                          "ibert", "mpnet", "longformer"}

# Activations that overflow in float16 (embeddinggemma's documented failure mode).
_REFUSE_FP16_TYPES = {"gemma3_text", "gemma3", "gemma2", "gemma"}

_DECODER_TYPES = {"qwen2", "qwen3", "mistral", "llama", "gemma", "gemma2", "phi3"}


def _read_json(path: str, what: str, required: bool = False) -> Optional[Any]:
    if not os.path.isfile(path):
        if required:
            raise ModelLoadError(f"{what} not found: expected {path}")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {what} ({os.path.basename(path)}): {exc}") from None


def _module_role(entry: dict) -> str:
    type_name = str(entry.get("type", ""))
    cls = type_name.rsplit(".", 1)[-1]
    if not type_name.startswith("sentence_transformers.") or cls not in _ROLES:
        what = f" ({_REFUSED_MODULES[cls]})" if cls in _REFUSED_MODULES else ""
        raise ModelLoadError(
            f"unsupported sentence-transformers module {type_name!r}{what} in modules.json: floe "
            "runs Transformer -> Pooling -> Dense -> Normalize pipelines, sequence-classification "
            "cross-encoders and SPLADE (MLM Transformer -> SpladePooling)")
    return _ROLES[cls]


def _pooling_mode(cfg: dict, folder: str) -> tuple[str, int, bool]:
    """(mode, embedding dimension, include_prompt) from a Pooling config.json (ST 6 or legacy)."""
    dim = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension"))
    if "pooling_mode" in cfg:
        raw = cfg["pooling_mode"]
        modes = [raw] if isinstance(raw, str) else list(raw)
        unknown = [m for m in modes if m not in _POOLING_FROM_ST]
        if unknown:
            raise ModelLoadError(f"{folder}: unknown pooling mode(s) {unknown}")
        modes = [_POOLING_FROM_ST[m] for m in modes]
    else:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if cfg.get(key)]
        modes = modes or ["mean"]  # ST's own fallback when no flag is set
    if len(modes) != 1:
        raise ModelLoadError(
            f"{folder}: pooling concatenates several modes {modes}; floe supports one pooling mode")
    return modes[0], int(dim) if dim is not None else 0, bool(cfg.get("include_prompt", True))


def _position_limit(config: dict) -> int:
    """Longest sequence the backbone's position table allows; 0 when the config does not say."""
    mpe = config.get("max_position_embeddings")
    if not isinstance(mpe, int) or mpe <= 0:
        return 0
    if config.get("model_type") in _OFFSET_POSITION_TYPES:
        pad = config.get("pad_token_id")
        return mpe - (int(pad) if isinstance(pad, int) else 1) - 1
    return mpe


def _tokenizer_pad_id(folder: str) -> Optional[int]:
    """The pad token's id, from tokenizer_config/special_tokens_map and tokenizer.json's vocab."""
    pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        cfg = _read_json(os.path.join(folder, name), name) or {}
        tok = cfg.get("pad_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        if isinstance(tok, str):
            pad = tok
            break
    if pad is None:
        return None
    tj = _read_json(os.path.join(folder, "tokenizer.json"), "tokenizer.json") or {}
    for added in tj.get("added_tokens", []):
        if added.get("content") == pad:
            return int(added["id"])
    vocab = (tj.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and pad in vocab:
        return int(vocab[pad])
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        for i, item in enumerate(vocab):
            if item and item[0] == pad:
                return i
    return None


def _read_dense(folder: str) -> DenseSpec:
    cfg = _read_json(os.path.join(folder, "config.json"), f"Dense config in {folder}", required=True)
    activation = cfg.get("activation_function") or _DEFAULT_DENSE_ACTIVATION
    cls = activation.rsplit(".", 1)[-1]
    if not activation.startswith("torch.") or cls not in SUPPORTED_ACTIVATIONS:
        raise ModelLoadError(
            f"{folder}: Dense activation {activation!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
    if cfg.get("module_input_name", "sentence_embedding") != "sentence_embedding" or \
            cfg.get("module_output_name") not in (None, "sentence_embedding"):
        raise ModelLoadError(f"{folder}: a Dense layer on token embeddings is not supported")
    if not any(os.path.isfile(os.path.join(folder, f))
               for f in ("model.safetensors", "pytorch_model.bin")):
        raise ModelLoadError(f"{folder}: Dense weights (model.safetensors or pytorch_model.bin) missing")
    return DenseSpec(path=folder, in_features=int(cfg["in_features"]),
                     out_features=int(cfg["out_features"]), bias=bool(cfg.get("bias", True)),
                     activation=activation, use_residual=bool(cfg.get("use_residual", False)))


def served_names(settings: ModelSettings) -> list[str]:
    """The --served-model-name aliases, in order (empty when unset)."""
    raw = settings.served_model_name or ""
    return [n.strip() for n in raw.split(",") if n.strip()]


@dataclass
class _Layout:
    """What a folder's module list says, before its backbone is read (one per folder kind)."""

    task: str                      # "embed" | "score" | "sparse"
    transformer_dir: str
    is_st: bool = True
    pooling: str = "mean"
    pool_dim: int = 0
    include_prompt: bool = True
    dense: list[DenseSpec] = field(default_factory=list)
    normalize: bool = False
    splade: tuple[str, str] = ("", "")   # (pooling_strategy, activation_function)
    sbert: dict = field(default_factory=dict)
    st_cfg: dict = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Backbone:
    """The backbone's config.json, read once."""

    folder: str
    config: dict
    text_cfg: dict                 # text_config for multimodal configs, else config
    model_type: str
    architecture: str
    hidden: int
    vocab_size: int
    limit: int                     # _position_limit


def _st_entries(path: str, modules: Any) -> tuple[list[dict], list[str]]:
    """modules.json sorted by idx, with each module's role; Dropout (identity) left out."""
    if not isinstance(modules, list) or not modules:
        raise ModelLoadError(f"{path}: modules.json lists no modules")
    entries = sorted(modules, key=lambda e: int(e.get("idx", 0)))
    pairs = [(e, _module_role(e)) for e in entries]
    pairs = [(e, r) for e, r in pairs if r != "dropout"]
    return [e for e, _ in pairs], [r for _, r in pairs]


def _transformer_task(entry: dict, sbert: dict) -> str:
    """The Transformer module's transformer_task: declared in sentence_bert_config.json (ST >= 5.4),
    else its class's default (ST 5's MLMTransformer: fill-mask)."""
    default = "fill-mask" if str(entry.get("type", "")).endswith(".MLMTransformer") else "feature-extraction"
    return str(sbert.get("transformer_task") or default)


_ST_MODEL_TYPES = ("SentenceTransformer", "CrossEncoder", "SparseEncoder")


def _read_layout(path: str) -> _Layout:
    """Dispatches on the folder kind: plain transformers, or a sentence-transformers model of
    type SentenceTransformer (embed), CrossEncoder (score) or SparseEncoder (SPLADE)."""
    modules = _read_json(os.path.join(path, "modules.json"), "modules.json")
    if modules is None:
        return _plain_layout(path)
    entries, roles = _st_entries(path, modules)
    st_cfg = _read_json(os.path.join(path, "config_sentence_transformers.json"),
                        "config_sentence_transformers.json") or {}
    if not roles or roles[0] != "transformer":
        raise ModelLoadError(f"{path}: modules.json must start with a Transformer; it has {roles}")
    folder = os.path.normpath(os.path.join(path, entries[0].get("path", "")))
    sbert = _read_json(os.path.join(folder, "sentence_bert_config.json"),
                       "sentence_bert_config.json") or {}
    layout = _Layout(task="embed", transformer_dir=folder, sbert=sbert, st_cfg=st_cfg)
    kind = st_cfg.get("model_type", "SentenceTransformer")  # absent before ST 5
    if kind not in _ST_MODEL_TYPES:
        raise ModelLoadError(f"{path}: a sentence-transformers {kind} is not supported (floe serves "
                             f"{', '.join(_ST_MODEL_TYPES)})")
    task = _transformer_task(entries[0], sbert)
    if kind == "CrossEncoder" or task == "sequence-classification":
        # (a CrossEncoder's Transformer that declares no task is its sequence classifier)
        return _cross_encoder_modules(path, roles, str(sbert.get("transformer_task")
                                                       or "sequence-classification"), layout)
    if kind == "SparseEncoder" or "splade" in roles:
        return _sparse_modules(path, entries, roles, task, layout)
    return _embedding_modules(path, entries, roles, task, layout)


def _plain_layout(path: str) -> _Layout:
    """No modules.json: a cross-encoder when config.json names a sequence-classification head
    (how CrossEncoder before ST 6 saved, and how most rerankers are published), else an
    embedding model with mean pooling and Normalize."""
    config = _read_json(os.path.join(path, "config.json"), "config.json", required=True)
    archs = config.get("architectures") or []
    if archs and str(archs[0]).endswith("ForSequenceClassification"):
        return _Layout(task="score", transformer_dir=path, is_st=False)
    return _Layout(task="embed", transformer_dir=path, is_st=False, normalize=True,
                   notices=["no modules.json: a plain transformers folder, served with mean "
                            "pooling and Normalize"])


def _embedding_modules(path: str, entries: list[dict], roles: list[str], task: str,
                       layout: _Layout) -> _Layout:
    """Transformer -> Pooling -> Dense* -> Normalize?"""
    if roles[1:2] != ["pooling"]:
        raise ModelLoadError(f"{path}: modules.json must start Transformer, Pooling; it has {roles}")
    rest = roles[2:]
    if "normalize" in rest and rest.index("normalize") != len(rest) - 1:
        raise ModelLoadError(f"{path}: a module after Normalize is not supported ({roles})")
    if any(r not in ("dense", "normalize") for r in rest):
        raise ModelLoadError(f"{path}: unsupported module order {roles}")
    if task != "feature-extraction":
        raise ModelLoadError(f"{path}: an embedding model's Transformer has transformer_task "
                             f"{task!r} (floe pools the backbone's hidden states: feature-extraction)")
    for entry, role in zip(entries[1:], roles[1:]):
        folder = os.path.join(path, entry.get("path", ""))
        if role == "pooling":
            cfg = _read_json(os.path.join(folder, "config.json"), "Pooling config", required=True)
            layout.pooling, layout.pool_dim, layout.include_prompt = _pooling_mode(cfg, entry.get("path", ""))
        elif role == "dense":
            layout.dense.append(_read_dense(folder))
        elif role == "normalize":
            layout.normalize = True
    return layout


def _cross_encoder_modules(path: str, roles: list[str], task: str, layout: _Layout) -> _Layout:
    """What CrossEncoder.save_pretrained writes in ST 6: one Transformer, sequence-classification."""
    if roles != ["transformer"] or task != "sequence-classification":
        raise ModelLoadError(
            f"{path}: a CrossEncoder with modules {roles} and transformer_task {task!r} is not "
            "supported; floe serves sequence-classification cross-encoders (one Transformer)")
    layout.task = "score"
    return layout


def _sparse_modules(path: str, entries: list[dict], roles: list[str], task: str,
                    layout: _Layout) -> _Layout:
    """What SparseEncoder saves for SPLADE: Transformer (fill-mask) or MLMTransformer, SpladePooling."""
    if roles != ["transformer", "splade"]:
        raise ModelLoadError(f"{path}: a SparseEncoder with modules {roles} is not supported; floe "
                             "serves SPLADE models (MLM Transformer -> SpladePooling)")
    if task != "fill-mask":
        raise ModelLoadError(f"{path}: SpladePooling needs the Transformer's MLM logits "
                             f"(transformer_task 'fill-mask'), not {task!r}")
    sub = entries[1].get("path", "")
    cfg = _read_json(os.path.join(path, sub, "config.json"), "SpladePooling config", required=True)
    strategy = cfg.get("pooling_strategy", "max")
    activation = cfg.get("activation_function", "relu")
    if strategy not in SPLADE_POOLING or activation not in SPLADE_ACTIVATIONS:
        raise ModelLoadError(
            f"{sub}: SpladePooling pooling_strategy {strategy!r} / activation_function "
            f"{activation!r} is not supported (pooling: {', '.join(SPLADE_POOLING)}; activation: "
            f"{', '.join(SPLADE_ACTIVATIONS)})")
    layout.task, layout.splade = "sparse", (strategy, activation)
    layout.pool_dim = int(cfg.get("embedding_dimension") or cfg.get("word_embedding_dimension") or 0)
    return layout


def _read_backbone(folder: str) -> _Backbone:
    config = _read_json(os.path.join(folder, "config.json"), "config.json", required=True)
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise ModelLoadError(
            f"{folder}: no tokenizer.json (floe needs a fast tokenizer's tokenizer.json)")
    text_cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    model_type = str(config.get("model_type", ""))
    archs = config.get("architectures") or []
    hidden = int(text_cfg.get("hidden_size") or text_cfg.get("d_model") or 0)
    vocab_size = int(text_cfg.get("vocab_size") or 0)
    if hidden <= 0 or vocab_size <= 0:
        raise ModelLoadError(f"{folder}/config.json lacks hidden_size or vocab_size")
    return _Backbone(folder=folder, config=config, text_cfg=text_cfg, model_type=model_type,
                     architecture=str(archs[0]) if archs else model_type, hidden=hidden,
                     vocab_size=vocab_size, limit=_position_limit(text_cfg | {"model_type": model_type}))


def _max_length(path: str, layout: _Layout, bb: _Backbone, settings: ModelSettings) -> int:
    """sentence_bert_config.json's max_seq_length, else the tokenizer's model_max_length, both
    capped by the position table (as ST's Transformer caps the tokenizer's value; CrossEncoder
    and SparseEncoder use the same module), then the --max-seq-length override."""
    tok_cfg = _read_json(os.path.join(bb.folder, "tokenizer_config.json"),
                         "tokenizer_config.json") or {}
    limit = bb.limit
    max_len = layout.sbert.get("max_seq_length")
    if not isinstance(max_len, int) or max_len <= 0:
        tml = tok_cfg.get("model_max_length")
        max_len = int(tml) if isinstance(tml, (int, float)) and 0 < tml < 1e9 else 0
        max_len = min(max_len, limit) if max_len and limit else (max_len or limit)
        if not max_len:
            raise ModelLoadError(f"{path}: no max_seq_length, model_max_length or "
                                 "max_position_embeddings to bound input length")
    if limit and max_len > limit:
        layout.notices.append(f"max_seq_length {max_len} exceeds the position table ({limit}); "
                              f"using {limit}")
        max_len = limit
    if settings.max_seq_length is not None:
        if limit and settings.max_seq_length > limit:
            raise ModelLoadError(
                f"--max-seq-length {settings.max_seq_length} exceeds what the model's positions "
                f"allow ({limit})")
        max_len = settings.max_seq_length
    return int(max_len)


def _embed_head(path: str, layout: _Layout, bb: _Backbone, settings: ModelSettings) -> dict:
    """Pooling, Dense and Matryoshka fields of an embedding model."""
    pooling = layout.pooling
    if settings.pooling is not None and settings.pooling != pooling:
        layout.notices.append(f"pooling overridden: {pooling} -> {settings.pooling}")
        pooling = settings.pooling
    if not layout.include_prompt:
        raise ModelLoadError(
            f"{path}: Pooling has include_prompt=false (prompt tokens excluded from pooling), "
            "which floe does not support")
    if layout.pool_dim and layout.pool_dim != bb.hidden:
        raise ModelLoadError(f"{path}: Pooling expects {layout.pool_dim}-dim tokens, the backbone "
                             f"gives {bb.hidden}")
    dim = bb.hidden
    for d in layout.dense:
        if d.in_features != dim:
            raise ModelLoadError(f"{d.path}: Dense in_features {d.in_features} != incoming {dim}")
        dim = d.out_features
    matryoshka = layout.st_cfg.get("matryoshka_dims") or ()
    if not matryoshka:  # published folders keep them in the model card (floe/models/families.py)
        known = find_known_model(settings.model, path, bb.model_type, dim)
        if known is not None:
            matryoshka = known.matryoshka_dims
            layout.notices.append(f"Matryoshka dimensions {list(matryoshka)} from {known.hub_id}'s "
                                  "model card")
    matryoshka = tuple(sorted({int(x) for x in matryoshka if 0 < int(x) <= dim}, reverse=True))
    if bb.model_type in _DECODER_TYPES and pooling not in ("last_token", "mean"):
        layout.notices.append(f"{pooling} pooling on a decoder model ({bb.model_type}) is unusual")
    return {"pooling": pooling, "include_prompt": layout.include_prompt, "dense": tuple(layout.dense),
            "dim": dim, "normalize": layout.normalize, "matryoshka_dims": matryoshka,
            "similarity_fn": str(layout.st_cfg.get("similarity_fn_name") or "cosine")}


def _num_labels(config: dict) -> int:
    """transformers' rule: an explicit num_labels, else the size of id2label, else 2."""
    n = config.get("num_labels")
    if isinstance(n, int) and n > 0:
        return n
    id2label = config.get("id2label")
    return len(id2label) if isinstance(id2label, dict) and id2label else 2


def _score_activation(layout: _Layout, config: dict, num_labels: int) -> str:
    """The activation CrossEncoder.predict applies by default, in ST 6.2's order: the saved
    config_sentence_transformers.json "activation_fn", then config.json's
    {"sentence_transformers": {"activation_fn"}}, then the pre-v4 key
    "sbert_ce_default_activation_function", then Sigmoid for one label and Identity for several.
    A path outside ``torch.`` is untrusted there (without trust_remote_code) and skipped."""
    st_section = config.get("sentence_transformers")
    candidates = [layout.st_cfg.get("activation_fn") if layout.is_st else None,
                  st_section.get("activation_fn") if isinstance(st_section, dict) else None,
                  config.get("sbert_ce_default_activation_function")]
    for dotted in candidates:
        if not isinstance(dotted, str) or not dotted:
            continue
        if not dotted.startswith("torch."):
            layout.notices.append(f"activation {dotted!r} is not a torch class (sentence-transformers "
                                  "ignores it without trust_remote_code); using the default")
            continue
        cls = dotted.rsplit(".", 1)[-1]
        if cls not in SCORE_ACTIVATIONS:
            raise ModelLoadError(f"cross-encoder activation {dotted!r} is not supported (supported: "
                                 f"{', '.join(SCORE_ACTIVATIONS)})")
        return cls
    return "Sigmoid" if num_labels == 1 else "Identity"


def _score_head(path: str, layout: _Layout, bb: _Backbone, settings: ModelSettings) -> dict:
    """A cross-encoder: the classifier's logits, num_labels wide."""
    if not bb.architecture.endswith("ForSequenceClassification"):
        causal = bb.architecture.endswith("ForCausalLM")
        raise ModelLoadError(
            f"{path}: a cross-encoder's backbone must be a *ForSequenceClassification model, not "
            f"{bb.architecture}" + (" (causal-LM rerankers, ST's LogitScore, are not supported)"
                                    if causal else ""))
    if settings.pooling is not None:
        raise ModelLoadError("--pooling does not apply to a cross-encoder (it has no Pooling module)")
    num_labels = _num_labels(bb.config)
    return {"pooling": "", "dim": num_labels, "normalize": False, "similarity_fn": "",
            "num_labels": num_labels,
            "score_activation": _score_activation(layout, bb.config, num_labels)}


def _sparse_head(path: str, layout: _Layout, bb: _Backbone, settings: ModelSettings) -> dict:
    """SPLADE: SpladePooling over the MLM head's vocab_size logits."""
    if settings.pooling is not None:
        raise ModelLoadError("--pooling does not apply to a SPLADE model (its pooling is SpladePooling)")
    if not bb.architecture.endswith("ForMaskedLM"):
        raise ModelLoadError(f"{path}: SPLADE needs a *ForMaskedLM backbone, not {bb.architecture}")
    if layout.pool_dim and layout.pool_dim != bb.vocab_size:
        raise ModelLoadError(f"{path}: SpladePooling expects {layout.pool_dim} dimensions, the MLM "
                             f"head gives {bb.vocab_size}")
    k = layout.st_cfg.get("max_active_dims")
    return {"pooling": "", "dim": bb.vocab_size, "normalize": False,
            "similarity_fn": str(layout.st_cfg.get("similarity_fn_name") or "dot"),
            "splade_pooling": layout.splade[0], "splade_activation": layout.splade[1],
            "max_active_dims": int(k) if isinstance(k, int) and k > 0 else 0}


_HEADS = {"embed": _embed_head, "score": _score_head, "sparse": _sparse_head}


def _prompts(path: str, st_cfg: dict, settings: ModelSettings) -> tuple[dict[str, str], Optional[str]]:
    prompts = st_cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelLoadError(f"{path}: config_sentence_transformers.json 'prompts' is not a "
                             "name -> string mapping")
    default_prompt = settings.default_prompt_name or st_cfg.get("default_prompt_name") or None
    if default_prompt is not None and default_prompt not in prompts:
        names = ", ".join(sorted(prompts)) or "none"
        raise ModelLoadError(f"default prompt {default_prompt!r} is not one of the model's prompts "
                             f"(available: {names})")
    return dict(prompts), default_prompt


def _pad_id(bb: _Backbone) -> int:
    for pad_id in (bb.config.get("pad_token_id"), bb.text_cfg.get("pad_token_id")):
        if isinstance(pad_id, int):
            return pad_id
    pad_id = _tokenizer_pad_id(bb.folder)
    return pad_id if isinstance(pad_id, int) else 0


def load_spec(settings: ModelSettings) -> ModelSpec:
    """Resolves ``settings.model`` to a folder and reads it into a ModelSpec (JSON only, no torch).

    The folder kind decides the task: an embedding model (Transformer -> Pooling -> ...), a
    cross-encoder (a *ForSequenceClassification folder, or what ST 6's CrossEncoder saves) or a
    SPLADE model (what SparseEncoder saves). Settings overrides (max_seq_length, pooling,
    default_prompt_name) are applied and checked here; anything that cannot be honoured raises
    ModelLoadError with what to change.
    """
    path = resolve_model_path(settings.model, settings.revision)
    layout = _read_layout(path)
    bb = _read_backbone(layout.transformer_dir)
    max_len = _max_length(path, layout, bb, settings)
    head = _HEADS[layout.task](path, layout, bb, settings)
    prompts, default_prompt = _prompts(path, layout.st_cfg, settings)
    type_vocab = bb.text_cfg.get("type_vocab_size")
    spec = ModelSpec(
        path=path,
        name=served_names(settings)[0] if settings.served_model_name else _default_name(settings.model, path),
        architecture=bb.architecture,
        model_type=bb.model_type,
        hidden_size=bb.hidden,
        max_seq_length=max_len,
        vocab_size=bb.vocab_size,
        prompts=prompts,
        default_prompt_name=default_prompt,
        refuse_float16=bb.model_type in _REFUSE_FP16_TYPES,
        padding_side="right",  # floe always right-pads; pooling reads the real lengths
        is_sentence_transformers=layout.is_st,
        notices=tuple(layout.notices),
        transformer_path="" if os.path.normpath(layout.transformer_dir) == os.path.normpath(path)
        else layout.transformer_dir,
        do_lower_case=bool(layout.sbert.get("do_lower_case", False)),
        pad_token_id=_pad_id(bb),
        max_position_limit=bb.limit,
        task=layout.task,
        uses_token_types=isinstance(type_vocab, int) and type_vocab > 1,
        **head,
    )
    for note in spec.notices:
        log.info("model %s: %s", spec.name, note)
    return spec


def _default_name(model: str, path: str) -> str:
    if model == "default":
        return "all-MiniLM-L6-v2"
    if os.path.isdir(os.path.expanduser(model)):
        return os.path.basename(os.path.normpath(os.path.abspath(os.path.expanduser(model))))
    return model  # a hub id is its own name
