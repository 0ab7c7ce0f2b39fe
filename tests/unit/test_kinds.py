"""Request kinds (floe/kinds/): each kind answers for its own routes, options, rows and head, and
nothing outside floe/kinds branches on a kind's name."""

from __future__ import annotations

import pathlib
import re
from types import SimpleNamespace

import numpy as np
import pytest

from floe.errors import ValidationError
from floe.kinds import KINDS, ROUTE_KINDS, kind_of
from floe.protocol import EncodeOptions, Timings

ROOT = pathlib.Path(__file__).resolve().parents[2] / "floe"


def spec(task: str, **kw):
    base = dict(task=task, name="m", dim=6, normalize=True, max_active_dims=0, num_labels=1,
                score_activation="Sigmoid", splade_pooling="max", splade_activation="relu",
                pooling="mean")
    return SimpleNamespace(**{**base, **kw})


def test_every_kind_is_registered_and_found_from_its_spec():
    assert set(KINDS) == {"embed", "score", "sparse"}
    for name, kind in KINDS.items():
        assert kind_of(spec(name)) is kind and kind.name == name
        assert kind.title and kind.routes and kind.route_kinds
    assert [k.name for k in ROUTE_KINDS["encode"]] == ["embed", "sparse"]
    assert [k.name for k in ROUTE_KINDS["score"]] == ["score"]


def test_request_options_per_kind():
    o = EncodeOptions(normalize=True, dimensions=3, output_dtype="float16")
    assert KINDS["embed"].request_options(o) == o
    scored = KINDS["score"].request_options(o)
    assert (scored.normalize, scored.dimensions, scored.output_dtype) == (False, None, "float32")
    with pytest.raises(ValidationError) as err:
        KINDS["sparse"].request_options(o)
    assert err.value.param == "output_dtype"
    assert KINDS["sparse"].request_options(EncodeOptions(normalize=True)).normalize is False


def test_embed_rows_are_finished_per_request():
    kind, s = KINDS["embed"], spec("embed")
    rows = kind.new_rows(s, 3)
    out = np.arange(18, dtype=np.float32).reshape(3, 6) + 1
    kind.store(s, rows, kind.batch_rows(s, out), 0, 2, 1)   # rows 0-1 of the batch at 1-2
    kind.store(s, rows, kind.batch_rows(s, out), 2, 3, 0)
    res = kind.finish(s, rows, EncodeOptions(dimensions=4), np.array([3, 3, 3]), "r", Timings())
    got = res.as_float32()
    want = np.stack([out[2], out[0], out[1]])[:, :4]
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6)


def test_sparse_rows_keep_the_top_k_nonzeros():
    kind, s = KINDS["sparse"], spec("sparse", dim=8, max_active_dims=2)
    out = np.array([[0, 3, 0, 1, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0, 5, 0]], dtype=np.float32)
    rows = kind.new_rows(s, 2)
    kind.store(s, rows, kind.batch_rows(s, out), 0, 2, 0)
    res = kind.finish(s, rows, EncodeOptions(), np.array([4, 4]), "r", Timings())
    assert res.sparse.counts.tolist() == [2, 1]
    assert res.sparse.indices.tolist() == [1, 4, 6]
    assert res.sparse.values.tolist() == [3.0, 2.0, 5.0]


def test_score_probe_is_absolute_and_embed_probe_is_a_cosine():
    want = np.array([[2.0], [-1.0]], dtype=np.float32)
    assert KINDS["score"].probe_error(want + 1e-4, want, "float32") is None
    assert KINDS["score"].probe_error(-want, want, "float32") is not None
    vecs = np.eye(3, dtype=np.float32)
    assert KINDS["embed"].probe_error(vecs * 2, vecs, "float32") is None   # same direction
    assert KINDS["embed"].probe_error(vecs[::-1], vecs, "bfloat16") is not None


def test_nothing_outside_the_kinds_branches_on_a_kind_name():
    """``task ==`` / ``task !=`` / ``task in`` on a spec appears only in floe/kinds and where a
    folder is read (floe/models): every other layer asks the kind."""
    pattern = re.compile(r"""\.task\s*(==|!=|in\b|not in\b)|\btask\s*==\s*["']""")
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("kinds/", "models/", "proto/")):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
