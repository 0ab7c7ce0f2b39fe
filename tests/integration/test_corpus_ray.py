"""floe on Ray: `floe embed-corpus --ray` (a pool of embedding actors) and the Ray Serve deployment.

Ray listens on all interfaces, so these tests run a local Ray cluster inside a fresh network
namespace that has only loopback: ``test_ray_in_loopback_namespace`` re-runs this file's ``inner``
tests under ``unshare --net`` (with ``lo`` up) and asserts they pass. Where Ray is not installed
or a namespace cannot be made, it skips and says why.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

IN_NETNS = os.environ.get("FLOE_TEST_LOOPBACK_NETNS") == "1"
inner = pytest.mark.skipif(
    not IN_NETNS, reason="runs inside the loopback-only network namespace that "
                         "test_ray_in_loopback_namespace starts")


def _netns_problem() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return 'Ray is not installed (pip install "floe[ray]")'
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip (util-linux, iproute2) is missing: cannot isolate Ray on loopback"
    probe = subprocess.run(["unshare", "--net", "sh", "-c", "ip link set lo up && ip -o link"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create a network namespace here ({probe.stderr.strip()[:200]})"
    if any("lo" not in line.split(":")[1] for line in probe.stdout.strip().splitlines()):
        return "the new network namespace has interfaces other than loopback"
    return None


@pytest.mark.slow
@pytest.mark.full
def test_ray_in_loopback_namespace():
    if IN_NETNS:
        pytest.skip("this is the launcher; it runs outside the namespace")
    problem = _netns_problem()
    if problem:
        pytest.skip(problem)
    env = dict(os.environ, FLOE_TEST_LOOPBACK_NETNS="1", HF_HUB_OFFLINE="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               # a busy 2-core machine can take minutes to start Ray's agent processes
               RAY_agent_register_timeout_ms="600000", RAY_raylet_start_wait_time_s="600",
               # Serve kills an HTTP proxy that is not ready within 3 checks of 5 s; a 2-core
               # machine busy starting Ray's other processes can need longer
               RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S="60",
               RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S="60")
    cmd = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
           sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-x", __file__,
           "-k", "inner"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env,
                           cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                               os.path.abspath(__file__)))), start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        # a 2-core machine that cannot even start Ray's processes in 25 minutes is the
        # environment, not floe; once the cluster was up, a run that does not end is a failure
        if "RAY_STARTED" not in out:
            pytest.skip(f"a local Ray cluster did not start within 1500 s on this machine: {out[-300:]}")
        pytest.fail(f"the Ray tests did not finish within 1500 s after the cluster started: {out[-3000:]}")
    if "RAY_DID_NOT_START" in r.stdout and "passed" not in r.stdout:
        # the machine could not start Ray's processes in time (a busy 2-core machine): that is
        # the environment, not floe; the inner tests said why
        pytest.skip("a local Ray cluster could not start in the namespace: "
                    + r.stdout.split("RAY_DID_NOT_START", 1)[1][:300])
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    # every inner test ran and passed (counted from this file, so a new one is not forgotten)
    inner = sum(1 for line in open(__file__) if line.startswith("def test_inner_"))
    assert f"{inner} passed" in r.stdout, r.stdout[-3000:]


# --- inside the namespace -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    except Exception as exc:  # noqa: BLE001 - reported to the launcher, which skips
        print(f"RAY_DID_NOT_START {type(exc).__name__}: {str(exc)[:200]}")
        pytest.skip(f"a local Ray cluster could not start: {exc}")
    print("RAY_STARTED", flush=True)
    yield ray
    ray.shutdown()


def _corpus(tmp_path, n=23):
    from tests.integration.test_corpus import make_texts, write_corpus

    return write_corpus(tmp_path / "c.jsonl", make_texts(n, seed=7), "jsonl"), n


@inner
def test_inner_ray_data_equals_local(ray_cluster, tmp_path, tiny_bert):
    from floe.corpus.job import run
    from tests.integration.test_corpus import emb, job

    inp, n = _corpus(tmp_path)
    local = run(job(inp, tmp_path / "local.parquet", tiny_bert, id_column="doc", shard_rows=6))
    assert local["rows"] == n
    res = run(job(inp, tmp_path / "ray.parquet", tiny_bert, id_column="doc", shard_rows=6, ray="auto"))
    assert res["rows"] == n
    a, b = pq.read_table(str(tmp_path / "local.parquet")), pq.read_table(str(tmp_path / "ray.parquet"))
    assert b.column("id").to_pylist() == a.column("id").to_pylist() == [f"id-{i}" for i in range(n)]
    np.testing.assert_allclose(emb(b), emb(a), atol=1e-5)


@inner
def test_inner_ray_chunked_late_equals_local(ray_cluster, tmp_path, tiny_bert):
    """--chunk-tokens with --late-chunking on Ray: the same rows (id, chunk, offsets) and
    vectors as the local job."""
    from floe.corpus.job import run
    from tests.integration.test_corpus import emb, job, write_corpus
    from tests.integration.test_corpus_chunking import documents

    inp = write_corpus(tmp_path / "d.jsonl", documents(14), "jsonl")
    kw = dict(id_column="doc", shard_rows=5, chunk_tokens=24, chunk_overlap=4, late_chunking=True)
    run(job(inp, tmp_path / "local.parquet", tiny_bert, **kw))
    run(job(inp, tmp_path / "ray.parquet", tiny_bert, ray="auto", **kw))
    a, b = pq.read_table(str(tmp_path / "local.parquet")), pq.read_table(str(tmp_path / "ray.parquet"))
    for name in ("id", "chunk", "start", "end"):
        assert b.column(name).to_pylist() == a.column(name).to_pylist()
    assert a.num_rows > 14
    np.testing.assert_allclose(emb(b), emb(a), atol=1e-5)


@inner
def test_inner_ray_data_resumes_a_local_job_and_skips_bad_rows(ray_cluster, tmp_path, tiny_bert):
    from floe.corpus.job import prepare, run
    from floe.corpus.writer import part_name
    from tests.integration.test_corpus import emb, job

    inp, n = _corpus(tmp_path)
    lines = open(inp).read().splitlines()
    lines[3] = json.dumps({"body": None, "doc": "id-3"})
    open(inp, "w").write("\n".join(lines) + "\n")
    ref = run(job(inp, tmp_path / "ref", tiny_bert, id_column="doc", shard_rows=6, on_error="skip"))
    assert ref["skipped"] == 1
    # a job whose shards 0 and 2 were written before it died: copy them from the reference
    out = tmp_path / "out"
    j = job(inp, out, tiny_bert, id_column="doc", shard_rows=6, on_error="skip", ray="auto")
    prepare(j)  # writes the manifest
    for i in (0, 2):
        shutil.copy(tmp_path / "ref" / part_name(i), out / part_name(i))
    res = run(j)
    assert res["rows"] == n - 1 and res["skipped"] == 1 and res["new_rows"] == n - 12
    got, want = pq.read_table(str(out)), pq.read_table(str(tmp_path / "ref"))
    assert got.column("id").to_pylist() == want.column("id").to_pylist()
    np.testing.assert_allclose(emb(got), emb(want), atol=1e-5)
    assert [json.loads(x)["row"] for x in open(out / "_skipped.jsonl")] == [3]


@inner
def test_inner_ray_serve_answers_openai_embeddings(ray_cluster, tiny_bert):
    import httpx
    from ray import serve

    from floe.ray.serve import build_app
    from tests.integration.test_corpus import alone
    from tests.support import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"model": tiny_bert, "engine": "torch", "dtype": "float32",
                             "device": "cpu", "threads": 1}), name="floe", route_prefix="/")
        texts = ["hello ray serve", "a second, longer input about vectors and shards"]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            r = c.post("/v1/embeddings", json={"input": texts, "model": os.path.basename(tiny_bert)})
            assert r.status_code == 200, r.text
            body = r.json()
            got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
            np.testing.assert_allclose(got, alone(tiny_bert, texts), atol=2e-5)
            assert body["usage"]["prompt_tokens"] > 0
            # base64 (the openai client's default) carries the same float32 bytes
            b64 = c.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
            raw = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                            for d in b64.json()["data"]])
            np.testing.assert_array_equal(raw, got)
            # token ids are accepted as floe serve accepts them
            ids = c.post("/v1/embeddings", json={"input": [[101, 7592, 102]]})
            assert ids.status_code == 200 and len(ids.json()["data"]) == 1
            # the request contract of floe serve, checked by the same code
            bad = c.post("/v1/embeddings", json={"input": "x", "dimensions": 999})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "dimensions"
            assert c.post("/v1/embeddings", json={"input": []}).status_code == 400
            assert c.post("/v1/embeddings", content=b"{not json").status_code == 400
            assert c.post("/v1/embeddings", json={"input": [1.5]}).json()["error"]["param"] == "input[0]"
            many = c.post("/v1/embeddings", json={"input": ["a"] * 5000})
            assert many.status_code == 413 and many.json()["error"]["param"] == "input"
            huge = c.post("/v1/embeddings", content=b'{"input": "' + b"x" * 17_000_000 + b'"}')
            assert huge.status_code == 413
            assert c.post("/v1/embeddings", content=b"{}", headers={
                "content-type": "text/plain"}).status_code == 415
            # and it still serves
            assert c.get("/health").status_code == 200
            assert c.get("/v1/models").json()["data"][0]["id"]
            again = c.post("/v1/embeddings", json={"input": texts[:1]})
            assert again.status_code == 200
    finally:
        serve.shutdown()
