"""The parts of perf/router.py that sit on the hot path of the measurement: an instant fake SGLang worker
(canned answers, no JSON parsing) and a closed-loop load generator on raw asyncio protocols. Both are kept as
cheap as possible so that the routers' own cost is what the benchmark shows."""

from __future__ import annotations

import asyncio
import random
import socket
import time

import orjson

TOKENS = ["Hello", " from", " the", " instant", " fake", " worker", ".", "!"]


# ---------------------------------------------------------------- instant fake worker
def fake_answers(role: str) -> dict:
    """Pre-encoded bodies per (path, stream): the fake does no work per request beyond a JSON parse."""
    text = "".join(TOKENS)
    gen = {"text": text, "output_ids": list(range(len(TOKENS))),
           "meta_info": {"id": "x", "finish_reason": {"type": "length", "length": len(TOKENS)},
                         "prompt_tokens": 8, "completion_tokens": len(TOKENS), "cached_tokens": 0}}
    cmpl = {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
            "usage": {"prompt_tokens": 8, "completion_tokens": len(TOKENS), "total_tokens": 8 + len(TOKENS)}}
    chat = {"id": "chat-x", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": cmpl["usage"]}

    def sse(events: list) -> bytes:
        return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"

    acc = ""
    gen_events, cmpl_events, chat_events = [], [], []
    for tok in TOKENS:
        acc += tok
        gen_events.append({"text": acc, "meta_info": gen["meta_info"]})
        cmpl_events.append({"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "fake",
                            "choices": [{"index": 0, "text": tok, "finish_reason": None, "logprobs": None}]})
        chat_events.append({"id": "chat-x", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                            "choices": [{"index": 0, "delta": {"content": tok}, "finish_reason": None}]})
    if role == "prefill":  # what a prefill server returns is not shown to users; keep it small
        small = orjson.dumps({"text": "", "meta_info": {"id": "p"}})
        return {(p, s): small for p in (b"/generate", b"/v1/completions", b"/v1/chat/completions") for s in (0, 1)}
    return {(b"/generate", 0): orjson.dumps(gen), (b"/generate", 1): sse(gen_events),
            (b"/v1/completions", 0): orjson.dumps(cmpl), (b"/v1/completions", 1): sse(cmpl_events),
            (b"/v1/chat/completions", 0): orjson.dumps(chat), (b"/v1/chat/completions", 1): sse(chat_events)}


def http_answer(role: str, stream: bool, data: bytes) -> bytes:
    """A canned answer framed as the fake worker sends it (streams chunked, except a prefill's)."""
    if stream and role != "prefill":
        return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data))
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(data), data)


class _FakeWorker(asyncio.Protocol):
    """Canned answers with the least work per request: the request is framed by Content-Length only and
    never parsed as JSON (a bytes search tells stream from not, and checks the PD bootstrap fields)."""

    def __init__(self, role: str, answers: dict, counts: dict) -> None:
        self.role, self.answers, self.counts, self.buf = role, answers, counts, b""

    def connection_made(self, transport) -> None:
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            at = head.find(b"content-length:")
            n = int(head[at + 15:].split(b"\r\n", 1)[0]) if at > 0 else 0
            if len(buf) < end + 4 + n:
                break
            body, buf = buf[end + 4:end + 4 + n], buf[end + 4 + n:]
            sp = head.find(b" ")
            out.append(self._answer(head[:sp], head[sp + 1:head.find(b" ", sp + 1)], body))
        self.buf = buf
        if out:
            self.t.write(b"".join(out))

    def _answer(self, method: bytes, path: bytes, body: bytes) -> bytes:
        if method == b"get":
            return http_answer(self.role, False, orjson.dumps(self.counts) if path == b"/fake/stats" else b"{}")
        self.counts["requests"] += 1
        if self.role != "both" and b'"bootstrap_room"' not in body:  # a PD router must add it
            self.counts["missing_bootstrap"] += 1
            return b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}"
        stream = 1 if b'"stream":true' in body or b'"stream": true' in body else 0
        data = self.answers.get((path, stream))
        if data is None:
            return b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}"
        return http_answer(self.role, bool(stream), data)


def serve_fake(role: str, port: int) -> None:
    answers = fake_answers(role)
    counts = {"requests": 0, "missing_bootstrap": 0}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: _FakeWorker(role, answers, counts), "127.0.0.1", port, backlog=1024)
        await asyncio.Event().wait()

    import uvloop
    uvloop.run(main())


# ---------------------------------------------------------------- load generator
def _bodies(stream: bool, pd_fields: dict | None, count: int = 256) -> list[bytes]:
    """Pre-encoded request bodies: a shared system prompt with varying tails, like chat traffic (so
    cache_aware has real work), each with its own bootstrap room when the client dispatches PD itself."""
    out = []
    for i in range(count):
        body = {"text": f"You are a helpful assistant. Question {i}: what is {i * 7919} squared?",
                "sampling_params": {"max_new_tokens": 8, "temperature": 0}, "stream": stream}
        if pd_fields:
            body.update(pd_fields, bootstrap_room=random.getrandbits(63))
        out.append(orjson.dumps(body))
    return out


def load_requests(target: dict, stream: bool) -> list[bytes]:
    """The whole HTTP requests the load generator sends to ``target``: with its API key, and with bootstrap
    fields when the generator itself dispatches PD ("direct")."""
    direct = target["kind"] == "direct"
    auth = b"authorization: Bearer %b\r\n" % target["key"].encode() if target.get("key") else b""
    pd = {"bootstrap_host": "127.0.0.1", "bootstrap_port": target.get("bootstrap_port")} if direct else None
    return [b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n%bcontent-length: %d\r\n\r\n%b"
            % (auth, len(b), b) for b in _bodies(stream, pd)]


class _Exchange(asyncio.Protocol):
    """One keep-alive client connection that completes whole responses (Content-Length or chunked)."""

    def __init__(self, on_done) -> None:
        self.on_done, self.buf, self.need = on_done, b"", -1

    def connection_made(self, transport) -> None:
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes) -> None:
        self.buf, self.need = b"", -1
        self.t.write(data)

    def data_received(self, data: bytes) -> None:
        buf = self.buf = self.buf + data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = buf[:end].lower()
            at = head.find(b"content-length:")
            self.need = end + 4 + int(head[at + 15:].split(b"\r\n", 1)[0]) if at > 0 else 0
        if (self.need and len(buf) >= self.need) or (not self.need and buf.endswith(b"\r\n0\r\n\r\n")):
            self.on_done(self, buf)

    def connection_lost(self, exc) -> None:
        self.on_done(self, None)


async def run_load(target: dict, n: int, conc: int, stream: bool) -> tuple[float, list[float], int]:
    """Closed loop: ``conc`` clients each send their next request as soon as the last completed.
    Returns (req/s, latencies in seconds, errors)."""
    loop = asyncio.get_running_loop()
    direct = target["kind"] == "direct"
    reqs = load_requests(target, stream)
    lat: list[float] = []
    state = {"sent": 0, "errors": 0, "left": n}
    finished = loop.create_future()
    perf = time.perf_counter

    def check(resp: bytes | None) -> bool:
        return bool(resp) and resp.startswith(b"HTTP/1.1 200") and (not stream or b"data: [DONE]" in resp)

    class Client:
        def __init__(self) -> None:
            self.pending = 0
            self.ok = True

        def fire(self) -> None:
            if state["sent"] >= n:
                return
            i = state["sent"]
            state["sent"] += 1
            self.t0 = perf()
            data = reqs[i % len(reqs)]
            self.ok = True
            self.pending = len(self.conns)
            for c in self.conns:
                c.send(data)

        def done(self, conn, resp) -> None:
            if self.pending <= 0:
                return
            last = conn is self.conns[-1]
            self.ok = self.ok and (check(resp) if last else bool(resp) and resp.startswith(b"HTTP/1.1 200"))
            self.pending -= 1
            if self.pending == 0:
                lat.append(perf() - self.t0)
                if not self.ok:
                    state["errors"] += 1
                state["left"] -= 1
                if state["left"] == 0 and not finished.done():
                    finished.set_result(None)
                self.fire()

    clients = []
    for _ in range(conc):
        cl = Client()
        ports = [target["prefill_port"], target["decode_port"]] if direct else [target["port"]]
        cl.conns = [(await loop.create_connection(lambda: _Exchange(cl.done), "127.0.0.1", p))[1] for p in ports]
        clients.append(cl)
    t0 = perf()
    for cl in clients:
        cl.fire()
    await asyncio.wait_for(finished, 300)
    wall = perf() - t0
    for cl in clients:
        for c in cl.conns:
            c.t.close()
    return n / wall, lat, state["errors"]


