"""A lean HTTP/1.1 layer for the router's hot path: an asyncio.Protocol server and a pooled upstream client."""

from hpcserve.http.client import UpstreamPool
from hpcserve.http.upstream import (
    ConnectError, ConnectionLost, NoAnswer, Reply, UpstreamConn, UpstreamError, UpstreamTimeout, Watchdog,
    WorkerStalled,
)
from hpcserve.http.parse import HttpParseError, error_body
from hpcserve.http.server import HttpConnection, HttpServer, Request

__all__ = ["ConnectError", "ConnectionLost", "HttpConnection", "HttpParseError", "HttpServer", "NoAnswer", "Reply",
           "Request", "UpstreamConn", "UpstreamError", "UpstreamPool", "UpstreamTimeout", "Watchdog", "WorkerStalled",
           "error_body"]
