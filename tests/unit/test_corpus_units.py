"""floe/corpus pieces without a model: shard plans and reads per format, bad rows, batch planning,
the post step, the manifest checks of the writer."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from floe.corpus.budget import plan_batches
from floe.corpus.embed import embedding_array, post_process
from floe.corpus.reader import CorpusError, open_source
from floe.corpus.writer import CorpusOutput, part_name, write_part, schema_for


def _all_rows(src, shard_rows):
    shards = src.plan(shard_rows)
    texts, ids, bad = [], [], {}
    for s in shards:
        rows = src.read(s)
        assert len(rows.texts) == s.rows == len(rows.ids)
        texts += rows.texts
        ids += rows.ids.to_pylist()
        bad.update({s.start + i: r for i, r in rows.bad.items()})
    return shards, texts, ids, bad


def test_jsonl_shards_cover_rows_in_order_and_flag_bad_rows(tmp_path):
    p = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"t{i}", "k": i}) for i in range(7)]
    lines.insert(3, "")                                  # blank lines are not rows
    lines[5] = json.dumps({"text": None, "k": 99})       # null text
    lines.append("{not json")                            # invalid JSON
    lines.append(json.dumps({"text": 5, "k": 100}))      # not a string
    lines.append(json.dumps(["a list"]))                 # not an object
    p.write_text("\n".join(lines) + "\n")
    src = open_source(str(p), "text", "k")
    shards, texts, ids, bad = _all_rows(src, 3)
    assert [s.start for s in shards] == [0, 3, 6, 9]
    assert len(texts) == 10
    assert texts[:4] == ["t0", "t1", "t2", "t3"]
    assert bad[4] == "text is missing or null"
    assert "invalid JSON" in bad[7]
    assert bad[8] == "text is not a string (int)"
    assert "not an object" in bad[9]
    assert ids[:4] == [0, 1, 2, 3] and ids[4] == 99
    assert src.id_type == pa.int64()


def test_jsonl_default_ids_are_row_numbers(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": f"x{i}"}) + "\n" for i in range(5)))
    _, texts, ids, bad = _all_rows(open_source(str(p)), 2)
    assert ids == [0, 1, 2, 3, 4] and not bad and texts[4] == "x4"


def test_csv_quoted_newlines_and_short_records(tmp_path):
    p = tmp_path / "c.csv"
    p.write_bytes(b'id,text\r\n'
                  b'a,"first, with comma"\r\n'
                  b'b,"spans\ntwo lines ""quoted"""\r\n'
                  b'\r\n'
                  b'c\r\n'
                  b'd,last\r\n')
    src = open_source(str(p), "text", "id")
    shards, texts, ids, bad = _all_rows(src, 2)
    assert len(shards) == 2
    assert texts == ["first, with comma", 'spans\ntwo lines "quoted"', None, "last"]
    assert ids == ["a", "b", "c", "d"]
    assert 2 in bad and "fields" in bad[2]


def test_csv_missing_column_is_refused(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("body\nhello\n")
    with pytest.raises(CorpusError, match="no column 'text'"):
        open_source(str(p))


def test_parquet_folder_pieces_span_files_and_row_groups(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    n = 0
    for f, rows in enumerate([5, 0, 7, 3]):
        t = pa.table({"text": [f"r{n + i}" if (n + i) != 6 else None for i in range(rows)],
                      "doc": [f"d{n + i}" for i in range(rows)]})
        pq.write_table(t, d / f"part-{f}.parquet", row_group_size=2)
        n += rows
    (d / "_ignored.parquet").write_bytes(b"not parquet")
    src = open_source(str(d), "text", "doc")
    shards, texts, ids, bad = _all_rows(src, 4)
    assert len(texts) == 15 and [s.rows for s in shards] == [4, 4, 4, 3]
    assert ids == [f"d{i}" for i in range(15)]
    assert texts[5] == "r5" and texts[6] is None and bad == {6: "text is missing or null"}


def test_empty_input_has_one_empty_shard(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("")
    shards = open_source(str(p)).plan(10)
    assert [(s.start, s.end) for s in shards] == [(0, 0)]


def test_plan_batches_budget_size_and_cover():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=500)
    batches = plan_batches(lengths, max_tokens=1024, max_size=16)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(500))
    for b in batches:
        assert len(b) <= 16
        assert len(b) == 1 or len(b) * lengths[b].max() <= 1024
    # sorted by length: consecutive batches do not overlap in length
    for a, b in zip(batches, batches[1:]):
        assert lengths[a].max() <= lengths[b].min()
    assert [len(b) for b in plan_batches(np.array([5000, 3]), 100, 8)] == [1, 1]


def test_post_process_matches_sentence_transformers_rules():
    arr = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    out = post_process(arr, normalize=True, dimensions=2)
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    assert np.all(out[1] == 0)  # zero vector stays zero (eps), no NaN
    raw = post_process(arr, normalize=False, dimensions=None)
    np.testing.assert_array_equal(raw, arr)
    half = embedding_array(out, "float16")
    assert half.type == pa.list_(pa.float16(), 2)


def _manifest(rows=4, shards=2, **opt):
    options = {"text_column": "text", "output_dtype": "float32", "on_error": "fail"}
    options.update(opt)
    return {"floe_corpus": 1, "input": {"path": "/in", "files": [{"path": "/in", "size": 1,
                                                                   "mtime_ns": 1}]},
            "model": {"name": "m", "sha256": "ab"}, "options": options, "shards": shards,
            "rows": rows, "id_type": "int64", "dim": 3}


def _shard_table(ids):
    arr = np.ones((len(ids), 3), dtype=np.float32)
    return pa.table({"id": pa.array(ids, pa.int64()), "embedding": embedding_array(arr, "float32")})


@pytest.mark.parametrize("name", ["out", "out.parquet"])
def test_writer_commits_finalizes_and_refuses_other_jobs(tmp_path, name):
    out = CorpusOutput(str(tmp_path / name))
    m = _manifest()
    assert out.open(m) == set()
    out.write_shard(1, _shard_table([2, 3]), [])
    # a temporary file left by a killed writer is ignored by readers and cleaned on reopen
    stale = os.path.join(out.work, "." + part_name(0) + ".tmp-1-abc")
    open(stale, "wb").write(b"partial")
    out2 = CorpusOutput(str(tmp_path / name))
    assert out2.open(m) == {1} and not os.path.exists(stale)
    with pytest.raises(CorpusError, match="not written yet"):
        out2.finalize()
    out2.write_shard(0, _shard_table([0]), [{"row": 1, "id": 1, "reason": "text is missing or null"}])
    summary = out2.finalize()
    assert summary == {"rows": 3, "skipped": 1}
    t = pq.read_table(str(tmp_path / name))
    assert t.column("id").to_pylist() == [0, 2, 3]
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 3)
    side = out2.skipped_path
    assert [json.loads(x)["row"] for x in open(side)] == [1]
    assert CorpusOutput(str(tmp_path / name)).finished(m)
    changed = _manifest(dimensions=2)
    with pytest.raises(CorpusError, match="options differ .*dimensions"):
        CorpusOutput(str(tmp_path / name)).finished(changed)
    other_input = _manifest()
    other_input["input"]["files"][0]["size"] = 2
    with pytest.raises(CorpusError, match="changed since the output was started"):
        CorpusOutput(str(tmp_path / name)).finished(other_input)


def test_writer_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "data.txt").write_text("x")
    with pytest.raises(CorpusError, match="not a floe embed-corpus output"):
        CorpusOutput(str(tmp_path / "out")).open(_manifest())


def test_write_part_is_idempotent_per_shard(tmp_path):
    m = _manifest()
    schema = schema_for(m)
    write_part(str(tmp_path), 0, _shard_table([0, 1]), [], schema)
    write_part(str(tmp_path), 0, _shard_table([0, 1]), [], schema)
    assert sorted(os.listdir(tmp_path)) == [part_name(0)]
    assert pq.read_table(str(tmp_path)).num_rows == 2


def test_progress_steady_rate_excludes_what_came_before_the_first_shard(monkeypatch):
    import io

    from floe.corpus import progress as progress_mod

    now = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    p = progress_mod.Progress(total_rows=300, done_rows=0, enabled=False, stream=io.StringIO())
    now[0] = 160.0                 # 60 s of start-up before the first shard is written
    p.update(100, 1000)
    assert p.steady_rows_per_s() is None and "after the first shard" not in p.summary("o", 100, 0, 60)
    now[0] = 170.0
    p.update(100, 1000)
    now[0] = 180.0
    p.update(100, 1000)
    assert p.steady_rows_per_s() == pytest.approx(10.0)     # 200 rows in the 20 s after the first
    line = p.summary("o.parquet", 300, 0, 80.0)
    assert "embedded 300 rows in 80.0 s" in line and "10.0 rows/s after the first shard" in line


def _status(shard, node, rows, started, ended):
    return {"shard": shard, "node": node, "rows": rows, "started_at": started, "ended_at": ended,
            "ready_at": 10.0, "init_s": 1.0, "process_at": 0.0, "imported_at": 8.5}


def test_ray_profile_gives_each_nodes_rate_and_the_end_tail():
    from floe.corpus.progress import fixed_cost, node_rates

    # node a: 3 shards of 100 rows from t=12 to t=42 (10 rows/s); node b: 2 shards from t=13
    # (its actor ready 1 s later) to t=33, then idle while a ends its last (the tail: 9 s)
    statuses = [_status(0, "a", 100, 12, 22), _status(1, "a", 100, 22, 32),
                _status(2, "a", 100, 32, 42), _status(3, "b", 100, 13, 22),
                _status(4, "b", 100, 22, 33)]
    assert node_rates(statuses) == "node rates a 10.0, b 10.0 rows/s, together 20.0 rows/s"
    line = fixed_cost(statuses, t_start=5.0, t_connected=6.0)
    assert "connect 1.0 s" in line and "7.0 s into the job (the last node's 8.0 s)" in line
    assert "5 shard(s) on 2 node(s), the last ending 9.0 s after the first node's last" in line
    assert line.endswith("together 20.0 rows/s")
    # a resumed shard (no new rows) counts in the span, not in the rows
    assert node_rates([_status(0, "a", 0, 0, 5), _status(1, "a", 50, 5, 10)]).endswith(
        "together 5.0 rows/s")
