"""floe's own attention kernel for OpenVINO's CPU plugin (segment_attention.cpp), built on first use.

The kernel computes each input's attention over its own keys only, in bf16 dot products
(AVX-512 BF16), for heads of 32 dimensions: all-MiniLM, BGE-small, e5-small, snowflake-arctic-embed
xs/s and other 384-wide BERTs. OpenVINO's fused attention computes every row's full square of
scores with such heads at a fraction of the matmul peak; where the kernel runs, a padded batch's
attention skips its padding and a packed batch's (floe/engine/packing.py) skips the other inputs
of the row (docs/benchmarks.md, "floe's attention kernel").

``library()`` compiles the source with the machine's C++ compiler against the OpenVINO headers
and library that ship in the openvino wheel, once per source, OpenVINO version and compiler, into
the engine cache (``native/<key>/``); later starts load it, or say why it will not run here: a CPU
without AVX-512 BF16, no compiler, a compiler that failed (recorded beside the cache, so that a
start does not retry a build that fails; delete the ``.failed`` file to retry). The engine then
runs OpenVINO's own attention, as before: the kernel is a speed-up, never a requirement.

``reach()``: on a CPU with AMX, OpenVINO's fused attention runs its products on the tiles and
overtakes the kernel on long inputs, so there the engine keeps both graphs and gives the kernel's
the batches whose longest input is short (docs/benchmarks.md, "floe's attention kernel on AMX").
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from typing import Optional

from floe.engine.hardware import cpu_flags, cpu_has_amx

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "segment_attention.cpp")
LIBRARY = "libfloe_segment_attention.so"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512dq",
         "-mavx512vl", "-mavx512bf16", "-mfma", "-DOV_THREAD=OV_THREAD_TBB")
BUILD_TIMEOUT_S = 120   # well inside a replica's --startup-timeout (300 s)


# The longest input (tokens) of a batch that runs on the kernel on a CPU with AMX, by the graph's
# layout. Measured on an Intel Xeon with AMX, MiniLM bf16, kernel / OpenVINO's AMX attention:
# padded batches (2 threads) 1.28x at 16 tokens, 1.06x at 50, 1.03x at 64, 0.97x at 80, 0.94x
# at 96, 0.90x at 256 (1 thread: 1.03x at 50 and 80, 0.92x at 96); packed batches (1 thread,
# inputs of 8 tokens to the longest) 1.12-1.14x to 96, 1.06x at 128, 1.04x at 192, 0.99x at
# 256: a packed row's attention on OpenVINO spans the whole row, on the kernel each input alone
# (docs/benchmarks.md, "floe's attention kernel on AMX").
AMX_REACH = {"padded": 64, "packed": 192}


def cpu_refusal(flags: Optional[set[str]] = None) -> Optional[str]:
    """Why this CPU does not take the kernel (None: it does)."""
    flags = cpu_flags() if flags is None else flags
    if "avx512_bf16" not in flags:
        return "the CPU has no AVX-512 BF16"
    return None


def reach(flags: Optional[set[str]] = None) -> Optional[dict[str, int]]:
    """The longest input, in tokens, of a batch the kernel runs faster than OpenVINO's attention
    on this CPU, by layout ("padded", "packed"); None: every batch."""
    flags = cpu_flags() if flags is None else flags
    return dict(AMX_REACH) if cpu_has_amx(flags) else None


def describe_reach(longest: Optional[dict[str, int]]) -> str:
    return ("" if longest is None else
            f", batches whose inputs are {longest['padded']} tokens or shorter (packed: "
            f"{longest['packed']}; longer ones: OpenVINO's attention, on AMX)")


def _openvino_paths() -> tuple[str, str, str]:
    """(include dir, libopenvino, libtbb) of the installed openvino wheel."""
    import openvino

    root = os.path.dirname(openvino.__file__)
    libs = os.path.join(root, "libs")

    def one(prefix: str) -> str:
        names = sorted(n for n in os.listdir(libs) if n.startswith(prefix))
        if not names:
            raise FileNotFoundError(f"no {prefix}* in {libs}")
        return os.path.join(libs, names[0])

    return os.path.join(root, "include"), one("libopenvino.so"), one("libtbb.so")


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def build_key(compiler: str) -> str:
    import openvino

    h = hashlib.sha256()
    with open(SOURCE, "rb") as f:
        h.update(f.read())
    # the wheel's own folder too: the library is linked to it by path
    h.update(" ".join((compiler, openvino.__version__, os.path.dirname(openvino.__file__),
                       *FLAGS)).encode())
    return h.hexdigest()[:16]


def library(cache_dir: str) -> tuple[Optional[str], Optional[str]]:
    """(path of the built kernel, None), or (None, why there is none). Builds it on first use,
    under a lock shared by the replicas that start together."""
    from floe.engine.openvino_convert import locked

    why = cpu_refusal()
    if why is not None:
        return None, why
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler (g++) on this machine"
    try:
        key = build_key(compiler)
    except (OSError, ImportError) as exc:
        return None, f"cannot read the kernel's source: {exc}"
    root = os.path.join(cache_dir, "native")
    os.makedirs(root, exist_ok=True)
    folder = os.path.join(root, key)
    path = os.path.join(folder, LIBRARY)
    failed = os.path.join(root, key + ".failed")
    with locked(os.path.join(root, key + ".lock")):
        if os.path.isfile(path):
            return path, None
        if os.path.isfile(failed):
            with open(failed, encoding="utf-8") as f:
                return None, f"its build failed before ({f.read().strip()[:200]}; delete {failed} to retry)"
        try:
            include, openvino_lib, tbb_lib = _openvino_paths()
        except (OSError, ImportError) as exc:
            return None, f"the openvino wheel's headers or libraries are missing: {exc}"
        tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=root)
        command = [compiler, *FLAGS, "-I", include, SOURCE, "-o", os.path.join(tmp, LIBRARY),
                   openvino_lib, tbb_lib, f"-Wl,-rpath,{os.path.dirname(openvino_lib)}"]
        log.info("building floe's attention kernel (first start with this OpenVINO): %s", folder)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if done.returncode != 0:
                message = (done.stderr or done.stdout).strip().splitlines()
                reason = f"{os.path.basename(compiler)} exited {done.returncode}: " + (message[0] if message else "")
                with open(failed, "w", encoding="utf-8") as f:
                    f.write(reason + "\n")
                return None, reason
            os.rename(tmp, folder)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"building it failed: {exc}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path, None


def head_dim(spec) -> Optional[int]:
    """The model's attention head size from its config.json (None where it does not say)."""
    import json

    try:
        with open(os.path.join(spec.backbone_path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def state(spec, dtype: str, cache_dir: Optional[str] = None, enabled: bool = True) -> str:
    """Whether the OpenVINO engine would run ``spec``'s attention on the kernel, for `floe info`
    (the engine decides at start, and checks the rewritten graph before it keeps it)."""
    from floe.engine.hardware import cpu_has_fast_bf16
    from floe.engine.openvino_convert import band_window, default_cache_dir
    from floe.engine.packing import BERT_FAMILIES

    if not enabled:
        return "no: --no-native-attention"
    why = cpu_refusal()
    if why is None and (dtype in ("float32", "int8") or not cpu_has_fast_bf16()):
        why = "the kernel computes in bf16, and this engine does not"
    if why is None and (spec.model_type not in BERT_FAMILIES or band_window(spec) is not None):
        why = f"{spec.model_type} is not a BERT-family encoder"
    if why is None and head_dim(spec) != 32:
        why = f"heads of {head_dim(spec)} dimensions (the kernel takes 32)"
    if why is None and _compiler() is None:
        why = "no C++ compiler (g++) on this machine"
    if why is not None:
        return f"no: {why}"
    root = os.path.join(cache_dir or default_cache_dir(), "native")
    try:
        built = os.path.isfile(os.path.join(root, build_key(_compiler()), LIBRARY))
    except (OSError, ImportError):
        built = False
    return ("yes: floe's kernel" + describe_reach(reach()) + ", "
            + (f"built in {root}" if built else f"built at first start into {root}"))
