"""GPU paths: fp16/bf16 parity on CUDA and several replicas sharing one GPU.

Skipped where no CUDA device is visible (the CPU build machine); run on a GPU machine with
`bash scripts/test.sh tests/gpu`.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TEXTS = ["hello", "The quick brown fox jumps over the lazy dog.", "word " * 300]


def reference(path: str) -> np.ndarray:
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(path, device="cpu").encode(TEXTS, normalize_embeddings=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cuda_engine_matches_sentence_transformers(minilm_path, dtype):
    from floe.config import ModelSettings
    from floe.engine.torch_engine import TorchEngine
    from floe.models import load_spec
    from floe.protocol import EncodeOptions
    from floe.tokenize import Tokenizer

    spec = load_spec(ModelSettings(model=minilm_path))
    engine = TorchEngine(spec, device="cuda", dtype=dtype)
    batch = Tokenizer(spec).encode(TEXTS, EncodeOptions())
    out = engine.run(engine.prepare([batch.item(i) for i in range(batch.n)]))
    out = out / np.linalg.norm(out, axis=1, keepdims=True)
    cos = (out * reference(minilm_path)).sum(axis=1)
    assert cos.min() >= (0.99999 if dtype == "float32" else 0.999), cos
    used, total = engine.memory()
    assert 0 < used <= total


def test_two_replicas_share_one_gpu(tmp_path):
    import httpx

    from tests.support import floe_serve

    with floe_serve("--device", "cuda", "--num-replicas", "2", "--gpu-assignment", "shared",
                    "--num-gpus", "1", tmp_dir=str(tmp_path)) as server:
        info = httpx.get(server.url + "/info").json()
        assert info["replicas"]["healthy_replicas"] == 2
        assert all(r["cuda_visible_devices"] == "0" for r in info["replicas"]["replicas"])
        r = httpx.post(server.url + "/v1/embeddings", json={"input": TEXTS}, timeout=60)
        assert r.status_code == 200
        metrics = httpx.get(server.url + "/metrics").text
        assert "floe_replica_device_memory_used_bytes" in metrics
