"""scripts/pip_sources.py: pip's configured sources become the same uv flags, each once."""

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "pip_sources.py")
_spec = importlib.util.spec_from_file_location("pip_sources", _PATH)
pip_sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pip_sources)


def test_indexes_and_find_links_become_uv_flags_once():
    listing = "\n".join([
        "global.cert='/etc/ssl/cert.pem'",
        "global.index-url='https://mirror.example/simple'",
        "global.extra-index-url='file:///srv/a/simple file:///srv/b/simple'",
        "global.find-links='/srv/wheels'",
        ":env:.find-links='/srv/wheels'",          # the same source from PIP_FIND_LINKS
        ":env:.default-timeout='180'",
    ])
    assert pip_sources.uv_flags(listing) == [
        "--index-url", "https://mirror.example/simple",
        "--extra-index-url", "file:///srv/a/simple",
        "--extra-index-url", "file:///srv/b/simple",
        "--find-links", "/srv/wheels",
    ]


def test_no_configured_source_gives_no_flag():
    assert pip_sources.uv_flags("global.cert='/etc/ssl/cert.pem'\n") == []
    assert pip_sources.uv_flags("") == []
