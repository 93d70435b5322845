"""`hpcserve top` in a real terminal (tmux: send-keys, capture-pane) against a deployment under load: its
numbers agree with the router's /metrics; it says so when the head is unreachable."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from control_util import Load, start

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed (tests/run.sh installs it)")


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """histogram_quantile as Prometheus documents it, written out here independently of hpcserve's."""
    buckets = sorted(buckets)
    rank = q * buckets[-1][1]
    lo, below = 0.0, 0.0
    for le, cum in buckets:
        if cum >= rank:
            return lo if le == float("inf") else lo + (le - lo) * (rank - below) / max(cum - below, 1e-12)
        lo, below = le, cum
    return lo


def expected_row(d, worker: str) -> dict:
    m = d.metrics()

    def val(name: str) -> float:
        return next(v for (n, lab), v in m.items() if n == name and dict(lab).get("worker") == worker)
    ttft = [(float(dict(lab)["le"]), v) for (n, lab), v in m.items()
            if n == "hpcserve_router_time_to_first_token_seconds_bucket" and dict(lab)["worker"] == worker]
    return {"requests": int(val("hpcserve_router_worker_requests_total")),
            "tokens": int(val("hpcserve_router_output_tokens_total")),
            "ttft_p50_ms": f"{quantile(ttft, 0.5) * 1000:.1f}", "ttft_p99_ms": f"{quantile(ttft, 0.99) * 1000:.1f}"}


class Tmux:
    """A private tmux server (its own socket) running one command; stopped with kill-server on that socket."""

    def __init__(self, tmp_path, command: list[str]) -> None:
        self.sock = str(tmp_path / "tmux.sock")
        env = " ".join(f"{k}={v}" for k, v in (("PATH", os.environ["PATH"]),
                                                ("HPCSERVE_TEST_CONTROL_KEY", os.environ["HPCSERVE_TEST_CONTROL_KEY"])))
        self.tmux("new-session", "-d", "-s", "top", "-x", "220", "-y", "50", f"env {env} bash --norc")
        self.tmux("send-keys", "-t", "top", " ".join(command), "Enter")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def stop(self) -> None:
        subprocess.run(["tmux", "-S", self.sock, "kill-server"], capture_output=True, timeout=10)


def _row(screen: str, worker: str) -> list[str] | None:
    for line in screen.splitlines():
        cells = line.split()
        if cells and cells[0] == worker:
            return cells
    return None


def _wait(pred, timeout: float, what: str, screen=None):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}\n{screen() if screen else ''}"
        time.sleep(0.2)


def test_top_in_tmux_agrees_with_router_metrics_and_reports_an_unreachable_head(deployment, tmp_path, monkeypatch):
    d, backend = start(deployment, tmp_path, monkeypatch, mock={"time-scale": 1, "decode-step-ms": 10})
    tm = Tmux(tmp_path, [sys.executable, "-m", "hpcserve", "top", str(d.run_dir), "--interval", "0.5"])
    try:
        _wait(lambda: _row(tm.screen(), "decode-0"), 30, "top showing decode-0", tm.screen)
        with Load(d.router, clients=4) as load:
            # under load: some worker shows requests in flight and a non-zero request rate
            def busy():
                rows = [_row(tm.screen(), w) for w in ("decode-0", "decode-1")]
                return any(r and int(r[6]) > 0 and r[7] not in ("-", "0.0") for r in rows)
            _wait(busy, 60, "top showing in-flight requests and a request rate", tm.screen)
            _wait(lambda: load.count() >= 40, 60, "40 requests")
        assert all(r == (200, True) for r in load.results)
        # load over: once top refreshed, its counters and latency quantiles are the router's
        time.sleep(1.5)
        for worker in ("decode-0", "decode-1"):
            want = expected_row(d, worker)
            cells = _row(tm.screen(), worker)
            # worker role node state rot restarts in-flight req/s tok/s requests tokens ttft50 ttft99 itl50 itl99
            got = {"requests": int(cells[9]), "tokens": int(cells[10]), "ttft_p50_ms": cells[11],
                   "ttft_p99_ms": cells[12]}
            assert got == want, (worker, got, want, tm.screen())
            assert cells[3:7] == ["ready", "in", "0", "0"]
        total = _row(tm.screen(), "total")
        sent = sum(v for (n, _), v in d.metrics().items() if n == "hpcserve_router_worker_requests_total")
        assert int(total[-6]) == sent == sum(expected_row(d, w)["requests"] for w in ("decode-0", "decode-1")) * 2
        assert re.search(r"ready +\S+", tm.screen()) and "last events" in tm.screen()
        # the head goes away: top says so instead of failing
        backend.stop()
        _wait(lambda: "head unreachable" in tm.screen(), 30, "top reporting the head unreachable", tm.screen)
        # Ctrl-C ends it with the shell prompt back
        tm.tmux("send-keys", "-t", "top", "C-c", "")
        _wait(lambda: "interrupted" in tm.screen(), 10, "top stopping on Ctrl-C", tm.screen)
    finally:
        tm.stop()


def test_top_once_json_is_one_document_with_the_router_numbers(deployment, tmp_path, monkeypatch):
    d, backend = start(deployment, tmp_path, monkeypatch)
    import httpx
    with httpx.Client(headers=d.headers, timeout=30) as c:
        for i in range(5):
            r = c.post(d.router + "/v1/completions", json={"model": "demo", "prompt": f"p{i}", "max_tokens": 3,
                                                           "stream": True})
            assert r.status_code == 200
    out = subprocess.run([sys.executable, "-m", "hpcserve", "top", str(d.run_dir), "--once", "--json",
                          "--interval", "0.3"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    rows = {r["worker"]: r for r in doc["workers"]}
    for w in ("decode-0", "decode-1"):
        want = expected_row(d, w)
        assert (rows[w]["requests"], rows[w]["tokens"]) == (want["requests"], want["tokens"])
    assert sum(rows[w]["requests"] for w in ("decode-0", "decode-1")) == 5
    assert doc["total"]["tokens"] == sum(r["tokens"] for r in rows.values()) > 0
    backend.stop()
    out = subprocess.run([sys.executable, "-m", "hpcserve", "top", str(d.run_dir), "--once"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("error: head unreachable: the control API at "), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_wrong_target_is_one_line_and_exit_2(tmp_path):
    for args in (["drain", "decode-0"], ["top", str(tmp_path / "nope")], ["restart", "decode-0", "--run", "x"]):
        out = subprocess.run([sys.executable, "-m", "hpcserve", *args], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
        assert "not a run directory (no plan.json) nor a Slurm job id" in out.stderr
