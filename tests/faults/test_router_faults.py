"""Faults on the PD path with real mock processes: prefill death after dispatch (no replay), connect
failures retried elsewhere, client disconnects cancelling upstream work, timeouts."""

from __future__ import annotations

import os
import signal

import httpx

from hpcserve.mock.launch import MockProcess
from router_util import RouterProc, post_in_thread, bootstrap_port, free_port, start_pd, stats, wait_until

SLOW_PREFILL = ["--mock-time-scale", "1", "--mock-prefill-base-ms", "3000"]
SLOW_DECODE = ["--mock-time-scale", "1", "--mock-decode-step-ms", "100"]


def test_prefill_killed_after_dispatch_is_not_replayed(tmp_path):
    slow = MockProcess.start(["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                              str(free_port()), *SLOW_PREFILL], log_dir=tmp_path, wait="ready")
    other, decode = start_pd(tmp_path, 1, 1)
    router = None
    try:
        router = RouterProc(["--prefill", slow.url, bootstrap_port(slow), "--prefill", other.url,
                             bootstrap_port(other), "--decode", decode.url, "--prefill-policy", "round_robin",
                             "--health-interval", "30"], tmp_path)
        out: dict = {}
        t = None
        for _ in range(2):  # round robin: one of two requests lands on the slow prefill
            if stats(slow)["inflight"]:
                break
            t = post_in_thread(router.url, {"text": "doomed", "sampling_params": {"max_new_tokens": 4}}, out)
            wait_until(lambda: stats(slow)["inflight"] or out, 10, what="dispatch")
        wait_until(lambda: stats(slow)["inflight"] == 1, 10, what="the slow prefill to hold the request")
        other_before = stats(other)["requests"].get("/generate", 0)
        os.kill(slow.pid, signal.SIGKILL)
        t.join(30)
        assert out.get("status") == 502, out
        assert "prefill failed, decode cancelled" in out["body"]["error"]["message"]
        assert stats(other)["requests"].get("/generate", 0) == other_before  # never replayed to the other prefill
        wait_until(lambda: stats(decode)["running"] == 0, 10, what="decode cancelled")
    finally:
        if router is not None:
            router.stop()
        for p in (slow, other, decode):
            p.stop()


def test_connect_failure_is_retried_on_another_prefill(tmp_path):
    prefill, decode = start_pd(tmp_path, 1, 1)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connect is refused before any byte
    router = None
    try:
        router = RouterProc(["--prefill", dead, "9999", "--prefill", prefill.url, bootstrap_port(prefill),
                             "--decode", decode.url, "--prefill-policy", "round_robin", "--health-interval", "30",
                             "--eject-after", "100"], tmp_path)
        for i in range(4):
            r = httpx.post(router.url + "/generate", json={"text": f"retry {i}"}, timeout=20)
            assert r.status_code == 200, r.text
        assert stats(prefill)["requests"].get("/generate", 0) == 4
        metrics = httpx.get(router.url + "/metrics", timeout=5).text
        assert "hpcserve_router_retries_total{role=\"prefill\"} 4.0" in metrics, metrics
    finally:
        if router is not None:
            router.stop()
        prefill.stop()
        decode.stop()


def test_client_disconnect_cancels_upstream(tmp_path):
    prefill, decode = start_pd(tmp_path, 1, 1, extra=SLOW_DECODE)
    router = None
    try:
        router = RouterProc(["--prefill", prefill.url, bootstrap_port(prefill), "--decode", decode.url], tmp_path)
        body = {"text": "long story", "sampling_params": {"max_new_tokens": 300}, "stream": True}
        with httpx.stream("POST", router.url + "/generate", json=body, timeout=20) as r:
            assert r.status_code == 200
            first = next(r.iter_bytes())
            assert first.startswith(b"data: ")
            wait_until(lambda: stats(decode)["running"] == 1, 5, what="decode busy with the stream")
        # 300 steps of 100 ms would take 30 s; the router dropped the decode request when we left.
        wait_until(lambda: stats(decode)["running"] == 0, 10, what="decode request cancelled")
        wait_until(lambda: httpx.get(router.url + "/metrics", timeout=5).text.count(
            'hpcserve_router_requests_total{route="/generate",status="499"} 1.0'), 5, what="499 counted")
    finally:
        if router is not None:
            router.stop()
        prefill.stop()
        decode.stop()


def test_stopped_decode_hits_first_byte_timeout(tmp_path):
    prefill, decode = start_pd(tmp_path, 1, 1)
    router = None
    try:
        router = RouterProc(["--prefill", prefill.url, bootstrap_port(prefill), "--decode", decode.url,
                             "--first-byte-timeout", "1", "--health-interval", "30"], tmp_path)
        os.kill(decode.pid, signal.SIGSTOP)
        try:
            r = httpx.post(router.url + "/generate", json={"text": "frozen"}, timeout=20)
        finally:
            os.kill(decode.pid, signal.SIGCONT)
        assert r.status_code == 504, r.text
        assert "first-byte timeout" in r.json()["error"]["message"]
    finally:
        if router is not None:
            router.stop()
        prefill.stop()
        decode.stop()
