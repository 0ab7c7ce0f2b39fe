"""What a model folder declares, read from its JSON files alone (no torch).

The front end reads a ModelSpec to tokenize (max length, prompts, special tokens) and to validate
requests (dimensions, vocabulary size); the engine reads the same spec to build the module pipeline.
Loading it never imports torch, so the front end stays torch-free.

A spec describes one of three tasks, each with its own head after the backbone:

- ``"embed"``: Pooling -> Dense* (-> Normalize, applied by the replica): (n, dim) embeddings.
- ``"score"``: a cross-encoder (``*ForSequenceClassification``): the classifier's logits,
  (n, num_labels), for (query, document) pairs; ``score_activation`` is applied by the front end.
- ``"sparse"``: SPLADE: the MLM head's logits pooled by ``SpladePooling``: (n, vocab_size),
  non-negative and mostly zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class DenseSpec:
    """One sentence-transformers Dense module (a folder such as 2_Dense)."""

    path: str
    in_features: int
    out_features: int
    bias: bool = True
    activation: str = "torch.nn.modules.linear.Identity"
    use_residual: bool = False     # ST >= 5.7: out = act(linear(x)) + x (or + residual(x))


@dataclass(frozen=True)
class ModelSpec:
    path: str                      # resolved local folder
    name: str                      # served model name
    architecture: str              # e.g. "BertModel", "Gemma3TextModel"
    model_type: str                # config.json model_type, e.g. "bert"
    hidden_size: int
    dim: int                       # output dimension: after Dense layers (embed), num_labels
                                   # (score), vocab_size (sparse)
    max_seq_length: int            # tokens per input, special tokens included
    vocab_size: int
    pooling: str                   # "mean" | "cls" | "last_token" | "max" | "mean_sqrt_len_tokens"
                                   # | "weightedmean"; "" for score and sparse (no Pooling module)
    include_prompt: bool = True    # Pooling's include_prompt (False: prompt tokens not pooled)
    dense: tuple[DenseSpec, ...] = ()
    normalize: bool = False        # pipeline ends in Normalize
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: Optional[str] = None
    matryoshka_dims: tuple[int, ...] = ()
    similarity_fn: str = "cosine"
    refuse_float16: bool = False   # activations overflow in fp16 (embeddinggemma)
    padding_side: str = "right"
    is_sentence_transformers: bool = True
    notices: tuple[str, ...] = ()  # things loading decided on its own, shown by `floe info`
    transformer_path: str = ""     # folder of the backbone (config.json, weights, tokenizer.json);
                                   # "" means ``path`` (ST saves the Transformer module in the root)
    do_lower_case: bool = False    # sentence_bert_config.json: lowercase before tokenizing
    pad_token_id: int = 0          # id used to pad a batch (position ids of RoBERTa-likes depend on it)
    max_position_limit: int = 0    # longest sequence the position table allows (0: unknown)
    task: str = "embed"            # "embed" | "score" (cross-encoder) | "sparse" (SPLADE); see above
    uses_token_types: bool = False # the backbone has token types (BERT: type_vocab_size 2): a pair's
                                   # second segment is fed type 1 (Engine.prepare's type_splits);
                                   # False for XLM-R (type_vocab_size 1), ModernBERT (none)
    num_labels: int = 0            # score: logits per pair (== dim); 0 for the other tasks
    score_activation: str = ""     # score: what CrossEncoder.predict applies to the logits by
                                   # default, a torch.nn class name: "Sigmoid" | "Identity" | "Tanh"
                                   # | "ReLU" | "Softmax" (over the labels); "" for the other tasks
    splade_pooling: str = ""       # sparse: SpladePooling's pooling_strategy, "max" | "sum"
    splade_activation: str = ""    # sparse: "relu" (log1p(relu(x))) | "log1p_relu" (log1p applied twice)
    max_active_dims: int = 0       # sparse: keep each row's k largest values (ST's max_active_dims,
                                   # config_sentence_transformers.json); 0: all of them

    @property
    def backbone_path(self) -> str:
        """Folder holding config.json, the backbone weights and tokenizer.json."""
        return self.transformer_path or self.path
