"""Shared pytest fixtures: model folders (the embedded MiniLM and tiny random-weight models).

The tiny models are built once per session into a temporary folder (a few seconds, no network);
sentence-transformers (the test oracle, slow to import) is imported only by tests that ask for
``st_model``, and each folder is loaded into it once per session.
"""

from __future__ import annotations

import os

import pytest

# Nothing in the test suite may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Servers and replicas that tests start use the torch engine (the reference path, and the fastest
# to start when nothing is converted yet) unless a test names another: the OpenVINO engine has its
# own tests (test_openvino_engine.py, and `floe serve` on the default model in
# test_http_real_model.py), so it is not converted once per tiny model in every module.
os.environ.setdefault("FLOE_ENGINE", "torch")

from tests.fixtures import tiny_models  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def engine_cache_dir(tmp_path_factory) -> str:
    """One converted-model cache (OpenVINO) for the whole session, shared by in-process engines
    and replica subprocesses (they inherit the variable): each model converts once per session."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # several workers (scripts/test.sh runs two): one cache beside their own temp folders, so
        # a model converted by one is found by the other (the per-key lock makes them take turns)
        path = str(tmp_path_factory.getbasetemp().parent / "engine_cache")
        os.makedirs(path, exist_ok=True)
    else:
        path = str(tmp_path_factory.mktemp("engine_cache"))
    os.environ["FLOE_ENGINE_CACHE_DIR"] = path
    return path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The embedded all-MiniLM-L6-v2 folder (real weights)."""
    return tiny_models.minilm_dir()


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_bert(tiny_model_root) -> str:
    """Tiny BERT, ST 6 layout: mean pooling + Normalize, max_seq_length 64."""
    return tiny_models.build_tiny_bert(os.path.join(tiny_model_root, "bert_mean"))


@pytest.fixture(scope="session")
def tiny_bert_dense(tiny_model_root) -> str:
    """Tiny BERT, legacy layout: CLS pooling + Dense(32->16, tanh) + Dense(16->12) + Normalize,
    prompts query/passage, max_seq_length 48."""
    return tiny_models.build_tiny_bert(
        os.path.join(tiny_model_root, "bert_cls_dense"), pooling="cls", layout="legacy",
        max_seq_length=48, seed=2,
        dense=[(32, 16, "torch.nn.modules.activation.Tanh"), (16, 12, "torch.nn.modules.linear.Identity")],
        prompts={"query": "query: ", "passage": "passage: "})


@pytest.fixture(scope="session")
def tiny_xlmr(tiny_model_root) -> str:
    """Tiny XLM-RoBERTa with its own Unigram tokenizer: CLS pooling + Normalize, do_lower_case."""
    return tiny_models.build_tiny_xlmr(os.path.join(tiny_model_root, "xlmr_cls"))


@pytest.fixture(scope="session")
def plain_bert(tiny_model_root) -> str:
    """A plain transformers folder (no modules.json)."""
    return tiny_models.build_plain_bert(os.path.join(tiny_model_root, "plain_bert"))


@pytest.fixture(scope="session")
def bert_reranker(tiny_model_root) -> str:
    """Tiny BERT cross-encoder (num_labels 1, token types), published layout: a plain folder with
    Sigmoid in config.json, like cross-encoder/ms-marco-MiniLM-L6-v2."""
    return tiny_models.build_bert_cross_encoder(os.path.join(tiny_model_root, "bert_reranker"))


@pytest.fixture(scope="session")
def xlmr_reranker(tiny_model_root) -> str:
    """Tiny XLM-R cross-encoder (num_labels 1, one token type), like BAAI/bge-reranker-base."""
    return tiny_models.build_xlmr_cross_encoder(os.path.join(tiny_model_root, "xlmr_reranker"))


@pytest.fixture(scope="session")
def multilabel_cross_encoder(tiny_model_root) -> str:
    """Tiny BERT cross-encoder with 3 labels, saved by ST 6's CrossEncoder (modules.json)."""
    return tiny_models.build_multilabel_cross_encoder(os.path.join(tiny_model_root, "bert_nli"))


@pytest.fixture(scope="session")
def bert_splade(tiny_model_root) -> str:
    """Tiny BERT SPLADE model saved by ST 6's SparseEncoder (SpladePooling max, relu)."""
    return tiny_models.build_bert_splade(os.path.join(tiny_model_root, "bert_splade"))


@pytest.fixture(scope="session")
def st_model():
    """``st_model(path)``: a session-cached SentenceTransformer on CPU (the parity oracle)."""
    cache: dict[str, object] = {}

    def load(path: str):
        if path not in cache:
            from sentence_transformers import SentenceTransformer

            cache[path] = SentenceTransformer(path, device="cpu")
        return cache[path]

    return load


# --- tiers ----------------------------------------------------------------------------------------
# `bash scripts/test.sh` (the README's test command, and CI) runs every test but those marked
# `full`: the remaining model families served one process each, every OpenVINO conversion, the
# corpus kill points past the first, and Ray. Each of those starts torch or Ray in a fresh process
# (a minute each on 2 cores); the default tier already covers each path once.
# FLOE_TEST_FULL=1 runs them too (docs/operations.md, "Tests").

def pytest_collection_modifyitems(config, items):
    if os.environ.get("FLOE_TEST_FULL", "") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="full tier only: FLOE_TEST_FULL=1 bash scripts/test.sh")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """FLOE_TEST_TIMES=FILE appends each phase's duration as it ends (which tests cost the run's
    minutes, readable while the run goes on; pytest's --durations prints only at the end)."""
    path = os.environ.get("FLOE_TEST_TIMES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{report.duration:8.2f} {report.when:8} {report.outcome:7} {report.nodeid}\n")
