"""Helpers of the control API and `hpcserve top` tests: a PD deployment (one prefill, two decode workers of
the mock engine) with a bearer key, a streaming load that records every answer, the router's metrics."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

KEY_ENV, KEY = "HPCSERVE_TEST_CONTROL_KEY", "test-control-key-123"


def write_recipe(tmp_path: Path, mock: dict | None = None, decode: int = 2) -> Path:
    p = tmp_path / "control.yaml"   # ports: the deployment fixture picks a free block
    p.write_text(f"""\
name: control-demo
model: {{path: demo/tiny-model, served_name: demo}}
engine: {{kind: mock, mock: {json.dumps(mock or {"time-scale": 0})}}}
cluster: {{backend: local, gpus_per_node: 0, address: 127.0.0.1, time: "01:00:00"}}
prefill: {{replicas: 1, tp: 1}}
decode: {{replicas: {decode}, tp: 1}}
router: {{api_key_env: {KEY_ENV}}}
timeouts: {{startup: 60}}
""")
    return p


class Deployment:
    """A running deployment's addresses: the control API, the router, the run dir."""

    def __init__(self, run) -> None:
        self.run_dir = Path(run.run_dir)
        plan = json.loads((self.run_dir / "plan.json").read_text())
        endpoint = json.loads((self.run_dir / "endpoint.json").read_text())
        self.router = endpoint["url"]
        self.control = f"http://{endpoint['host']}:{plan['control_port']}"
        self.headers = {"Authorization": f"Bearer {KEY}"}
        self.redis_url = json.loads((self.run_dir / "redis.json").read_text())["url"]
        self.run_id = endpoint["run_id"]

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.control + path, headers=self.headers, timeout=30, **kw)

    def send(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(method, self.control + path, headers=self.headers, timeout=150, **kw)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """The router's /metrics as {(sample name, sorted labels): value}."""
        text = httpx.get(self.router + "/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def worker_value(self, name: str, worker: str) -> float | None:
        for (n, labels), v in self.metrics().items():
            if n == name and dict(labels).get("worker") == worker:
                return v
        return None


def start(deployment, tmp_path: Path, monkeypatch, mock: dict | None = None, decode: int = 2) -> tuple:
    monkeypatch.setenv(KEY_ENV, KEY)   # the agents (and so the router and control API) inherit it
    run, backend = deployment(write_recipe(tmp_path, mock, decode))
    d = Deployment(run)
    # the run is ready when its workers and router are; the control API may need a moment more (imports)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(d.control + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"control API {d.control} not answering after 30 s"
        time.sleep(0.1)
    return d, backend


class Load:
    """``clients`` threads sending streamed completions to the router until stopped; every answer is kept as
    (status, complete) where complete means the stream ended with [DONE]."""

    def __init__(self, router: str, clients: int = 4, max_tokens: int = 12) -> None:
        self.router, self.max_tokens = router, max_tokens
        self.results: list[tuple[int, bool]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _loop(self, i: int) -> None:
        body = {"model": "demo", "prompt": f"client {i} says hello", "max_tokens": self.max_tokens, "stream": True}
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
            while not self.stop.is_set():
                try:
                    with c.stream("POST", self.router + "/v1/completions", json=body) as r:
                        text = "".join(r.iter_text())
                        done = r.status_code == 200 and "data: [DONE]" in text and '"error"' not in text
                        result = (r.status_code, done)
                except httpx.HTTPError as err:
                    result = (0, False)
                    print("load error:", err)
                with self.lock:
                    self.results.append(result)

    def count(self) -> int:
        with self.lock:
            return len(self.results)
