"""Several router processes on one port (--processes): traffic spreads, /metrics sums all of them, and
SIGTERM to the parent stops every child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from hpcserve.mock.launch import MockProcess
from hpcserve.router.metrics import _add
from router_util import free_port, wait_until


def test_snapshots_add_up():
    a = {"requests": [["/generate", 200, 3]], "latency": {"/generate": [1, 2, 0.5]}, "retries": {"prefill": 1},
         "upstream_errors": [], "rejected": {}, "inflight": 1, "queued": 0, "ejections_total": 0,
         "output_tokens": {"w0": 10}, "ttft": {"w0": [1, 0, 0.01]}, "itl": {},
         "workers": {"w0": ["both", 1, 1, 0, 5, 1]}}
    b = {"requests": [["/generate", 200, 4], ["/generate", 502, 1]], "latency": {"/generate": [0, 5, 1.5]},
         "retries": {"prefill": 2}, "upstream_errors": [["w0", "io", 1]], "rejected": {"queue_full": 2},
         "inflight": 2, "queued": 1, "ejections_total": 1, "workers": {"w0": ["both", 2, 0, 1, 7, 0]},
         "output_tokens": {"w0": 5, "w1": 1}, "ttft": {"w0": [0, 2, 3.0]}, "itl": {"w1": [1, 0, 0.5]},
         "redispatches": [["decode", "worker_lost", 2]]}
    _add(a, b)
    assert sorted(a["requests"]) == [["/generate", 200, 7], ["/generate", 502, 1]]
    assert a["latency"]["/generate"] == [1, 7, 2.0]
    assert a["retries"] == {"prefill": 3} and a["rejected"] == {"queue_full": 2}
    assert a["redispatches"] == [["decode", "worker_lost", 2]]
    assert (a["inflight"], a["queued"], a["ejections_total"]) == (3, 1, 1)
    # unhealthy (or out of rotation) in any process shows so; requests sent add up
    assert a["workers"]["w0"] == ["both", 3, 0, 1, 12, 0]
    assert a["output_tokens"] == {"w0": 15, "w1": 1}
    assert a["ttft"] == {"w0": [1, 2, 3.01]} and a["itl"] == {"w1": [1, 0, 0.5]}


def test_two_processes_share_a_port_and_metrics(tmp_path):
    worker = MockProcess.start(["--disaggregation-mode", "null"], log_dir=tmp_path, wait="ready")
    port = free_port()
    log = (tmp_path / "router.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "hpcserve.router", "--port", str(port), "--worker", worker.url,
                             "--processes", "2", "--policy", "round_robin"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/ready", timeout=2).status_code == 200, 20, what="router ready")
        pids = set()
        for i in range(30):  # a new connection each time: the kernel spreads them over both processes
            with httpx.Client() as c:
                assert c.post(url + "/generate", json={"text": f"n{i}"}, timeout=10).status_code == 200
                pids.add(c.get(url + "/workers", timeout=5).json()["process"])
        assert len(pids) == 2
        want = 'hpcserve_router_requests_total{route="/generate",status="200"} 30.0'
        wait_until(lambda: want in httpx.get(url + "/metrics", timeout=5).text, 10, what="summed metrics")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        worker.stop()
        log.close()
    assert proc.returncode == 0
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"
