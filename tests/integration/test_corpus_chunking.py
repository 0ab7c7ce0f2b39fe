"""`floe embed-corpus --chunk-tokens N --chunk-overlap M [--late-chunking]`: one row per chunk, in
document order, equal to what the server answers for the same documents, and resumable like
whole rows (a kill inside a shard keeps its committed chunks)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from floe import validate
from floe.chunking import ChunkOptions
from floe.config import ModelSettings
from floe.corpus.job import run
from floe.models import load_spec
from floe.textsets import stdlib_paragraphs
from floe.tokenize import Tokenizer
from tests.integration.test_corpus import emb, job, kill_job_when, write_corpus
from tests.support import floe_cli

pytestmark = pytest.mark.slow


def documents(n: int) -> list[str]:
    paras = stdlib_paragraphs(400)
    return ["\n\n".join(paras[i * 7:(i + 1) * 7]) if i % 5 else "" for i in range(n)]


def expected_chunks(model: str, docs: list[str], n: int, m: int, late: bool = False):
    spec = load_spec(ModelSettings(model=model))
    plan = validate.Plan(prompt="", truncate=True, direction="right")
    return Tokenizer(spec).encode_chunked(docs, plan, ChunkOptions(max_tokens=n, overlap=m, late=late))


@pytest.mark.parametrize("late", [False, True])
def test_one_row_per_chunk_in_document_order(tmp_path, tiny_bert, late):
    docs = documents(12)
    inp = write_corpus(tmp_path / "c.jsonl", docs, "jsonl", ids=[f"doc-{i}" for i in range(12)])
    out = tmp_path / "o.parquet"
    res = run(job(inp, out, tiny_bert, id_column="doc", chunk_tokens=24, chunk_overlap=4,
                  late_chunking=late, shard_rows=5))
    assert res["skipped"] == 0
    t = pq.read_table(str(out))
    assert t.column_names == ["id", "chunk", "start", "end", "embedding"]
    want = expected_chunks(tiny_bert, docs, 24, 4)
    assert t.num_rows == want.rows and want.counts[0] == 0   # the empty documents: no rows
    assert t.column("id").to_pylist() == [f"doc-{i}" for i in want.input_index]
    assert t.column("chunk").to_pylist() == want.chunk.tolist()
    assert t.column("start").to_pylist() == want.start.tolist()
    assert t.column("end").to_pylist() == want.end.tolist()
    vecs = emb(t)
    assert np.isfinite(vecs).all() and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)


def test_chunks_equal_the_text_of_each_chunk_embedded_alone(tmp_path, tiny_bert):
    from tests.integration.test_corpus import alone

    docs = documents(6)
    inp = write_corpus(tmp_path / "c.parquet", docs, "parquet")
    out = tmp_path / "o.parquet"
    run(job(inp, out, tiny_bert, chunk_tokens=24, chunk_overlap=4))
    t = pq.read_table(str(out))
    texts = [docs[i][a:b] for i, a, b in zip(t.column("id").to_pylist(),
                                             t.column("start").to_pylist(),
                                             t.column("end").to_pylist())]
    np.testing.assert_allclose(emb(t), alone(tiny_bert, texts), atol=2e-5)


def test_bad_chunk_options_are_refused_naming_the_flag(tmp_path):
    inp = write_corpus(tmp_path / "c.jsonl", documents(3), "jsonl")
    for args, flag in ((("--chunk-tokens", "4"), "--chunk-tokens"),
                       (("--chunk-tokens", "32", "--chunk-overlap", "40"), "--chunk-overlap")):
        r = floe_cli("embed-corpus", inp, "-o", str(tmp_path / "o.parquet"), "--engine", "fake",
                     "--text-column", "body", *args)
        assert r.returncode == 2 and flag in r.stderr, r.stderr


def test_a_killed_chunked_job_resumes_with_identical_output(tmp_path):
    from floe.corpus.writer import CorpusOutput, piece_files

    docs = [d for d in documents(40) if d][:24]
    inp = write_corpus(tmp_path / "c.jsonl", docs, "jsonl")
    args = ("--engine", "fake", "--shard-rows", "24", "--batch-tokens", "256", "--text-column",
            "body", "--workers", "1", "--chunk-tokens", "32", "--chunk-overlap", "8",
            "--late-chunking")
    ref = str(tmp_path / "ref.parquet")
    r = floe_cli("embed-corpus", inp, "-o", ref, *args)
    assert r.returncode == 0, r.stderr
    out = str(tmp_path / "o.parquet")
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLOE_FAKE_SECONDS_PER_BATCH="0.1",
               FLOE_COMMIT_SECONDS="0.3")
    kill_job_when([inp, "-o", out, *args], env,
                  lambda: len(piece_files(out + ".parts").get(0, [])) >= 2)
    assert 0 < CorpusOutput(out).piece_rows()[0]
    r = floe_cli("embed-corpus", inp, "-o", out, *args)
    assert r.returncode == 0, r.stderr
    got, want = pq.read_table(out), pq.read_table(ref)
    assert got.column_names == want.column_names
    for name in ("id", "chunk", "start", "end"):
        assert got.column(name).to_pylist() == want.column(name).to_pylist()
    np.testing.assert_array_equal(emb(got), emb(want))
