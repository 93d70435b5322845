"""Mock engines behind the real sglang-router (the Rust `sglang-router` wheel, which runs on CPU).

PD mode: one prefill and one decode mock behind the router answer /generate and /v1/chat/completions,
streaming or not, with exactly the text of an aggregated mock; every endpoint the router calls on the
workers exists on the mock. Skipped only when the wheel is not installed (a failure under tests/run.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import orjson
import pytest

from hpcserve.engine_shell.launch import free_port
from hpcserve.mock.launch import MockProcess

TIMEOUT = httpx.Timeout(30.0)
HELLO = {"text": "Hello world", "sampling_params": {"max_new_tokens": 24}}
CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
MOCK_ROUTES = {"/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/health_generate",
               "/model_info", "/get_model_info", "/server_info", "/get_server_info", "/flush_cache", "/metrics",
               "/get_load", "/abort_request", "/ping"}


def _router_available() -> None:
    """The wheel comes with the test extra (pyproject); no test installs packages."""
    pytest.importorskip("sglang_router", reason="sglang-router not installed (pip install -e '.[test]')")


def start_router(tmp_path, args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = (tmp_path / f"router-{port}.log").open("wb")
    # HF_ENDPOINT: the router looks for a tokenizer of the model; keep that lookup on this machine
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", *args, "--host", "127.0.0.1",
                             "--port", str(port), "--prometheus-host", "127.0.0.1", "--prometheus-port",
                             str(free_port()), "--policy", "round_robin", "--log-level", "warn"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    return proc, f"http://127.0.0.1:{port}"


def wait_router(proc: subprocess.Popen, url: str, tmp_path, timeout: float = 60.0) -> None:
    """Until a generation goes through (workers are registered in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sglang-router exited {proc.returncode}: {_logs(tmp_path)}")
        try:
            r = httpx.post(url + "/generate", json={"text": "warm", "sampling_params": {"max_new_tokens": 1}},
                           timeout=5.0)
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"sglang-router not serving within {timeout:g} s: {_logs(tmp_path)}")


def _logs(tmp_path) -> str:
    return "".join(p.read_text(errors="replace")[-1500:] for p in tmp_path.glob("*.log"))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def sse(text: str) -> list[dict]:
    events = [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]", text[-500:]
    return [orjson.loads(e) for e in events[:-1]]


@pytest.fixture
def pd_router(tmp_path):
    _router_available()
    boot = free_port()
    started: list[MockProcess] = []
    router = None
    try:
        for flags in ([], ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(boot)],
                      ["--disaggregation-mode", "decode", "--mock-bootstrap-timeout", "10"]):
            started.append(MockProcess.start(flags, log_dir=tmp_path, wait="ready"))
        agg, pre, dec = started
        router, url = start_router(tmp_path, ["--pd-disaggregation", "--prefill", pre.url, str(boot),
                                              "--decode", dec.url])
        wait_router(router, url, tmp_path)
        yield agg, pre, dec, url
    finally:
        if router is not None:
            stop(router)
        for mp in started:
            mp.stop()


def test_pd_behind_sglang_router_matches_aggregated(pd_router):
    agg, pre, dec, url = pd_router
    before = httpx.get(pre.url + "/mock/stats", timeout=TIMEOUT).json()["requests"].get("/generate", 0)
    expect = httpx.post(agg.url + "/generate", json=HELLO, timeout=TIMEOUT).json()["text"]
    assert expect == "vivid fern pixel coral s"

    r = httpx.post(url + "/generate", json=HELLO, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == expect and r.json()["meta_info"]["completion_tokens"] == 24

    r = httpx.post(url + "/generate", json={**HELLO, "stream": True}, timeout=TIMEOUT)
    events = sse(r.text)
    assert [e["text"] for e in events] == [expect[:k] for k in range(1, 25)]

    chat_expect = httpx.post(agg.url + "/v1/chat/completions", json=CHAT, timeout=TIMEOUT).json()
    r = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == chat_expect["choices"][0]["message"]["content"]
    assert r.json()["usage"]["completion_tokens"] == 12

    r = httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=TIMEOUT)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in sse(r.text) if c.get("choices"))
    assert streamed == chat_expect["choices"][0]["message"]["content"]

    # the prefill got exactly the two /generate requests sent here, and every room was handed over
    pre_stats = httpx.get(pre.url + "/mock/stats", timeout=TIMEOUT).json()
    dec_stats = httpx.get(dec.url + "/mock/stats", timeout=TIMEOUT).json()
    assert pre_stats["requests"]["/generate"] - before == 2
    assert pre_stats["rooms_fetched"] == pre_stats["rooms_put"] == dec_stats["rooms_bootstrapped"]
    assert dec_stats["bootstrap_timeouts"] == 0 and dec_stats["kv_mismatches"] == 0
    # every endpoint the router called on the workers is one the mock serves
    for s in (pre_stats, dec_stats):
        assert set(s["requests"]) <= MOCK_ROUTES, s["requests"]
        assert "/health" in s["requests"] or "/health_generate" in s["requests"]


def test_aggregated_mock_behind_sglang_router(tmp_path):
    _router_available()
    mp = MockProcess.start([], log_dir=tmp_path, wait="ready")
    router, url = start_router(tmp_path, ["--worker-urls", mp.url])
    try:
        wait_router(router, url, tmp_path)
        r = httpx.post(url + "/generate", json=HELLO, timeout=TIMEOUT)
        assert r.json()["text"] == "vivid fern pixel coral s"
        r = httpx.post(url + "/v1/completions", json={"model": "mock-model", "prompt": "Hello world",
                                                      "max_tokens": 24}, timeout=TIMEOUT)
        assert r.json()["choices"][0]["text"] == "vivid fern pixel coral s"
        stats = httpx.get(mp.url + "/mock/stats", timeout=TIMEOUT).json()
        assert set(stats["requests"]) <= MOCK_ROUTES, stats["requests"]
    finally:
        stop(router)
        mp.stop()
