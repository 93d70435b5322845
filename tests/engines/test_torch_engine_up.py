"""`hpcserve up` with engine kind torch: agents, redis, a torch prefill and decode, the router, end to end."""

from __future__ import annotations

import httpx
import pytest

torch = pytest.importorskip("torch")

from proc_util import demo_overrides  # noqa: E402

from hpcserve.api import up  # noqa: E402
from hpcserve.torchengine.model import TinyConfig, TinyLlama  # noqa: E402
from hpcserve.torchengine.sampling import generate  # noqa: E402

RECIPE = """\
name: torch-pd
model: {path: random, served_name: tiny}
engine: {kind: torch}
cluster: {backend: local, gpus_per_node: 0, address: 127.0.0.1}
prefill: {replicas: 1, tp: 1}
decode: {replicas: 1, tp: 1}
router: {port: 8000}
"""


def test_up_with_torch_engine_pd_matches_the_oracle(tmp_path):
    torch.set_num_threads(1)
    recipe = tmp_path / "torch-pd.yaml"
    recipe.write_text(RECIPE)
    run, backend = up(recipe, demo_overrides(), run_dir=tmp_path / "run")
    try:
        oracle = TinyLlama.random(TinyConfig(), seed=0)     # --model-path random with default --torch-* sizes
        url = run.endpoint["url"]
        for text in ("The quick brown fox", "hello", "PD on a laptop"):
            r = httpx.post(url + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": 10,
                                                                                       "temperature": 0}}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["output_ids"] == generate(oracle, [b + 3 for b in text.encode()], 10)
    finally:
        backend.stop()
