"""`floe embed-corpus` end to end on one machine: formats, equality with embedding each text
alone, order and ids, float16, bad rows, resume after SIGKILL at several points, refusals."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from floe.config import ModelSettings
from floe.corpus.embed import CorpusOptions
from floe.corpus.job import CorpusJob, run
from floe.models import load_spec
from floe.protocol import EncodeOptions
from floe.tokenize import Tokenizer
from tests.support import floe_cli

WORDS = ("search vector corpus shard parquet embedding index model token batch engine query "
         "passage offline resume kill order row column").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(1, 40)) if i % 9 else 120  # every 9th is longer than max_seq_length
        out.append(f"doc {i}: " + " ".join(rng.choice(WORDS, size=k)))
    return out


def write_corpus(path, texts, fmt: str, ids=None) -> str:
    ids = ids if ids is not None else [f"id-{i}" for i in range(len(texts))]
    if fmt == "parquet":
        pq.write_table(pa.table({"doc": ids, "body": texts}), path, row_group_size=5)
    elif fmt == "jsonl":
        with open(path, "w") as f:
            for i, t in zip(ids, texts):
                f.write(json.dumps({"doc": i, "body": t}) + "\n")
    else:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["doc", "body"])
            w.writerows(zip(ids, texts))
    return str(path)


def alone(model_dir: str, texts: list[str], normalize: bool = True, dims=None) -> np.ndarray:
    """Each text embedded by itself with floe's torch engine in float32 (the reference)."""
    from floe.engine import create_engine

    spec = load_spec(ModelSettings(model=model_dir))
    tok = Tokenizer(spec)
    eng = create_engine(spec, kind="torch", device="cpu", dtype="float32")
    rows = []
    for t in texts:
        ids = tok.encode([t], EncodeOptions()).ids
        v = eng.run(eng.prepare([ids]))[0]
        if dims:
            v = v[:dims]
        if normalize:
            v = v / max(np.linalg.norm(v), 1e-12)
        rows.append(v)
    return np.stack(rows)


def emb(table: pa.Table) -> np.ndarray:
    col = table.column("embedding").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def job(inp, out, model, **kw) -> CorpusJob:
    opts = {k: kw.pop(k) for k in list(kw) if k in CorpusOptions.__dataclass_fields__}
    opts.setdefault("text_column", "body")
    opts.setdefault("shard_rows", 7)
    return CorpusJob(input=str(inp), output=str(out), options=CorpusOptions(**opts), model=model,
                     engine=kw.pop("engine", "torch"), dtype=kw.pop("dtype", "float32"),
                     device="cpu", batch_tokens=kw.pop("batch_tokens", 300), progress=False, **kw)


@pytest.mark.parametrize("fmt", [
    "parquet", pytest.param("jsonl", marks=pytest.mark.full), pytest.param("csv", marks=pytest.mark.full)])
def test_formats_equal_each_text_embedded_alone(tmp_path, tiny_bert, fmt):
    texts = make_texts(30, seed=1)
    inp = write_corpus(tmp_path / f"c.{fmt}", texts, fmt)
    out = tmp_path / "out.parquet"
    res = run(job(inp, out, tiny_bert, id_column="doc"))
    assert res["rows"] == 30 and res["skipped"] == 0
    t = pq.read_table(str(out))
    assert t.column_names == ["id", "embedding"]
    assert t.column("id").to_pylist() == [f"id-{i}" for i in range(30)]
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    np.testing.assert_allclose(emb(t), alone(tiny_bert, texts), atol=2e-5)
    assert not os.path.exists(str(out) + ".parts")  # the work folder is gone once OUTPUT is final


def test_folder_output_two_workers_float16_dimensions(tmp_path, tiny_bert):
    texts = make_texts(25, seed=2)
    inp = write_corpus(tmp_path / "c.jsonl", texts, "jsonl")
    out = tmp_path / "outdir"
    res = run(job(inp, out, tiny_bert, workers=2, threads=2, output_dtype="float16", dimensions=16))
    assert res["rows"] == 25
    t = pq.read_table(str(out))
    assert t.column("id").to_pylist() == list(range(25))   # row numbers without --id-column
    assert t.schema.field("embedding").type == pa.list_(pa.float16(), 16)
    ref = alone(tiny_bert, texts, dims=16).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(emb(t).astype(np.float32), ref, atol=2e-3)
    manifest = json.load(open(out / "_floe_manifest.json"))
    assert manifest["complete"] is True and manifest["written_rows"] == 25


@pytest.mark.full
def test_no_normalize_keeps_the_pooled_vector(tmp_path, tiny_bert):
    texts = make_texts(10, seed=3)
    inp = write_corpus(tmp_path / "c.parquet", texts, "parquet")
    out = tmp_path / "o.parquet"
    run(job(inp, out, tiny_bert, normalize=False))
    np.testing.assert_allclose(emb(pq.read_table(str(out))), alone(tiny_bert, texts, normalize=False),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.full  # the tiny BERT runs equal the engine alone; MiniLM's parity is test_parity.py
def test_minilm_matches_sentence_transformers(tmp_path, minilm_path, st_model):
    texts = make_texts(12, seed=4)
    inp = write_corpus(tmp_path / "c.jsonl", texts, "jsonl")
    out = tmp_path / "o.parquet"
    run(job(inp, out, minilm_path, shard_rows=5, batch_tokens=2048))
    got = emb(pq.read_table(str(out)))
    want = st_model(minilm_path).encode(texts, convert_to_numpy=True)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999, cos.min()


def _bad_corpus(tmp_path) -> str:
    p = tmp_path / "bad.jsonl"
    lines = [json.dumps({"body": f"good {i}", "doc": f"d{i}"}) for i in range(12)]
    lines[4] = json.dumps({"body": None, "doc": "d4"})
    lines[9] = json.dumps({"body": 17, "doc": "d9"})
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`floe embed-corpus ARGS`, in this process (the SIGKILL test starts the real entry point)."""
    return floe_cli("embed-corpus", *args)


def test_bad_rows_fail_by_default_naming_the_row(tmp_path):
    inp = _bad_corpus(tmp_path)
    r = _cli(inp, "-o", str(tmp_path / "o.parquet"), "--text-column", "body", "--id-column", "doc",
             "--engine", "fake", "--shard-rows", "5")
    assert r.returncode == 2, r.stderr
    assert "row 4 (id 'd4'): text is missing or null" in r.stderr
    assert "--on-error skip" in r.stderr
    assert not os.path.exists(tmp_path / "o.parquet")


def test_bad_rows_skipped_and_listed(tmp_path, tiny_bert):
    inp = _bad_corpus(tmp_path)
    out = tmp_path / "o.parquet"
    res = run(job(inp, out, tiny_bert, id_column="doc", on_error="skip", shard_rows=5))
    assert res["rows"] == 10 and res["skipped"] == 2
    t = pq.read_table(str(out))
    assert t.column("id").to_pylist() == [f"d{i}" for i in range(12) if i not in (4, 9)]
    side = [json.loads(x) for x in open(str(out) + ".skipped.jsonl")]
    assert side == [{"row": 4, "id": "d4", "reason": "text is missing or null"},
                    {"row": 9, "id": "d9", "reason": "text is not a string (int)"}]
    good = [f"good {i}" for i in range(12) if i not in (4, 9)]
    np.testing.assert_allclose(emb(t), alone(tiny_bert, good), atol=2e-5)


# --- resume --------------------------------------------------------------------------------------

def kill_job_when(args: list, env: dict, ready) -> None:
    """Starts `floe embed-corpus ARGS`, SIGKILLs it as soon as ``ready()`` is true (within 180 s),
    and fails when the job ended first."""
    proc = subprocess.Popen([sys.executable, "-m", "floe", "embed-corpus", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


FAKE_ARGS = ("--engine", "fake", "--shard-rows", "5", "--batch-tokens", "64", "--text-column", "body")


def _parts(out: str) -> int:
    work = out + ".parts" if out.endswith(".parquet") else out
    if not os.path.isdir(work):
        return 0
    return sum(1 for n in os.listdir(work) if n.startswith("part-"))


@pytest.mark.parametrize("out_name,kill_after", [
    ("o.parquet", 4),
    pytest.param("o.parquet", 0, marks=pytest.mark.full),
    pytest.param("odir", 7, marks=pytest.mark.full)])
def test_resume_after_sigkill_writes_every_row_once_in_order(tmp_path, out_name, kill_after):
    texts = make_texts(60, seed=5)
    inp = write_corpus(tmp_path / "c.jsonl", texts, "jsonl")
    ref = str(tmp_path / "ref.parquet")
    assert _cli(inp, "-o", ref, *FAKE_ARGS).returncode == 0
    out = str(tmp_path / out_name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLOE_FAKE_SECONDS_PER_BATCH="0.15")
    manifest = os.path.join(out + ".parts" if out.endswith(".parquet") else out,
                            "_floe_manifest.json")
    kill_job_when([inp, "-o", out, *FAKE_ARGS], env,
                  lambda: os.path.exists(manifest) and _parts(out) >= kill_after)
    written = _parts(out)
    assert kill_after <= written < 12
    r = _cli(inp, "-o", out, *FAKE_ARGS)
    assert r.returncode == 0, r.stderr
    if written:
        assert "already written" in r.stdout
    got, want = pq.read_table(out), pq.read_table(ref)
    assert got.column("id").to_pylist() == list(range(60))
    np.testing.assert_array_equal(emb(got), emb(want))
    # a third run finds the job complete and changes nothing
    r = _cli(inp, "-o", out, *FAKE_ARGS)
    assert r.returncode == 0 and "already complete" in r.stdout


def test_changed_input_or_options_are_refused(tmp_path):
    inp = write_corpus(tmp_path / "c.jsonl", make_texts(12, seed=6), "jsonl")
    out = str(tmp_path / "odir")
    assert _cli(inp, "-o", out, *FAKE_ARGS).returncode == 0
    r = _cli(inp, "-o", out, *FAKE_ARGS, "--dimensions", "8")
    assert r.returncode == 2 and "options differ" in r.stderr and "dimensions" in r.stderr
    with open(inp, "a") as f:
        f.write(json.dumps({"body": "one more row"}) + "\n")
    r = _cli(inp, "-o", out, *FAKE_ARGS)
    assert r.returncode == 2 and "changed since the output was started" in r.stderr
    assert pq.read_table(out).num_rows == 12  # the finished output is untouched


def test_a_kill_inside_a_shard_keeps_the_rows_committed_within_the_time_bound(tmp_path):
    """--commit-seconds: a shard still computing commits its finished rows as pieces; killed
    mid-shard, the rerun embeds exactly the rows no piece holds, and the output is the same."""
    from floe.corpus.writer import piece_files

    texts = make_texts(60, seed=8)
    inp = write_corpus(tmp_path / "c.jsonl", texts, "jsonl")
    args = ("--engine", "fake", "--shard-rows", "30", "--batch-tokens", "64", "--text-column",
            "body", "--workers", "1")
    ref = str(tmp_path / "ref.parquet")
    assert _cli(inp, "-o", ref, *args).returncode == 0
    out = str(tmp_path / "o.parquet")
    work = out + ".parts"
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLOE_FAKE_SECONDS_PER_BATCH="0.15",
               FLOE_COMMIT_SECONDS="0.5")
    kill_job_when([inp, "-o", out, *args], env, lambda: len(piece_files(work).get(0, [])) >= 2)
    assert _parts(out) == 0, "killed after shard 0 was written: not inside it"
    from floe.corpus.writer import CorpusOutput

    committed = CorpusOutput(out).piece_rows()[0]
    assert 0 < committed < 30
    r = _cli(inp, "-o", out, *args)
    assert r.returncode == 0, r.stderr
    assert f"embedded {60 - committed} rows" in r.stdout, r.stdout
    assert f"resumed: {committed} rows were already written" in r.stdout
    got, want = pq.read_table(out), pq.read_table(ref)
    assert got.column("id").to_pylist() == list(range(60))
    np.testing.assert_array_equal(emb(got), emb(want))
    assert not os.path.exists(work)
