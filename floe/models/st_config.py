"""Reads a sentence-transformers (or plain transformers) folder into a ModelSpec, from JSON alone.

The module pipeline floe runs is Transformer -> Pooling -> Dense* -> Normalize?, the shape of
nearly every published embedding model. Anything else (Router/Asym, StaticEmbedding, LayerNorm,
multi-mode pooling, prompt-excluding pooling) is refused here with a message naming the module,
so a model never loads and then quietly computes something different from sentence-transformers.

No torch import here: the front end reads the same spec to tokenize and validate.
"""

from __future__ import annotations

import json
import logging
import os
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
          "Normalize": "normalize", "Dropout": "dropout"}

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
        raise ModelLoadError(
            f"unsupported sentence-transformers module {type_name!r} in modules.json: floe runs "
            "Transformer -> Pooling -> Dense -> Normalize pipelines")
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


def load_spec(settings: ModelSettings) -> ModelSpec:
    """Resolves ``settings.model`` to a folder and reads it into a ModelSpec (JSON only, no torch).

    Settings overrides (max_seq_length, pooling, default_prompt_name) are applied and checked
    here; anything that cannot be honoured raises ModelLoadError with what to change.
    """
    path = resolve_model_path(settings.model, settings.revision)
    notices: list[str] = []
    modules = _read_json(os.path.join(path, "modules.json"), "modules.json")
    is_st = modules is not None

    transformer_dir = path
    pooling = "mean"
    pool_dim = 0
    include_prompt = True
    dense: list[DenseSpec] = []
    normalize = False
    sbert: dict = {}
    st_cfg: dict = {}

    if is_st:
        if not isinstance(modules, list) or not modules:
            raise ModelLoadError(f"{path}: modules.json lists no modules")
        entries = sorted(modules, key=lambda e: int(e.get("idx", 0)))
        roles = [_module_role(e) for e in entries]
        order = [r for r in roles if r != "dropout"]  # Dropout is the identity at inference
        if not order or order[0] != "transformer" or order[1:2] != ["pooling"]:
            raise ModelLoadError(
                f"{path}: modules.json must start Transformer, Pooling; it has {order}")
        rest = order[2:]
        if "normalize" in rest and rest.index("normalize") != len(rest) - 1:
            raise ModelLoadError(f"{path}: a module after Normalize is not supported ({order})")
        if any(r not in ("dense", "normalize") for r in rest):
            raise ModelLoadError(f"{path}: unsupported module order {order}")
        for entry, role in zip(entries, roles):
            folder = os.path.join(path, entry.get("path", ""))
            if role == "transformer":
                transformer_dir = os.path.normpath(folder)
                sbert = _read_json(os.path.join(folder, "sentence_bert_config.json"),
                                   "sentence_bert_config.json") or {}
            elif role == "pooling":
                cfg = _read_json(os.path.join(folder, "config.json"), "Pooling config", required=True)
                pooling, pool_dim, include_prompt = _pooling_mode(cfg, entry.get("path", ""))
            elif role == "dense":
                dense.append(_read_dense(folder))
            elif role == "normalize":
                normalize = True
        st_cfg = _read_json(os.path.join(path, "config_sentence_transformers.json"),
                            "config_sentence_transformers.json") or {}
    else:
        normalize = True
        notices.append("no modules.json: a plain transformers folder, served with mean pooling "
                       "and Normalize")

    config = _read_json(os.path.join(transformer_dir, "config.json"), "config.json", required=True)
    if not os.path.isfile(os.path.join(transformer_dir, "tokenizer.json")):
        raise ModelLoadError(
            f"{transformer_dir}: no tokenizer.json (floe needs a fast tokenizer's tokenizer.json)")
    text_cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    model_type = str(config.get("model_type", ""))
    archs = config.get("architectures") or []
    architecture = str(archs[0]) if archs else model_type
    hidden = int(text_cfg.get("hidden_size") or text_cfg.get("d_model") or 0)
    vocab_size = int(text_cfg.get("vocab_size") or 0)
    if hidden <= 0 or vocab_size <= 0:
        raise ModelLoadError(f"{transformer_dir}/config.json lacks hidden_size or vocab_size")
    limit = _position_limit(text_cfg | {"model_type": model_type})

    # max_seq_length: sentence_bert_config.json, else the tokenizer's model_max_length, both capped
    # by the position table (ST caps the tokenizer's value the same way).
    tok_cfg = _read_json(os.path.join(transformer_dir, "tokenizer_config.json"),
                         "tokenizer_config.json") or {}
    max_len = sbert.get("max_seq_length")
    if not isinstance(max_len, int) or max_len <= 0:
        tml = tok_cfg.get("model_max_length")
        max_len = int(tml) if isinstance(tml, (int, float)) and 0 < tml < 1e9 else 0
        max_len = min(max_len, limit) if max_len and limit else (max_len or limit)
        if not max_len:
            raise ModelLoadError(f"{path}: no max_seq_length, model_max_length or "
                                 "max_position_embeddings to bound input length")
    if limit and max_len > limit:
        notices.append(f"max_seq_length {max_len} exceeds the position table ({limit}); using {limit}")
        max_len = limit
    if settings.max_seq_length is not None:
        if limit and settings.max_seq_length > limit:
            raise ModelLoadError(
                f"--max-seq-length {settings.max_seq_length} exceeds what the model's positions "
                f"allow ({limit})")
        max_len = settings.max_seq_length

    if settings.pooling is not None and settings.pooling != pooling:
        notices.append(f"pooling overridden: {pooling} -> {settings.pooling}")
        pooling = settings.pooling
    if not include_prompt:
        raise ModelLoadError(
            f"{path}: Pooling has include_prompt=false (prompt tokens excluded from pooling), "
            "which floe does not support")
    if pool_dim and pool_dim != hidden:
        raise ModelLoadError(f"{path}: Pooling expects {pool_dim}-dim tokens, the backbone gives {hidden}")
    dim = hidden
    for d in dense:
        if d.in_features != dim:
            raise ModelLoadError(f"{d.path}: Dense in_features {d.in_features} != incoming {dim}")
        dim = d.out_features

    prompts = st_cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelLoadError(f"{path}: config_sentence_transformers.json 'prompts' is not a "
                             "name -> string mapping")
    default_prompt = settings.default_prompt_name or st_cfg.get("default_prompt_name") or None
    if default_prompt is not None and default_prompt not in prompts:
        names = ", ".join(sorted(prompts)) or "none"
        raise ModelLoadError(f"default prompt {default_prompt!r} is not one of the model's prompts "
                             f"(available: {names})")

    matryoshka = st_cfg.get("matryoshka_dims") or ()
    if not matryoshka:  # published folders keep them in the model card (floe/models/families.py)
        known = find_known_model(settings.model, path, model_type, dim)
        if known is not None:
            matryoshka = known.matryoshka_dims
            notices.append(f"Matryoshka dimensions {list(matryoshka)} from {known.hub_id}'s model card")
    matryoshka = tuple(sorted({int(x) for x in matryoshka if 0 < int(x) <= dim}, reverse=True))

    pad_id = config.get("pad_token_id")
    if not isinstance(pad_id, int):
        pad_id = text_cfg.get("pad_token_id")
    if not isinstance(pad_id, int):
        pad_id = _tokenizer_pad_id(transformer_dir)
    if not isinstance(pad_id, int):
        pad_id = 0

    if model_type in _DECODER_TYPES and pooling not in ("last_token", "mean"):
        notices.append(f"{pooling} pooling on a decoder model ({model_type}) is unusual")

    spec = ModelSpec(
        path=path,
        name=served_names(settings)[0] if settings.served_model_name else _default_name(settings.model, path),
        architecture=architecture,
        model_type=model_type,
        hidden_size=hidden,
        dim=dim,
        max_seq_length=int(max_len),
        vocab_size=vocab_size,
        pooling=pooling,
        include_prompt=include_prompt,
        dense=tuple(dense),
        normalize=normalize,
        prompts=dict(prompts),
        default_prompt_name=default_prompt,
        matryoshka_dims=matryoshka,
        similarity_fn=str(st_cfg.get("similarity_fn_name") or "cosine"),
        refuse_float16=model_type in _REFUSE_FP16_TYPES,
        padding_side="right",  # floe always right-pads; pooling reads the real lengths
        is_sentence_transformers=is_st,
        notices=tuple(notices),
        transformer_path="" if os.path.normpath(transformer_dir) == os.path.normpath(path)
        else transformer_dir,
        do_lower_case=bool(sbert.get("do_lower_case", False)),
        pad_token_id=int(pad_id),
        max_position_limit=limit,
    )
    for note in notices:
        log.info("model %s: %s", spec.name, note)
    return spec


def _default_name(model: str, path: str) -> str:
    if model == "default":
        return "all-MiniLM-L6-v2"
    if os.path.isdir(os.path.expanduser(model)):
        return os.path.basename(os.path.normpath(os.path.abspath(os.path.expanduser(model))))
    return model  # a hub id is its own name
