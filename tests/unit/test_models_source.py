"""resolve_model_path: the embedded default, local folders, and fast failure for hub ids offline."""

from __future__ import annotations

import os
import socket
import time

import pytest

from floe.errors import ModelLoadError
from floe.models import resolve_model_path
from floe.models.source import looks_like_path


def test_default_is_the_embedded_minilm():
    path = resolve_model_path("default")
    assert os.path.isfile(os.path.join(path, "modules.json"))
    assert os.path.isfile(os.path.join(path, "model.safetensors"))


def test_local_folder_resolves_to_itself(tmp_path, monkeypatch):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(tmp_path.parent)
    assert resolve_model_path(os.path.join(".", tmp_path.name)) == str(tmp_path)


@pytest.mark.parametrize("missing", ["/no/such/model", "./missing-model", "a/b/c"])
def test_missing_path_is_no_such_folder(missing):
    with pytest.raises(ModelLoadError, match="no such folder"):
        resolve_model_path(missing)


def test_a_file_is_not_a_model_folder(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a folder"):
        resolve_model_path(str(f))


@pytest.mark.parametrize("model,is_path", [
    ("org/name", False), ("name", False), ("/abs/x", True), ("./x", True), ("../x", True),
    ("~/x", True), ("a/b/c", True)])
def test_looks_like_path(model, is_path):
    assert looks_like_path(model) is is_path


def test_invalid_hub_id_is_refused():
    with pytest.raises(ModelLoadError, match="neither a local folder nor a valid hub id"):
        resolve_model_path("not a--valid id")


def test_hub_id_fails_fast_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="hub cannot be reached.*pass a local path"):
        resolve_model_path("sentence-transformers/some-model-not-cached")
    assert time.monotonic() - t0 < 10


def test_hub_id_fails_fast_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    # A loopback port with nothing listening stands in for an unreachable hub.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="no network"):
        resolve_model_path("org/model-not-cached")
    assert time.monotonic() - t0 < 10
