"""Helpers for chaos tests: recipes for small local deployments, finding their processes in /proc, reading
the registry, and bounded load loops that record what a user would have seen."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from hpcserve import registry

GEN_BODY = {"text": "The quick brown fox", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}


def write_recipe(tmp_path: Path, *, prefill: int = 1, decode: int = 1, decode_critical: bool = False,
                 router_args: tuple[str, ...] = (), mock: dict | None = None, aggregated: int = 0,
                 redis_url: str | None = None) -> Path:
    """A PD recipe on mock engines; with gpus_per_node 0 every replica gets its own node (agent).
    ``mock``: the mock engine's timing options (default instant); ``aggregated``: that many aggregated
    workers instead of PD; ``redis_url``: an external Redis instead of the run's own."""
    crit = ", critical: true" if decode_critical else ""
    args = json.dumps(list(router_args))
    mock_opts = json.dumps(mock or {"time-scale": 0})
    groups = (f"workers: {{replicas: {aggregated}}}\n" if aggregated else
              f"prefill: {{replicas: {prefill}}}\ndecode: {{replicas: {decode}{crit}}}\n")
    if redis_url:
        groups += f"redis: {{url: {json.dumps(redis_url)}}}\n"
    p = tmp_path / "chaos.yaml"
    p.write_text(f"""\
name: chaos
model: {{path: demo/tiny, served_name: demo}}
engine: {{kind: mock, mock: {mock_opts}}}
cluster: {{backend: local, gpus_per_node: 0, address: 127.0.0.1}}
router: {{args: {args}}}
{groups}""")
    return p


def cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def find_pids(roots: list[int], *needles: bytes) -> list[int]:
    """Live descendants of ``roots`` whose command line contains every needle."""
    from proc_util import descendants, pids_alive
    found = []
    for root in roots:
        for pid in descendants(root):
            cmd = b"\0".join(cmdline(pid))
            if all(n in cmd for n in needles):
                found.append(pid)
    return pids_alive(found)


def one_pid(backend, *needles: bytes) -> int:
    pids = find_pids([p.pid for p in backend.procs], *needles)
    assert len(pids) == 1, f"expected one process with {needles}, found {pids}"
    return pids[0]


def plan_workers(run) -> dict[str, dict]:
    return {w["id"]: w for w in json.loads((run.run_dir / "plan.json").read_text())["workers"]}


def engine_pid(backend, port: int) -> int:
    return one_pid(backend, b"hpcserve.mock", b"--port\0" + str(port).encode() + b"\0")


def redis_client(run, url: str | None = None) -> redis.Redis:
    url = url or json.loads((run.run_dir / "redis.json").read_text())["url"]
    return redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=2)


def registry_view(run, url: str | None = None) -> dict[str, registry.WorkerRecord] | None:
    """The registry as readers see it (expired heartbeat -> dead); None while Redis does not answer.
    ``url``: the Redis to read (default: the run's own, from redis.json)."""
    r = redis_client(run, url)
    try:
        raw = r.hgetall(registry.workers_key(run.run_dir.name))
        recs = {k.decode(): registry.WorkerRecord.from_json(v) for k, v in raw.items()}
        if recs:
            hbs = r.mget([registry.heartbeat_key(run.run_dir.name, w) for w in recs])
            for (wid, rec), hb in zip(list(recs.items()), hbs):
                if hb is None:
                    recs[wid] = rec.model_copy(update={"state": "dead"})
        return recs
    except redis.RedisError:
        return None
    finally:
        r.close()


def router_workers(url: str) -> list[dict] | None:
    try:
        return httpx.get(url + "/workers", timeout=3).json()["workers"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def healthy_by_port(url: str, port: int) -> bool | None:
    """The router's view of the worker on ``port``: healthy True/False, None when not listed."""
    for w in router_workers(url) or []:
        if w["url"].endswith(f":{port}"):
            return bool(w["healthy"])
    return None


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | None          # None: transport error (connection refused, timeout)
    detail: str = ""            # the error body, or the generated text of a 200


@dataclass
class Load:
    """A background loop of non-streaming /generate requests: bounded in count and time."""

    url: str
    max_requests: int = 2000
    max_seconds: float = 30.0
    body: dict = field(default_factory=lambda: dict(GEN_BODY))
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with httpx.Client(timeout=httpx.Timeout(10.0, connect=3.0)) as c:
            for _ in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                t0 = time.monotonic()
                try:
                    r = c.post(self.url + "/generate", json=self.body)
                    detail = r.json().get("text", "") if r.status_code == 200 else r.text[:300]
                    o = Outcome(t0, time.monotonic(), r.status_code, detail)
                except httpx.HTTPError as e:
                    o = Outcome(t0, time.monotonic(), None, f"{type(e).__name__}: {e}")
                self.outcomes.append(o)
                time.sleep(0.005)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(20)
        assert not self._thread.is_alive(), "load loop did not end"

    def count(self) -> int:
        return len(self.outcomes)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]

    def texts(self) -> set[str]:
        """The distinct texts of the successful answers (the body is fixed, so one is expected)."""
        return {o.detail for o in self.outcomes if o.status == 200}


def sse_read(url: str, path: str, body: dict, on_first=None, timeout: float = 10.0) -> tuple[list[str], str]:
    """Read an SSE response line by line (every read bounded by ``timeout``); calls ``on_first()`` after the
    first data event. Returns (data payloads, how it ended: 'done' | 'closed' | 'error-event' | 'http-NNN')."""
    payloads: list[str] = []
    with httpx.Client(timeout=httpx.Timeout(timeout, connect=3.0)) as c:
        with c.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                return payloads, f"http-{r.status_code}"
            try:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    payloads.append(data)
                    if data == "[DONE]":
                        return payloads, "done"
                    if data.startswith('{"error"'):
                        return payloads, "error-event"
                    if len(payloads) == 1 and on_first is not None:
                        on_first()
            except httpx.RemoteProtocolError:
                return payloads, "closed"
    return payloads, "closed"


@contextmanager
def loads(url: str, clients: int, **kw):
    """``clients`` concurrent Load loops, all stopped (and joined) on exit."""
    group = [Load(url, **kw) for _ in range(clients)]
    started = []
    try:
        for ld in group:
            started.append(ld.__enter__())
        yield group
    finally:
        for ld in started:
            ld.__exit__()


def total(group: list[Load]) -> int:
    return sum(ld.count() for ld in group)
