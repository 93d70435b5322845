"""HTTP/1.1 wire helpers shared by the server and the upstream client: head parsing and chunked decoding.

Hand-written because it is the hot path: the head is split with bytes methods implemented in C, and
header names are lower-cased once so lookups are plain dict hits.
"""

from __future__ import annotations

import orjson

MAX_HEAD_BYTES = 64 * 1024

REASONS = {
    100: b"Continue", 200: b"OK", 201: b"Created", 204: b"No Content", 400: b"Bad Request",
    401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 411: b"Length Required", 413: b"Payload Too Large", 415: b"Unsupported Media Type",
    422: b"Unprocessable Entity", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}


class HttpParseError(Exception):
    """Malformed HTTP framing; ``status`` is what a server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.path = b""  # the request's path once known: the error then takes that endpoint's shape


def error_body(status: int, message: str, kind: str, path: bytes = b"") -> bytes:
    """An error in the shape SGLang uses on ``path``: its OpenAI ErrorResponse on /v1/*, its native
    {"error": {...}} elsewhere, so a client parses one shape per endpoint whoever answered."""
    if path[:4] == b"/v1/":
        return orjson.dumps({"object": "error", "message": message, "type": kind, "param": None, "code": status})
    return orjson.dumps({"error": {"message": message, "type": kind, "code": status}})


def parse_headers(lines: list[bytes]) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in (b" ", b"\t"):
            raise HttpParseError("malformed header line")
        name = name.lower()
        value = value.strip()
        if name in headers:
            headers[name] = headers[name] + b", " + value
        else:
            headers[name] = value
    return headers


def parse_request_head(head: bytes) -> tuple[bytes, bytes, bytes, dict[bytes, bytes]]:
    """``head`` excludes the final blank line. Returns (method, target, version, headers)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpParseError("malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpParseError("unsupported HTTP version", 505)
    return method, target, version, parse_headers(lines[1:])


def parse_status_head(head: bytes) -> tuple[int, bytes, dict[bytes, bytes]]:
    """Response head (without the blank line) -> (status, version, headers)."""
    lines = head.split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or not code.isdigit():
        raise HttpParseError("malformed status line")
    return int(code), version, parse_headers(lines[1:])


def content_length(headers: dict[bytes, bytes]) -> int | None:
    raw = headers.get(b"content-length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise HttpParseError("invalid Content-Length")
    return int(raw)


def is_chunked(headers: dict[bytes, bytes]) -> bool:
    te = headers.get(b"transfer-encoding")
    if te is None:
        return False
    if te.lower().rsplit(b",", 1)[-1].strip() != b"chunked":
        raise HttpParseError("unsupported Transfer-Encoding", 501)
    return True


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` decoder.

    ``feed(data)`` returns the payload pieces found so far; ``done`` turns true after the last chunk and its
    trailers; bytes after the end are kept in ``tail``. ``limit`` bounds the total payload.
    """

    __slots__ = ("_buf", "_state", "_left", "total", "limit", "tail")

    def __init__(self, limit: int | None = None) -> None:
        self._buf = b""
        self._state = _SIZE
        self._left = 0
        self.total = 0
        self.limit = limit
        self.tail = b""

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> list[bytes]:
        if self._state == _DONE:
            self.tail += data
            return []
        out: list[bytes] = []
        buf = self._buf + data if self._buf else data
        pos = 0
        n = len(buf)
        while pos < n:
            st = self._state
            if st == _DATA:
                take = min(self._left, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _DATA_END
            elif st == _SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 1024:
                        raise HttpParseError("chunk size line too long")
                    break
                size_s = buf[pos:eol].split(b";", 1)[0].strip()
                try:
                    size = int(size_s, 16)
                except ValueError:
                    raise HttpParseError("invalid chunk size") from None
                pos = eol + 2
                if size == 0:
                    self._state = _TRAILER
                else:
                    self.total += size
                    if self.limit is not None and self.total > self.limit:
                        raise HttpParseError("body too large", 413)
                    self._left = size
                    self._state = _DATA
            elif st == _DATA_END:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise HttpParseError("missing CRLF after chunk data")
                pos += 2
                self._state = _SIZE
            elif st == _TRAILER:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > MAX_HEAD_BYTES:
                        raise HttpParseError("trailers too long")
                    break
                if eol == pos:
                    self._state = _DONE
                pos = eol + 2
            else:  # _DONE
                break
        if self._state == _DONE:
            self.tail = buf[pos:]
            self._buf = b""
        else:
            self._buf = buf[pos:]
        return out


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
