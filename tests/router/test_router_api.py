"""The router's HTTP surface: auth, limits, errors, request ids, chunked bodies (aggregated mode, mock workers)."""

from __future__ import annotations

import socket
import threading

import httpx
import orjson
import pytest

from hpcserve.mock.launch import MockProcess
from router_util import RouterProc, stats, wait_until

KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("api")
    worker = MockProcess.start(["--disaggregation-mode", "null"], log_dir=log_dir, wait="ready")
    router = None
    try:
        router = RouterProc(["--worker", worker.url, "--api-key-env", "ROUTER_TEST_KEY", "--max-body-bytes", "4096",
                             "--policy", "round_robin"], log_dir, env={"ROUTER_TEST_KEY": KEY})
        yield {"router": router, "worker": worker, "log_dir": log_dir}
    finally:
        if router is not None:
            router.stop()
        worker.stop()


AUTH = {"authorization": f"Bearer {KEY}"}


def test_auth(env):
    url = env["router"].url
    assert httpx.get(url + "/health", timeout=5).status_code == 200  # probes need no key
    assert httpx.get(url + "/ready", timeout=5).status_code == 200
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        r = httpx.post(url + "/generate", json={"text": "x"}, headers=headers, timeout=10)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/workers", timeout=5).status_code == 401
    assert httpx.post(url + "/generate", json={"text": "x"}, headers=AUTH, timeout=10).status_code == 200


def test_client_mistakes_get_clear_4xx(env):
    url = env["router"].url
    cases = [
        (httpx.post(url + "/generate", content=b"{not json", headers=AUTH, timeout=5), 400, "not valid JSON"),
        (httpx.post(url + "/generate", content=b"[1, 2]", headers=AUTH, timeout=5), 400, "JSON object"),
        (httpx.post(url + "/nope", json={}, headers=AUTH, timeout=5), 404, "no route /nope"),
        (httpx.get(url + "/generate", headers=AUTH, timeout=5), 405, "use POST"),
        (httpx.post(url + "/generate", json={"text": "x" * 5000}, headers=AUTH, timeout=5), 413, "exceeds the limit"),
    ]
    for r, status, text in cases:
        assert r.status_code == status, r.text
        assert text in r.json()["error"]["message"]
    metrics = httpx.get(url + "/metrics", timeout=5).text
    assert 'hpcserve_router_requests_total{route="/generate",status="400"} 2.0' in metrics
    assert "status=\"500\"" not in metrics


def test_request_id_in_and_out(env):
    url = env["router"].url
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10,
                   headers={**AUTH, "x-request-id": "trace-me-7"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-me-7"
    bad = httpx.post(url + "/generate", json={"text": "hi"}, timeout=10, headers={**AUTH, "x-request-id": "x" * 300})
    assert bad.status_code == 200 and bad.headers["x-request-id"] != "x" * 300  # replaced, not echoed


def test_chunked_request_body_and_keep_alive(env):
    port = int(env["router"].url.rsplit(":", 1)[1])
    body = b'{"text": "chunked hello", "sampling_params": {"max_new_tokens": 3}}'
    req = (b"POST /generate HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode() +
           b"\r\ntransfer-encoding: chunked\r\n\r\n" + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        answers = []
        for _ in range(2):  # the same connection serves twice
            s.sendall(req)
            data = b""
            while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                    data.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
                chunk = s.recv(65536)
                assert chunk, data
                data += chunk
            answers.append(data)
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
    texts = [orjson.loads(a.split(b"\r\n\r\n", 1)[1])["text"] for a in answers]
    assert texts[0] == texts[1] != ""


def test_overload_gives_429_and_queue_drains(tmp_path):
    worker = MockProcess.start(["--disaggregation-mode", "null", "--mock-time-scale", "1", "--mock-decode-step-ms",
                                "100"], log_dir=tmp_path, wait="ready")
    router = None
    try:
        router = RouterProc(["--worker", worker.url, "--max-concurrency", "1", "--queue-size", "1"], tmp_path)
        results: list[int] = []

        def slow() -> None:
            r = httpx.post(router.url + "/generate", json={"text": "slow", "sampling_params": {"max_new_tokens": 15}},
                           timeout=30)
            results.append(r.status_code)

        threads = [threading.Thread(target=slow, daemon=True) for _ in range(2)]
        threads[0].start()
        wait_until(lambda: stats(worker)["running"] == 1, 10, what="first request running")
        threads[1].start()
        wait_until(lambda: 'hpcserve_router_queued_requests 1.0' in httpx.get(router.url + "/metrics", timeout=5).text,
                   10, what="second request queued")
        r = httpx.post(router.url + "/generate", json={"text": "third"}, timeout=10)
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "overloaded"
        for t in threads:
            t.join(30)
        assert results == [200, 200]
    finally:
        if router is not None:
            router.stop()
        worker.stop()


def test_bad_command_lines_are_one_line_errors(tmp_path):
    import subprocess
    import sys
    cases = [
        ([], "no workers"),
        (["--worker", "http://127.0.0.1:1", "--prefill", "http://127.0.0.1:2", "9"], "--worker is for --mode aggregated"),
        (["--prefill", "http://127.0.0.1:2", "port"], "bootstrap port"),
        (["--worker", "http://127.0.0.1:1", "--api-key-env", "SURELY_UNSET_VAR_4242"], "SURELY_UNSET_VAR_4242"),
        (["--redis-url", "redis://:pw@127.0.0.1:1/0"], "--run-id"),
    ]
    for args, text in cases:
        p = subprocess.run([sys.executable, "-m", "hpcserve.router", *args], capture_output=True, text=True, timeout=30)
        assert p.returncode == 2, p
        assert text in p.stderr and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
