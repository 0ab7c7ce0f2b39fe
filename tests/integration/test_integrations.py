"""docs/integrations.md, run: the light clients, configured exactly as the guide says, against a
real `floe serve --engine fake`. Each result must equal floe's own embedding of the same texts."""

from __future__ import annotations

import numpy as np
import pytest

import floe
from tests.support import floe_serve

pytestmark = pytest.mark.slow

TEXTS = ["what is the capital of france?", "paris is the capital of france", "a third text"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with floe_serve("--engine", "fake", "--num-replicas", "1", "--model", "default",
                    tmp_dir=str(tmp_path_factory.mktemp("serve"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def expected(server):
    """floe's own normalized embedding of TEXTS (the /embed route normalizes by default)."""
    with floe.Client(server.url) as c:
        return c.embed(TEXTS)


@pytest.fixture(scope="module")
def served_name(server):
    with floe.Client(server.url) as c:
        return c.info()["model_id"]


def close(got, want) -> None:
    # JSON floats are float32 values printed and parsed again
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, rtol=0, atol=1e-6)


# --- openai SDK -------------------------------------------------------------------------------

def test_openai_sdk_with_the_served_model_name(server, expected, served_name):
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    resp = client.embeddings.create(model=served_name, input=TEXTS)
    close([d.embedding for d in resp.data], expected)
    # base64 is what the SDK asks for when encoding_format is not given; also check float
    resp = client.embeddings.create(model=served_name, input=TEXTS[0], encoding_format="float")
    close([resp.data[0].embedding], expected[:1])


def test_openai_sdk_with_another_model_name(server, expected):
    """A single-model server answers any model name (the guide says so)."""
    from openai import OpenAI
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    resp = client.embeddings.create(model="text-embedding-3-small", input=TEXTS)
    close([d.embedding for d in resp.data], expected)


# --- LangChain ---------------------------------------------------------------------------------

def test_langchain_openai_embeddings(server, expected):
    from langchain_openai import OpenAIEmbeddings
    emb = OpenAIEmbeddings(
        base_url=server.url + "/v1", api_key="unused",
        check_embedding_ctx_length=False,  # send text, not tiktoken ids (see the guide)
    )  # model left at LangChain's default name: answered by the single served model
    close(emb.embed_documents(TEXTS), expected)
    close([emb.embed_query(TEXTS[0])], expected[:1])


# --- huggingface_hub -------------------------------------------------------------------------------

def test_huggingface_hub_inference_client_feature_extraction(server, expected, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient
    # The test suite runs with HF_HUB_OFFLINE=1, under which huggingface_hub refuses every request,
    # even to a local server (the guide says to leave it unset in the client's process).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(base_url=server.url)
    got = client.feature_extraction(TEXTS)  # POST / (TEI's route), normalized by default
    assert isinstance(got, np.ndarray) and got.shape == expected.shape
    close(got, expected)
