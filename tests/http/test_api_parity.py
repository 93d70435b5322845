"""Issue 16's eight findings, each against the mock engine directly and through the router (aggregated and
PD): what a client of SGLang 0.5.23 gets is what it gets here, prompt log-probabilities included."""

from __future__ import annotations

import socket

import httpx
import openai
import orjson
import pytest

from hpcserve.mock.launch import MockProcess
from router_util import RouterProc, pd_args, start_pd

MODEL = "parity-model"
FLAGS = ["--served-model-name", MODEL, "--context-length", "160"]
PROMPT = "Paris is the capital of"
ERROR_KEYS = {"object", "message", "type", "param", "code"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("parity")
    procs = start_pd(log_dir, extra=FLAGS)
    routers = []
    try:
        procs.append(MockProcess.start(["--disaggregation-mode", "null", *FLAGS], log_dir=log_dir, wait="ready"))
        agg = procs[-1]
        routers.append(RouterProc(pd_args(procs[:2]) + ["--served-model-name", MODEL], log_dir))
        routers.append(RouterProc(["--worker", agg.url], log_dir))  # no served name: /v1/models* proxied
        yield {"agg": agg.url, "pd": routers[0].url, "router": routers[1].url}
    finally:
        for r in routers:
            r.stop()
        for p in procs:
            p.stop()


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30)


def sse(url: str, path: str, body: dict) -> list[dict]:
    r = post(url, path, {**body, "stream": True})
    assert r.status_code == 200, r.text
    return [orjson.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]


def without_ids(doc):
    """A response minus what differs per request (ids, timestamps, latencies)."""
    if isinstance(doc, dict):
        return {k: without_ids(v) for k, v in doc.items() if k not in ("id", "created", "e2e_latency", "mock_timing")}
    if isinstance(doc, list):
        return [without_ids(x) for x in doc]
    return doc


# ---- finding 1: echo with logprobs returns the prompt's log-probabilities and real offsets, also in PD
@pytest.mark.parametrize("where", ["agg", "router", "pd"])
def test_echo_logprobs_carry_the_prompt_with_offsets(cluster, where):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "echo": True, "logprobs": 2, "temperature": 0}
    r = post(cluster[where], "/v1/completions", body)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    lp = ch["logprobs"]
    n_prompt = r.json()["usage"]["prompt_tokens"]
    assert ch["text"].startswith(PROMPT)
    assert len(lp["tokens"]) == n_prompt + 5 == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert lp["text_offset"][0] == 0 and lp["text_offset"][n_prompt] == len(PROMPT)
    assert "".join(lp["tokens"][:n_prompt]) == PROMPT
    assert lp["token_logprobs"][0] is None and all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert len(lp["top_logprobs"]) == n_prompt + 5 and all(len(t) == 2 for t in lp["top_logprobs"][1:])
    if where != "agg":  # the router (and PD's merge) changes nothing a single aggregated engine returns
        assert without_ids(r.json()) == without_ids(post(cluster["agg"], "/v1/completions", body).json())


def test_pd_echo_logprobs_stream_and_batch_equal_aggregated(cluster):
    body = {"model": MODEL, "prompt": [PROMPT, "Two prompts"], "max_tokens": 4, "echo": True, "logprobs": 1,
            "n": 2, "temperature": 0}
    want = post(cluster["agg"], "/v1/completions", body).json()
    got = post(cluster["pd"], "/v1/completions", body).json()
    assert len(got["choices"]) == 4
    assert without_ids(got) == without_ids(want)
    streamed = {}
    for ev in sse(cluster["pd"], "/v1/completions", body):
        for ch in ev["choices"]:
            acc = streamed.setdefault(ch["index"], {"text": "", "tokens": [], "offsets": [], "top": []})
            acc["text"] += ch["text"]
            if ch["logprobs"]:
                acc["tokens"] += ch["logprobs"]["tokens"]
                acc["offsets"] += ch["logprobs"]["text_offset"]
                acc["top"] += ch["logprobs"]["top_logprobs"]
    assert sorted(streamed) == [0, 1, 2, 3]
    for ch in want["choices"]:
        s = streamed[ch["index"]]
        assert (s["text"], s["tokens"], s["offsets"], s["top"]) == (
            ch["text"], ch["logprobs"]["tokens"], ch["logprobs"]["text_offset"], ch["logprobs"]["top_logprobs"])


@pytest.mark.parametrize("stream", [False, True])
def test_pd_native_generate_merges_input_top_logprobs(cluster, stream):
    body = {"text": [PROMPT, "another one"], "sampling_params": {"max_new_tokens": 3, "temperature": 0},
            "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2, "return_text_in_logprobs": True}
    if stream:
        def last(url):
            out = {}
            for ev in sse(url, "/generate", body):
                out[ev["index"]] = ev
            return [out[i] for i in sorted(out)]
        want, got = last(cluster["agg"]), last(cluster["pd"])
    else:
        want, got = post(cluster["agg"], "/generate", body).json(), post(cluster["pd"], "/generate", body).json()
    assert len(got) == 2
    for g, w in zip(got, want):
        gm, wm = g["meta_info"], w["meta_info"]
        assert len(wm["input_token_logprobs"]) == wm["prompt_tokens"]
        for key in ("input_token_logprobs", "input_top_logprobs", "output_token_logprobs", "output_top_logprobs"):
            assert gm[key] == wm[key], key


# ---- finding 2: n parallel samples
@pytest.mark.parametrize("where", ["agg", "pd"])
def test_n_two_returns_two_choices(cluster, where):
    r = post(cluster[where], "/v1/chat/completions", {"model": MODEL, "n": 2, "max_tokens": 6, "temperature": 1.0,
                                                      "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and all(c["message"]["content"] for c in choices)
    assert r.json()["usage"]["completion_tokens"] == sum(6 for _ in choices)


# ---- finding 3: top-N alternatives, chat and completions, streaming or not
@pytest.mark.parametrize("where", ["agg", "pd"])
def test_top_logprobs_alternatives(cluster, where):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True,
            "top_logprobs": 3, "temperature": 0}
    content = post(cluster[where], "/v1/chat/completions", chat).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert all(c["bytes"] == list(c["token"].encode()) for c in content)
    streamed = [c for ev in sse(cluster[where], "/v1/chat/completions", chat) for ch in ev["choices"]
                if ch["logprobs"] for c in ch["logprobs"]["content"]]
    assert streamed == content
    cmpl = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "logprobs": 3, "temperature": 0}
    lp = post(cluster[where], "/v1/completions", cmpl).json()["choices"][0]["logprobs"]
    assert len(lp["top_logprobs"]) == 4 and all(len(t) == 3 for t in lp["top_logprobs"])
    tops = [t for ev in sse(cluster[where], "/v1/completions", cmpl) for ch in ev["choices"] if ch["logprobs"]
            for t in ch["logprobs"]["top_logprobs"]]
    assert tops == lp["top_logprobs"]


# ---- finding 4: GET /v1/models/{id} at the router (its own served name, or proxied to a worker)
@pytest.mark.parametrize("where", ["agg", "router", "pd"])
def test_models_retrieve(cluster, where):
    client = openai.OpenAI(base_url=cluster[where] + "/v1", api_key="x", max_retries=0, timeout=10)
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other-model")
    r = httpx.get(cluster[where] + "/v1/models/other-model", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# ---- finding 5: what SGLang refuses is refused, with its error body
REFUSED = [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens must be positive"),
    ("/v1/completions", {"prompt": ""}, "Prompt cannot be empty"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "'role' must be one of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "valid string"),
    ("/v1/chat/completions", {"model": MODEL + ":my-adapter", "messages": [{"role": "user", "content": "x"}]},
     "LoRA is not enabled"),
]


@pytest.mark.parametrize("where", ["agg", "router", "pd"])
@pytest.mark.parametrize("path,body,words", REFUSED, ids=["max_tokens0", "empty", "role", "null", "lora"])
def test_sglang_refusals(cluster, where, path, body, words):
    r = post(cluster[where], path, {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    doc = r.json()
    assert set(doc) == ERROR_KEYS and doc["object"] == "error" and doc["code"] == 400
    assert words in doc["message"]


# ---- finding 6: chat without max_tokens runs to the end of the context, not 16 tokens
@pytest.mark.parametrize("where", ["agg", "pd"])
def test_chat_default_max_tokens_is_the_rest_of_the_context(cluster, where):
    r = post(cluster[where], "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 160 - usage["prompt_tokens"] > 16


# ---- finding 7: the router's own errors on /v1/* have the engine's shape
@pytest.mark.parametrize("where", ["router", "pd"])
def test_router_errors_on_v1_have_sglang_shape(cluster, where):
    url = cluster[where]
    bad_json = httpx.post(url + "/v1/completions", content=b"{not json", timeout=5,
                          headers={"content-type": "application/json"})
    not_object = post(url, "/v1/chat/completions", [1, 2])  # type: ignore[arg-type]
    no_route = httpx.get(url + "/v1/embeddings", timeout=5)
    engine = post(url, "/v1/completions", {"prompt": ""})
    for r, status in ((bad_json, 400), (not_object, 400), (no_route, 404), (engine, 400)):
        assert r.status_code == status, r.text
        doc = r.json()
        assert set(doc) == ERROR_KEYS and doc["object"] == "error" and doc["code"] == status, doc
    native = httpx.post(url + "/generate", content=b"{not json", timeout=5)
    assert native.status_code == 400 and set(native.json()) == {"error"}  # native paths keep SGLang's native shape


# ---- finding 8: a request with both Content-Length and Transfer-Encoding is answered 400 and the
# connection closed (RFC 9112 6.3), so a smuggled second request is never served
@pytest.mark.parametrize("where", ["agg", "router", "pd"])
def test_framing_error_closes_the_connection(cluster, where):
    port = int(cluster[where].rsplit(":", 1)[1])
    body = b'{"text": "x"}'
    smuggle = (b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
               b"transfer-encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\nGET /health HTTP/1.1\r\nhost: x\r\n\r\n"
               % (len(body) + 5, len(body), body))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(smuggle)
        data = b""
        while True:
            part = s.recv(65536)  # the server closes: recv returns b"" (a hang would time out the test)
            if not part:
                break
            data += part
    assert data.startswith(b"HTTP/1.1 400 ") and data.count(b"HTTP/1.1 ") == 1
    assert b"connection: close" in data.lower()


@pytest.mark.parametrize("where", ["router", "pd"])
@pytest.mark.parametrize("path, shape", [(b"/v1/completions", ERROR_KEYS), (b"/generate", {"error"})])
def test_framing_error_has_the_endpoints_error_shape(cluster, where, path, shape):
    """A framing error is answered in the error shape of the path the request named, like every other
    router error: OpenAI's ErrorResponse on /v1/*, SGLang's native object elsewhere."""
    port = int(cluster[where].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST %b HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n" % path)
        data = b""
        while part := s.recv(65536):
            data += part
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    doc = orjson.loads(body)
    assert set(doc) == shape, doc
    message = doc["message"] if "message" in doc else doc["error"]["message"]
    assert "Transfer-Encoding" in message


def test_a_handler_crash_answers_in_the_endpoints_error_shape():
    """The HTTP layer's own 500 (a handler raised) has SGLang's OpenAI shape on /v1/* and the native one
    elsewhere, and closes the connection."""
    import asyncio

    from hpcserve.http import HttpServer

    def crash(req, conn):
        raise RuntimeError("boom")

    async def main():
        server = HttpServer(crash)
        port = await server.start("127.0.0.1", 0)
        out = {}
        try:
            for path in ("/v1/completions", "/generate"):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"POST %b HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}" % path.encode())
                data = await asyncio.wait_for(r.read(), 10)  # read() ends: the server closed the connection
                w.close()
                out[path] = data
        finally:
            await server.stop()
        return out

    out = asyncio.run(main())
    for path, data in out.items():
        assert data.startswith(b"HTTP/1.1 500 ")
        doc = orjson.loads(data.split(b"\r\n\r\n", 1)[1])
        if path.startswith("/v1/"):
            assert set(doc) == ERROR_KEYS and doc["code"] == 500
        else:
            assert set(doc) == {"error"} and doc["error"]["code"] == 500
