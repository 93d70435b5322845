"""The mock engine as real processes on 127.0.0.1: determinism across modes and endpoints, SGLang and
OpenAI shapes, PD rendezvous (success, timeout, wiring mistakes), multi-node join, startup, timing model."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import pytest

from hpcserve.mock.cli import parse_args
from hpcserve.engine_shell.launch import free_port, http_status
from hpcserve.mock.launch import MockProcess
from hpcserve.mock.model import SamplingParams, complete
from hpcserve.engine_shell.tokenizer import Prompt, apply_chat_template, encode

TIMEOUT = httpx.Timeout(30.0)
HELLO = {"text": "Hello world", "sampling_params": {"max_new_tokens": 24}}
HELLO_TEXT = "vivid fern pixel coral s"   # pinned: outputs must not change between versions


@pytest.fixture
def procs(tmp_path):
    """Start mocks through this; every one is stopped by PID at the end of the test."""
    started: list[MockProcess] = []

    def start(*flags: str, wait: str | None = "ready", **kw) -> MockProcess:
        mp = MockProcess.start(list(flags), log_dir=tmp_path, wait=wait, **kw)
        started.append(mp)
        return mp

    yield start
    for mp in started:
        mp.stop()


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """One aggregated mock, one prefill and one decode mock, shared by the read-only tests below."""
    d = tmp_path_factory.mktemp("trio")
    boot = free_port()
    agg = MockProcess.start([], log_dir=d, wait="ready")
    pre = MockProcess.start(["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(boot)],
                            log_dir=d, wait="ready")
    dec = MockProcess.start(["--disaggregation-mode", "decode", "--mock-bootstrap-timeout", "1"],
                            log_dir=d, wait="ready")
    yield agg, pre, dec, boot
    for mp in (agg, pre, dec):
        mp.stop()


def post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url, json=body, timeout=TIMEOUT, **kw)


def sse_events(resp_text: str) -> list:
    events = [e[len("data: "):] for e in resp_text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [orjson.loads(e) for e in events[:-1]]


def pd_call(pre: MockProcess, dec: MockProcess, boot: int, path: str, body: dict, room: int):
    """What a PD router does: the same body plus bootstrap fields to prefill and decode at once."""
    full = {**body, "bootstrap_host": "127.0.0.1", "bootstrap_port": boot, "bootstrap_room": room}
    with ThreadPoolExecutor(2) as ex:
        fp = ex.submit(post, pre.url + path, full)
        fd = ex.submit(post, dec.url + path, full)
        return fp.result(), fd.result()


# ---- command line and startup

def test_cli_takes_sglang_flags_and_records_the_rest():
    cfg = parse_args(["--model-path", "/m/x", "--tp", "4", "--dp-size", "2", "--mem-fraction-static", "0.85",
                      "--trust-remote-code", "--chunked-prefill-size=8192", "--cuda-graph-bs", "1", "2", "4",
                      "--disaggregation-mode", "prefill", "--mock-time-scale", "0.5"])
    assert (cfg.tp_size, cfg.dp_size, cfg.served_model_name, cfg.time_scale) == (4, 2, "/m/x", 0.5)
    assert cfg.disaggregation_bootstrap_port == 8998
    assert cfg.extra_args == {"mem_fraction_static": "0.85", "trust_remote_code": True,
                              "chunked_prefill_size": "8192", "cuda_graph_bs": ["1", "2", "4"]}
    # recipes keep mock options as numbers, so integers may arrive as "8.0"
    assert parse_args(["--model-path", "m", "--mock-max-running", "8.0"]).max_running == 8


@pytest.mark.parametrize("flags, needle", [
    (["--port", "nope"], "--port"),
    (["--mock-time-scal", "1"], "--mock-time-scal"),
    (["--disaggregation-mode", "both"], "--disaggregation-mode"),
    (["--nnodes", "2", "--node-rank", "1"], "--dist-init-addr"),
])
def test_bad_flags_give_one_line_and_exit_2(flags, needle):
    r = subprocess.run([sys.executable, "-m", "hpcserve.mock", "--model-path", "m", *flags],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_port_in_use_gives_one_line_and_exit_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "hpcserve.mock", "--model-path", "m", "--host", "127.0.0.1",
                            "--port", str(port)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and f"127.0.0.1:{port}" in r.stderr, r.stderr


def test_startup_delay_answers_503_then_200_and_sigterm_exits_0(procs):
    mp = procs("--mock-startup-delay", "1.5", wait="listen")
    assert http_status(mp.url + "/health") == 503
    r = post(mp.url + "/generate", HELLO)
    assert r.status_code == 503 and "not ready" in r.json()["error"]["message"]
    mp.wait("ready", timeout=20)
    assert http_status(mp.url + "/health") == 200
    assert http_status(mp.url + "/health_generate") == 200
    assert post(mp.url + "/generate", HELLO).json()["text"] == HELLO_TEXT
    assert mp.stop(timeout=10) == 0   # SIGTERM; a mock still alive after 10 s is killed (-9) and fails this


# ---- deterministic output

def test_generate_text_is_pinned_and_matches_the_model(trio):
    agg = trio[0]
    out = post(agg.url + "/generate", HELLO).json()
    assert out["text"] == HELLO_TEXT
    assert out["output_ids"] == encode(HELLO_TEXT)
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 24}
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]) == (11, 24, 0)
    assert len(meta["id"]) == 32 and meta["e2e_latency"] >= 0
    # text and input_ids of the same tokens give the same output
    by_ids = post(agg.url + "/generate", {"input_ids": encode("Hello world"),
                                          "sampling_params": {"max_new_tokens": 24}}).json()
    assert by_ids["text"] == HELLO_TEXT


def test_sampling_params_that_matter_change_the_output(trio):
    agg = trio[0]

    def text(sp):
        return post(agg.url + "/generate", {"text": "Hello world", "sampling_params": sp}).json()["text"]

    base = text({"max_new_tokens": 40})
    assert text({"max_new_tokens": 10}) == base[:10]           # max_new_tokens truncates
    assert text({"max_new_tokens": 40, "seed": 7}) != base
    assert text({"max_new_tokens": 40, "temperature": 0.5}) != base
    greedy = text({"max_new_tokens": 40, "temperature": 0})
    assert text({"max_new_tokens": 40, "temperature": 0, "seed": 9, "top_p": 0.5}) == greedy
    assert text({"max_new_tokens": 40, "top_k": 5, "repetition_penalty": 1.1}) == base  # accepted, ignored


def test_stop_strings_and_min_new_tokens(trio):
    agg = trio[0]
    full = complete(Prompt.from_text("Hello world"), SamplingParams(64)).text
    second_word = full.split(" ")[1]
    out = post(agg.url + "/generate", {"text": "Hello world", "sampling_params": {
        "max_new_tokens": 64, "stop": [second_word]}}).json()
    cut = full.index(second_word)
    assert out["text"] == full[:cut]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": second_word}
    assert out["meta_info"]["completion_tokens"] == cut + len(second_word)
    # a stop string that ends before min_new_tokens is ignored: the next occurrence counts
    full = complete(Prompt.from_text("Hello world"), SamplingParams(400)).text
    first_word = full.split(" ")[0]
    nxt = full.find(first_word, 1)
    assert nxt > 0  # this prompt repeats its first word (deterministic)
    out = post(agg.url + "/generate", {"text": "Hello world", "sampling_params": {
        "max_new_tokens": 400, "stop": first_word, "min_new_tokens": len(first_word) + 1}}).json()
    assert out["text"] == full[:nxt] and out["meta_info"]["finish_reason"]["matched"] == first_word
    assert out["meta_info"]["completion_tokens"] == nxt + len(first_word)


def test_batch_generate_returns_a_list_matching_single_requests(trio):
    agg = trio[0]
    texts = ["Hello world", "The capital of France is", "x"]
    out = post(agg.url + "/generate", {"text": texts, "sampling_params": {"max_new_tokens": 12}}).json()
    assert isinstance(out, list) and len(out) == 3
    for t, o in zip(texts, out):
        single = post(agg.url + "/generate", {"text": t, "sampling_params": {"max_new_tokens": 12}}).json()
        assert o["text"] == single["text"] and o["meta_info"]["prompt_tokens"] == len(t.encode())


def test_generate_stream_is_cumulative_one_chunk_per_token(trio):
    agg = trio[0]
    r = post(agg.url + "/generate", {**HELLO, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert len(events) == 24
    assert [e["text"] for e in events] == [HELLO_TEXT[:k] for k in range(1, 25)]
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 24}
    assert events[-1]["output_ids"] == encode(HELLO_TEXT)


def test_return_logprob_shapes(trio):
    agg = trio[0]
    assert post(agg.url + "/generate", {**HELLO, "return_logprob": True}).json()["meta_info"][
        "input_token_logprobs"] == []  # SGLang's default logprob_start_len -1: output tokens only
    meta = post(agg.url + "/generate", {**HELLO, "return_logprob": True, "logprob_start_len": 0}).json()["meta_info"]
    inp, outp = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert len(inp) == 11 and inp[0][0] is None and all(isinstance(x[0], float) for x in inp[1:])
    assert [x[1] for x in inp] == encode("Hello world")
    assert [x[1] for x in outp] == encode(HELLO_TEXT) and all(x[0] <= 0 for x in outp)


def test_completions_and_chat_agree_with_generate(trio):
    agg = trio[0]
    c = post(agg.url + "/v1/completions", {"model": "m", "prompt": "Hello world", "max_tokens": 24}).json()
    assert c["object"] == "text_completion" and c["choices"][0]["text"] == HELLO_TEXT
    assert c["usage"] == {"prompt_tokens": 11, "completion_tokens": 24, "total_tokens": 35,
                          "prompt_tokens_details": None}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    templ = apply_chat_template(msgs)
    assert templ == "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"
    chat = post(agg.url + "/v1/chat/completions", {"model": "m", "messages": msgs, "max_tokens": 20}).json()
    gen = post(agg.url + "/generate", {"text": templ, "sampling_params": {"max_new_tokens": 20}}).json()
    assert chat["choices"][0]["message"]["content"] == gen["text"]
    assert chat["usage"]["prompt_tokens"] == len(templ)


def test_openai_client_against_the_mock(trio):
    openai = pytest.importorskip("openai")
    agg = trio[0]
    client = openai.OpenAI(base_url=agg.url + "/v1", api_key="none", timeout=30, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["mock-model"]
    msgs = [{"role": "user", "content": "Tell me a story"}]
    whole = client.chat.completions.create(model="mock-model", messages=msgs, max_tokens=15, seed=3)
    text = whole.choices[0].message.content
    assert len(text) == 15 and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 15
    chunks = list(client.chat.completions.create(model="mock-model", messages=msgs, max_tokens=15, seed=3,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    comp = client.completions.create(model="mock-model", prompt="Hello world", max_tokens=24)
    assert comp.choices[0].text == HELLO_TEXT
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="mock-model", prompt="Hello world", max_tokens=24, stream=True))
    assert streamed == HELLO_TEXT
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="mock-model", messages=[], max_tokens=3)


# ---- PD rendezvous

def test_pd_gives_the_same_text_as_aggregated(trio):
    agg, pre, dec, boot = trio
    p, d = pd_call(pre, dec, boot, "/generate", {**HELLO, "return_logprob": True, "logprob_start_len": 0}, room=1001)
    assert p.status_code == 200 and d.status_code == 200
    assert d.json()["text"] == HELLO_TEXT and p.json()["text"] == HELLO_TEXT[:1]
    agg_meta = post(agg.url + "/generate", {**HELLO, "return_logprob": True, "logprob_start_len": 0}).json()["meta_info"]
    # the router prepends the prefill's input logprobs to the decode's (empty) ones
    merged = p.json()["meta_info"]["input_token_logprobs"] + d.json()["meta_info"]["input_token_logprobs"]
    assert merged == agg_meta["input_token_logprobs"]
    assert d.json()["meta_info"]["output_token_logprobs"] == agg_meta["output_token_logprobs"]
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
    _, d = pd_call(pre, dec, boot, "/v1/chat/completions", chat, room=1002)
    assert d.json()["choices"][0]["message"]["content"] == \
        post(agg.url + "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    _, d = pd_call(pre, dec, boot, "/generate", {**HELLO, "stream": True}, room=1003)
    assert sse_events(d.text)[-1]["text"] == HELLO_TEXT
    _, d = pd_call(pre, dec, boot, "/v1/chat/completions",
                   {**chat, "stream": True, "stream_options": {"include_usage": True}}, room=1004)
    events = sse_events(d.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"]["content"] for e in events if e["choices"]) == \
        post(agg.url + "/v1/chat/completions", chat).json()["choices"][0]["message"]["content"]
    assert events[-1]["usage"]["completion_tokens"] == 12


def test_pd_batch_uses_one_room_per_item(trio):
    agg, pre, dec, boot = trio
    body = {"text": ["a b c", "d e f"], "sampling_params": {"max_new_tokens": 8},
            "bootstrap_host": ["127.0.0.1"] * 2, "bootstrap_port": [boot] * 2, "bootstrap_room": [2001, 2002]}
    with ThreadPoolExecutor(2) as ex:
        fp, fd = ex.submit(post, pre.url + "/generate", body), ex.submit(post, dec.url + "/generate", body)
        fp.result()
        d = fd.result().json()
    expect = post(agg.url + "/generate", {"text": ["a b c", "d e f"], "sampling_params": {"max_new_tokens": 8}})
    assert [x["text"] for x in d] == [x["text"] for x in expect.json()]


def test_decode_without_bootstrap_fields_or_port_is_rejected(trio):
    _, _, dec, _ = trio
    r = post(dec.url + "/generate", HELLO)
    assert r.status_code == 400 and "bootstrap" in r.json()["error"]["message"]
    r = post(dec.url + "/generate", {**HELLO, "bootstrap_host": "127.0.0.1", "bootstrap_room": 5})
    assert r.status_code == 400 and "bootstrap_port" in r.json()["error"]["message"]
    r = post(dec.url + "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert r.status_code == 400 and "bootstrap" in r.json()["message"]


def test_aggregated_server_ignores_bootstrap_fields(trio):
    agg, _, _, boot = trio
    r = post(agg.url + "/generate", {**HELLO, "bootstrap_host": "10.9.9.9", "bootstrap_port": boot,
                                     "bootstrap_room": 3})
    assert r.status_code == 200 and r.json()["text"] == HELLO_TEXT


def test_decode_times_out_for_a_room_no_prefill_got(procs):
    pre = procs("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(free_port()))
    boot = int(pre.argv[pre.argv.index("--disaggregation-bootstrap-port") + 1])
    dec = procs("--disaggregation-mode", "decode", "--mock-bootstrap-timeout", "1")
    body = {**HELLO, "bootstrap_host": "127.0.0.1", "bootstrap_port": boot, "bootstrap_room": 4242}
    r = post(dec.url + "/generate", body)
    assert r.status_code == 500 and "bootstrap timeout" in r.json()["error"]["message"]
    assert "4242" in r.json()["error"]["message"]
    events = sse_events(post(dec.url + "/generate", {**body, "stream": True}).text)
    assert "bootstrap timeout" in events[-1]["error"]["message"]
    # a wrong bootstrap port (nothing listens) also ends in the timeout error, naming the address
    r = post(dec.url + "/generate", {**body, "bootstrap_port": free_port()})
    assert r.status_code == 500 and "bootstrap timeout" in r.json()["error"]["message"]
    stats = httpx.get(dec.url + "/mock/stats", timeout=TIMEOUT).json()
    assert stats["bootstrap_timeouts"] == 3 and stats["rooms_bootstrapped"] == 0
    assert stats["requests"]["/generate"] == 3


def test_orphaned_prefill_times_out_and_kv_mismatch_is_an_error(procs):
    boot = free_port()
    pre = procs("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(boot),
                "--mock-bootstrap-timeout", "1")
    dec = procs("--disaggregation-mode", "decode", "--mock-bootstrap-timeout", "5")
    r = post(pre.url + "/generate", {**HELLO, "bootstrap_host": "127.0.0.1", "bootstrap_port": boot,
                                     "bootstrap_room": 77})
    assert r.status_code == 500 and "no decode server fetched" in r.json()["error"]["message"]
    # the prefill and the decode got different prompts for one room: a wiring mistake
    boot_fields = {"bootstrap_host": "127.0.0.1", "bootstrap_port": boot, "bootstrap_room": 78}
    with ThreadPoolExecutor(2) as ex:
        ex.submit(post, pre.url + "/generate", {**HELLO, **boot_fields})
        d = ex.submit(post, dec.url + "/generate", {**HELLO, "text": "Goodbye", **boot_fields}).result()
    assert d.status_code == 500 and "KV mismatch" in d.json()["error"]["message"]
    assert httpx.get(pre.url + "/mock/stats", timeout=TIMEOUT).json()["bootstrap_timeouts"] == 1
    assert httpx.get(dec.url + "/mock/stats", timeout=TIMEOUT).json()["kv_mismatches"] == 1


def test_mock_stats_count_requests_per_endpoint(procs):
    boot = free_port()
    pre = procs("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(boot))
    dec = procs("--disaggregation-mode", "decode")
    for room in range(5):
        p, d = pd_call(pre, dec, boot, "/generate", HELLO, room=room)
        assert d.json()["text"] == HELLO_TEXT
    pd_call(pre, dec, boot, "/v1/completions", {"prompt": "x", "max_tokens": 3}, room=99)
    ps = httpx.get(pre.url + "/mock/stats", timeout=TIMEOUT).json()
    ds = httpx.get(dec.url + "/mock/stats", timeout=TIMEOUT).json()
    assert ps["role"] == "prefill" and ps["requests"]["/generate"] == 5 and ps["requests"]["/v1/completions"] == 1
    assert ps["rooms_put"] == ps["rooms_fetched"] == 6 and ds["rooms_bootstrapped"] == 6
    assert ds["requests_by_role"] == {"decode": ds["requests_total"]}
    assert ds["generation_tokens"] == 5 * 24 + 3 and ps["generation_tokens"] == 6
    metrics = httpx.get(dec.url + "/metrics", timeout=TIMEOUT).text
    assert 'sglang:generation_tokens_total{model_name="mock-model"} 123' in metrics
    assert 'mock_requests_total{model_name="mock-model",endpoint="/generate",role="decode"} 5' in metrics


def test_info_endpoints(trio):
    agg = trio[0]
    info = httpx.get(agg.url + "/server_info", timeout=TIMEOUT).json()
    assert info["model_path"] == "mock-model" and info["disaggregation_mode"] == "null"
    assert info["argv"][:2] == ["--model-path", "mock-model"] and info["port"] == agg.port
    assert httpx.get(agg.url + "/get_server_info", timeout=TIMEOUT).json()["argv"] == info["argv"]
    for path in ("/model_info", "/get_model_info"):
        mi = httpx.get(agg.url + path, timeout=TIMEOUT).json()
        assert mi["model_path"] == "mock-model" and mi["is_generation"] is True
    assert httpx.post(agg.url + "/flush_cache", timeout=TIMEOUT).status_code == 200
    assert httpx.get(agg.url + "/nope", timeout=TIMEOUT).status_code == 404


def test_api_key_incremental_streaming_and_sigterm_mid_request(procs):
    mp = procs("--api-key", "sekret", "--incremental-streaming-output", "--mock-time-scale", "1",
               "--mock-decode-step-ms", "50")
    assert post(mp.url + "/generate", HELLO).status_code == 401
    assert http_status(mp.url + "/health") == 200
    auth = {"Authorization": "Bearer sekret"}
    body = {"text": "Hello world", "sampling_params": {"max_new_tokens": 4}, "stream": True}
    events = sse_events(post(mp.url + "/generate", body, headers=auth).text)
    assert [e["text"] for e in events] == ["v", "i", "v", "i"]          # deltas, not cumulative
    assert "".join(e["text"] for e in events) == HELLO_TEXT[:4]
    # SIGTERM while a long request runs: exit 0 promptly
    with ThreadPoolExecutor(1) as ex:
        ex.submit(lambda: httpx.post(mp.url + "/generate", json={"text": "x", "sampling_params": {
            "max_new_tokens": 2000}}, headers=auth, timeout=TIMEOUT))
        time.sleep(0.5)
        assert mp.stop(timeout=10) == 0


# ---- multi-node

def test_multi_node_replica_joins_and_ranks_follow_the_leader(procs):
    dist = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "3", "--dist-init-addr", dist, "--tp", "16"]
    leader = procs(*common, "--node-rank", "0", wait="listen")
    assert http_status(leader.url + "/health") == 503
    rank1 = procs(*common, "--node-rank", "1", "--port", str(free_port()), wait=None)
    rank2 = procs(*common, "--node-rank", "2", "--port", str(free_port()), wait=None)
    leader.wait("ready", timeout=20)
    ranks = httpx.get(leader.url + "/server_info", timeout=TIMEOUT).json()["ranks"]
    assert [r["node_rank"] for r in ranks] == [0, 1, 2]
    for r, rank in zip(ranks, (0, 1, 2)):
        argv = r["argv"]
        assert argv[argv.index("--node-rank") + 1] == str(rank)
        assert argv[argv.index("--dist-init-addr") + 1] == dist
    # a second rank 1 is refused; the running one is unaffected
    dup = subprocess.run([sys.executable, "-m", "hpcserve.mock", "--model-path", "mock-model", *common,
                          "--node-rank", "1"], capture_output=True, text=True, timeout=30)
    assert dup.returncode == 1 and "already joined" in dup.stderr
    # a rank stopped on purpose exits 0, and the leader turns unhealthy
    assert rank2.stop() == 0
    deadline = time.monotonic() + 10
    while http_status(leader.url + "/health") != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http_status(leader.url + "/health") == 503
    # when the leader goes, the remaining rank exits non-zero
    assert rank1.proc.poll() is None
    assert leader.stop() == 0
    assert rank1.proc.wait(15) != 0


# ---- timing model

def test_timing_model_reports_model_times(procs):
    # a=20 b=0.5 c=4 d=1 (ms); 40 prompt tokens; time scale 1
    mp = procs("--mock-time-scale", "1", "--mock-prefill-base-ms", "20", "--mock-prefill-per-token-ms", "0.5",
               "--mock-decode-step-ms", "4", "--mock-decode-step-per-seq-ms", "1", "--mock-max-running", "1")
    prompt = "p" * 40
    t = time.monotonic()
    out = post(mp.url + "/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 10}}).json()
    wall = time.monotonic() - t
    timing = out["meta_info"]["mock_timing"]
    assert timing["queue_ms"] == 0 and timing["prefill_ms"] == pytest.approx(40.0)
    assert timing["decode_steps"] == 9 and timing["decode_ms"] == pytest.approx(9 * 5.0)
    assert out["meta_info"]["e2e_latency"] >= 0.085 and wall >= 0.085   # sleeping never ends early
    # max-running 1: the second item of a batch waits for the whole first sequence
    both = post(mp.url + "/generate", {"text": [prompt, prompt], "sampling_params": {"max_new_tokens": 10}}).json()
    first, second = (x["meta_info"]["mock_timing"] for x in both)
    assert first["queue_ms"] == 0 and second["queue_ms"] == pytest.approx(85.0)
    assert second["prefill_ms"] == pytest.approx(40.0) and second["decode_ms"] == pytest.approx(45.0)


def test_timing_model_batches_sequences(procs):
    mp = procs("--mock-time-scale", "0.5", "--mock-prefill-base-ms", "20", "--mock-prefill-per-token-ms", "0.5",
               "--mock-decode-step-ms", "4", "--mock-decode-step-per-seq-ms", "1", "--mock-max-running", "8")
    prompts = ["p" * 40, "q" * 40]
    out = post(mp.url + "/generate", {"text": prompts, "sampling_params": {"max_new_tokens": 5}}).json()
    for prompt, x in zip(prompts, out):
        t = x["meta_info"]["mock_timing"]
        # both prefills share one forward pass (a + b*80, not 2a + b*80); each decode step serves a batch of two
        assert t["prefill_ms"] == pytest.approx(60.0) and t["decode_ms"] == pytest.approx(4 * 6.0)
        assert x["text"] == complete(Prompt.from_text(prompt), SamplingParams(5)).text  # same as instant mode
    # streaming emits one chunk per step with the time scale on
    events = sse_events(post(mp.url + "/generate", {"text": "abc", "sampling_params": {"max_new_tokens": 6},
                                                    "stream": True}).text)
    assert [e["meta_info"]["completion_tokens"] for e in events] == [1, 2, 3, 4, 5, 6]


TIMING_20_05_4_1 = ("--mock-time-scale", "1", "--mock-prefill-base-ms", "20", "--mock-prefill-per-token-ms", "0.5",
                    "--mock-decode-step-ms", "4", "--mock-decode-step-per-seq-ms", "1", "--mock-max-running", "8")


def _prefill_while_another_decodes(url: str) -> tuple[dict, dict]:
    """A 40-token prompt arriving while a long request decodes: the timings of both."""
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(post, url + "/generate", {"text": "x" * 8, "sampling_params": {"max_new_tokens": 40}})
        time.sleep(0.1)  # the long one is decoding (its prefill took 24 ms, 40 steps take 200 ms)
        short = post(url + "/generate", {"text": "p" * 40, "sampling_params": {"max_new_tokens": 1}}).json()
        return short["meta_info"]["mock_timing"], long.result().json()["meta_info"]["mock_timing"]


def test_a_prefill_batch_is_its_own_forward_pass(procs):
    # as SGLang's scheduler (without --enable-mixed-chunk): the new prompt's iteration is its prefill alone,
    # a + b*40 = 40 ms, and the decoding request makes no step during it
    short, long = _prefill_while_another_decodes(procs(*TIMING_20_05_4_1).url)
    assert short["prefill_ms"] == pytest.approx(40.0) and short["decode_steps"] == 0
    assert long["decode_steps"] == 39 and long["prefill_ms"] == pytest.approx(24.0)
    # it arrived during one of the long request's decode steps (5 ms) and waited for the rest of it
    assert 0.0 <= short["queue_ms"] <= 5.0 + 1e-6


def test_mixed_chunk_runs_the_prefill_with_the_decode_step(procs):
    # --enable-mixed-chunk: the prefill batch rides in the decode step of the running request (batch of 1)
    short, _ = _prefill_while_another_decodes(procs(*TIMING_20_05_4_1, "--enable-mixed-chunk").url)
    assert short["prefill_ms"] == pytest.approx(40.0 + 5.0)


def test_queue_time_counts_the_rest_of_the_running_iteration(procs):
    # a 200 ms prefill is running when the second request arrives about 100 ms into it: that wait is queue time
    url = procs("--mock-time-scale", "1", "--mock-prefill-base-ms", "200", "--mock-max-running", "8").url
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, url + "/generate", {"text": "a", "sampling_params": {"max_new_tokens": 1}})
        time.sleep(0.1)
        second = post(url + "/generate", {"text": "b", "sampling_params": {"max_new_tokens": 1}}).json()
        first = first.result().json()
    t1, t2 = first["meta_info"]["mock_timing"], second["meta_info"]["mock_timing"]
    assert t1["queue_ms"] == 0 and t1["prefill_ms"] == pytest.approx(200.0)
    assert 20.0 < t2["queue_ms"] < 200.0 and t2["prefill_ms"] == pytest.approx(200.0)
