"""A lean HTTP/1.1 layer for the router's hot path: an asyncio.Protocol server and a pooled upstream client."""

from hpcserve.http.client import ConnectError, UpstreamConn, UpstreamError, UpstreamPool, UpstreamTimeout
from hpcserve.http.parse import HttpParseError
from hpcserve.http.server import HttpConnection, HttpServer, Request

__all__ = ["ConnectError", "HttpConnection", "HttpParseError", "HttpServer", "Request", "UpstreamConn",
           "UpstreamError", "UpstreamPool", "UpstreamTimeout"]
