"""Real prose that every install has offline: paragraphs of the Python standard library's docstrings.

No dataset can be downloaded where floe is built and tested, yet benchmarks want real text (not
random words) and the int8 calibration and its quality check want text the model can embed.
The standard library's docstrings are English prose with code words mixed in, about 10,000
distinct paragraphs of 1-256 words (median 11, a long tail), and they come with Python.

The modules are imported in a child process (``python -m floe.textsets``), so the caller's
process is not left holding hundreds of stdlib modules and whatever they set up on import.
The order is deterministic for a given Python version.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import re
import subprocess
import sys
import warnings

# Modules that open windows, print on import, or hold test data rather than prose.
_SKIP = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test",
                   "lib2to3", "ensurepip", "venv", "pydoc_data"})
_MIN_CHARS = 20


def _quiet_import(name: str):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - a module that cannot import here has no prose for us
        return None


def _collect() -> list[str]:
    """Runs in the child: every distinct docstring paragraph, in a fixed order."""
    warnings.filterwarnings("ignore")
    names = sorted(n for n in sys.stdlib_module_names if n not in _SKIP and not n.startswith("_"))
    modules = []
    for name in names:
        mod = _quiet_import(name)
        if mod is None:
            continue
        modules.append(mod)
        for sub in sorted(m.name for m in pkgutil.iter_modules(getattr(mod, "__path__", []), name + ".")):
            if ".test" in sub or sub.rsplit(".", 1)[-1].startswith("_"):
                continue
            submod = _quiet_import(sub)
            if submod is not None:
                modules.append(submod)
    seen: set[str] = set()
    out: list[str] = []

    def add(doc) -> None:
        if not isinstance(doc, str):
            return
        for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
            para = " ".join(para.split())
            if len(para) >= _MIN_CHARS and para not in seen:
                seen.add(para)
                out.append(para)

    for mod in modules:
        add(mod.__doc__)
        members = vars(mod)
        for attr in sorted(members):
            obj = members[attr]
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            add(getattr(obj, "__doc__", None))
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    if not meth.startswith("_"):
                        add(getattr(vars(obj)[meth], "__doc__", None))
    return out


def stdlib_paragraphs(limit: int | None = None) -> list[str]:
    """The standard library's docstring paragraphs (about 10,000), first ``limit`` of them."""
    r = subprocess.run([sys.executable, "-m", "floe.textsets"], capture_output=True, check=True,
                       timeout=300)
    paras = json.loads(r.stdout)
    return paras if limit is None else paras[:limit]


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_collect()))
