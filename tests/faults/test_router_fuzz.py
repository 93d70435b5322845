"""Hypothesis fuzzing of the router's client API: real routers on 127.0.0.1 (aggregated and PD) in front of
real mock engines get random bodies, methods, paths and headers. Whatever a client sends: never a 5xx,
never a hung connection (every read has a timeout), error answers are JSON, and the router stays up."""

from __future__ import annotations

import json
import os
import socket

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from hpcserve.mock.launch import MockProcess
from router_util import RouterProc, pd_args, start_pd

GENERATE = [b"/generate", b"/v1/completions", b"/v1/chat/completions"]
INFO = [b"/v1/models", b"/health", b"/ready", b"/workers", b"/metrics", b"/model_info", b"/server_info"]
# instant mocks with a small context: a fuzzed max_new_tokens can cost at most 2048 tokens of work
MOCK = ["--context-length", "2048"]
READ_TIMEOUT = 10.0
# CI runs a fixed, moderate set; HPCSERVE_FUZZ_EXAMPLES=2000 hunts with fresh random examples
_HUNT = int(os.environ.get("HPCSERVE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_HUNT or 60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=not _HUNT)


@pytest.fixture(scope="module")
def routers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    procs: list = []
    started: list[RouterProc] = []
    try:
        procs += [MockProcess.start(["--disaggregation-mode", "null", *MOCK], log_dir=tmp, wait="ready")
                  for _ in range(2)]
        pd = start_pd(tmp, 1, 1, extra=MOCK)
        procs += pd
        common = ["--health-interval", "5", "--max-body-bytes", "65536"]
        started.append(RouterProc(["--worker", procs[0].url, "--worker", procs[1].url, *common], tmp))
        started.append(RouterProc([*pd_args(pd), *common], tmp))
        yield started
    finally:
        for r in started:
            r.stop()
        for p in procs:
            p.stop()


def send(port: int, raw: bytes) -> tuple[int, bytes, bytes]:
    """Send raw request bytes and read one whole answer (framed by content-length, chunked encoding or the
    connection's end); a read that waits longer than READ_TIMEOUT fails the test as a hung connection.
    Returns (status, head, body); a chunked body is returned still chunked."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as s:
        s.sendall(raw)
        data = b""

        def more() -> bool:
            nonlocal data
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                raise AssertionError(f"connection hung: no answer within {READ_TIMEOUT} s to {raw[:300]!r} "
                                     f"(got {data[:300]!r})") from None
            data += chunk
            assert len(data) < 64 << 20, "answer too large"
            return bool(chunk)

        while b"\r\n\r\n" not in data:
            if not more():
                break
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 "), (raw[:300], data[:300])
        lower = head.lower()
        start = len(head) + 4
        if raw.startswith(b"HEAD "):
            pass
        elif b"\r\ncontent-length:" in lower:
            n = int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
            while len(data) - start < n and more():
                pass
        elif b"\r\ntransfer-encoding: chunked" in lower:
            while not data.endswith(b"\r\n0\r\n\r\n") and not data[start:].startswith(b"0\r\n\r\n") and more():
                pass
        else:
            while more():
                pass
    return int(head[9:12]), head, data[start:]


def request(method: bytes, path: bytes, body: bytes | None, headers: list[tuple[bytes, bytes]] = (),
            version: bytes = b"HTTP/1.1") -> bytes:
    lines = [b"%b %b %b" % (method, path, version), b"host: 127.0.0.1"]
    lines += [b"%b: %b" % (k, v) for k, v in headers]
    if body is not None:
        lines.append(b"content-length: %d" % len(body))
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def dechunk(body: bytes) -> bytes:
    out, pos = [], 0
    while True:
        eol = body.find(b"\r\n", pos)
        size = int(body[pos:eol].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[eol + 2:eol + 2 + size])
        pos = eol + 4 + size


def check(status: int, head: bytes, body: bytes, raw: bytes) -> None:
    event(f"status {status}")  # pytest --hypothesis-show-statistics: how deep the examples got
    assert status < 500, (status, raw[:400], body[:400])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = dechunk(body)
    if status >= 400 and body:
        doc = json.loads(body)   # errors are JSON: the router's {"error": ...} or the engine's own
        assert "error" in doc or doc.get("object") == "error", doc
    if b"text/event-stream" in lower:
        for line in body.split(b"\n"):
            if line.startswith(b"data: {") and b'"error"' in line[:20]:
                err = json.loads(line[6:])["error"]
                assert int(err.get("code", 400)) < 500, (line, raw[:400])


# ---- values of JSON, of the shapes the API fields take and of every other shape
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                    max_leaves=12)
small_int = st.one_of(st.integers(-3, 40), st.just(2**63), st.floats(-1, 40), junk)
prompt = st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3),
                   st.lists(st.integers(-5, 300), max_size=6), st.lists(st.lists(st.integers(0, 300), max_size=3),
                                                                         max_size=3), junk)
message = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                                           "content": st.one_of(st.text(max_size=20), junk)}), junk)
sampling = st.one_of(st.dictionaries(st.sampled_from(["max_new_tokens", "temperature", "top_p", "seed", "stop",
                                                      "stop_token_ids", "min_new_tokens", "ignore_eos", "n"]),
                                     small_int, max_size=4), junk)
FIELDS = {
    "text": prompt, "input_ids": prompt, "prompt": prompt, "messages": st.one_of(st.lists(message, max_size=3), junk),
    "sampling_params": sampling, "stream": st.one_of(st.booleans(), junk), "max_tokens": small_int,
    "max_completion_tokens": small_int, "temperature": small_int, "top_p": small_int, "n": small_int,
    "seed": small_int, "stop": junk, "return_logprob": st.one_of(st.booleans(), junk), "logprob_start_len": small_int,
    "return_text_in_logprobs": junk, "model": junk, "rid": junk, "stream_options": junk, "logprobs": junk,
    "top_logprobs": small_int, "bootstrap_host": junk, "bootstrap_port": junk, "bootstrap_room": junk,
    "min_tokens": small_int, "ignore_eos": junk, "stop_token_ids": junk,
}
bodies = st.fixed_dictionaries({}, optional=FIELDS)


@FUZZ
@given(path=st.sampled_from(GENERATE), body=bodies, extra=st.dictionaries(st.text(max_size=6), junk, max_size=2),
       ctype=st.sampled_from([b"application/json", b"text/plain", b"", b"application/x-www-form-urlencoded"]))
def test_generate_with_random_json_bodies(routers, path, body, extra, ctype):
    raw_body = json.dumps({**extra, **body}).encode()
    raw = request(b"POST", path, raw_body, [(b"content-type", ctype)] if ctype else [])
    for router in routers:
        check(*send(router.port, raw), raw)


VALID_PROMPT = {b"/generate": {"text": "fuzz"}, b"/v1/completions": {"prompt": "fuzz"},
                b"/v1/chat/completions": {"messages": [{"role": "user", "content": "fuzz"}]}}


@FUZZ
@given(path=st.sampled_from(GENERATE), options=st.dictionaries(st.sampled_from(sorted(FIELDS)), small_int | junk,
                                                               min_size=1, max_size=3),
       stream=st.booleans(), logprob=st.booleans())
def test_generate_valid_prompt_with_random_options(routers, path, options, stream, logprob):
    # a valid prompt and stream/logprob flags: the random options meet the deeper paths (streams, PD merges)
    body = {**VALID_PROMPT[path], "stream": stream, "return_logprob": logprob, "logprobs": logprob, **options}
    body.setdefault("max_tokens", 4)
    raw = request(b"POST", path, json.dumps(body).encode(), [(b"content-type", b"application/json")])
    for router in routers:
        check(*send(router.port, raw), raw)


@FUZZ
@given(path=st.sampled_from(GENERATE), body=st.one_of(
    st.binary(max_size=200), junk.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b"{", b"[]", b"null", b'{"text": NaN}', b'{"text": "a"}{', b"\xff\xfe{}",
                     b'{"text": 1e400}', b'{"text": "a", "sampling_params": {"max_new_tokens": 1e400}}',
                     b'{"text": "\\ud800"}', b'{"text": "x", "stream": true, "sampling_params": []}'])))
def test_generate_with_bytes_that_are_not_a_json_object(routers, path, body):
    raw = request(b"POST", path, body, [(b"content-type", b"application/json")])
    for router in routers:
        check(*send(router.port, raw), raw)


token = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
                min_size=1, max_size=12).map(str.encode)
header_value = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
    lambda s: s.strip().encode())
odd_path = st.one_of(
    st.sampled_from(GENERATE + INFO),
    st.tuples(st.sampled_from(GENERATE + INFO + [b"/", b"//", b"/v1", b"/generate/", b"/GENERATE"]),
              st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20).map(str.encode))
    .map(lambda t: t[0] + t[1]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30).map(str.encode))
# framing headers are left out: a request whose declared length is never sent waits for its body, as it must
free_headers = st.lists(st.tuples(st.one_of(token, st.sampled_from(
    [b"content-type", b"authorization", b"x-request-id", b"accept", b"expect", b"connection", b"host"])),
    header_value).filter(lambda kv: kv[0].lower() not in (b"content-length", b"transfer-encoding")), max_size=4)


@FUZZ
@given(method=st.one_of(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"]), token),
       path=odd_path | st.binary(min_size=1, max_size=20).filter(lambda b: b"\r\n" not in b), headers=free_headers,
       body=st.one_of(st.none(), st.binary(max_size=64), bodies.map(lambda b: json.dumps(b).encode())),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 x"]))
def test_random_methods_paths_and_headers(routers, method, path, headers, body, version):
    raw = request(method, path, body, headers, version)
    for router in routers:
        check(*send(router.port, raw), raw)


def test_info_routes_answer_and_router_still_serves(routers):
    for router in routers:
        for path in INFO:
            status, head, body = send(router.port, request(b"GET", path + b"?x=1&y", None))
            assert status == 200, (path, body[:300])
        ok = request(b"POST", b"/generate", json.dumps({"text": "still here"}).encode())
        status, _, body = send(router.port, ok)
        assert status == 200 and json.loads(body)["text"], body[:300]
        assert router.proc.poll() is None


@pytest.mark.parametrize("raw, status", [
    (b"POST /generate HTTP/2.0\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}", 400),
    (b"POST /generate HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n", 400),
    (b"POST /generate HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400),
    (b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n", 400),
    (b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n{}", 400),
    (b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: 9999999\r\n\r\n", 413),
    (b"GET  /health HTTP/1.1\r\n\r\n", 400),
], ids=["http2", "te-gzip", "bad-chunk", "negative-length", "two-lengths", "too-large", "two-spaces"])
def test_framing_mistakes_get_4xx_and_the_connection_closes(routers, raw, status):
    for router in routers:
        got, head, body = send(router.port, raw)
        assert got == status, (raw[:80], head, body[:200])
        assert b"connection: close" in head.lower() and json.loads(body)["error"]["code"] == status
