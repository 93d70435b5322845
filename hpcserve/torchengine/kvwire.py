"""Binary wire format of one request's KV cache: the raw tensor bytes behind a small JSON header.

    b"HPKV" | u32 little-endian header length | header JSON | payload

The header has dtype, shape [layers, 2, kv_heads, seq, head_dim] and request metadata; the payload is the
stacked cache in C order. Unpacking views the received buffer without another copy.
"""

from __future__ import annotations

import json
import struct
import warnings

import torch

from hpcserve.torchengine.model import KVCache

MAGIC = b"HPKV"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class WireError(ValueError):
    pass


def pack(cache: KVCache, meta: dict) -> bytes:
    stacked = torch.stack([torch.stack([k, v]) for k, v in cache]).contiguous()
    dtype = str(stacked.dtype).removeprefix("torch.")
    header = json.dumps({"dtype": dtype, "shape": list(stacked.shape), "meta": meta}).encode()
    # a uint8 view keeps bfloat16 (which numpy lacks) serialisable too
    return b"".join((MAGIC, struct.pack("<I", len(header)), header, stacked.view(torch.uint8).numpy().tobytes()))


def unpack(data: bytes) -> tuple[KVCache, dict]:
    if len(data) < 8 or data[:4] != MAGIC:
        raise WireError("not a KV payload (bad magic)")
    (hlen,) = struct.unpack_from("<I", data, 4)
    try:
        header = json.loads(data[8:8 + hlen])
        dtype, shape = _DTYPES[header["dtype"]], tuple(header["shape"])
    except (ValueError, KeyError, TypeError) as err:
        raise WireError(f"bad KV header: {err}") from None
    body = memoryview(data)[8 + hlen:]
    numel = 1
    for s in shape:
        numel *= s
    if len(body) != numel * torch.empty((), dtype=dtype).element_size():
        raise WireError(f"KV payload has {len(body)} bytes, header says shape {list(shape)} {header['dtype']}")
    with warnings.catch_warnings():       # the buffer is read-only; the cache is only read (cat makes new tensors)
        warnings.simplefilter("ignore")
        stacked = torch.frombuffer(body, dtype=dtype).view(shape) if numel else torch.empty(shape, dtype=dtype)
    return [(stacked[i, 0], stacked[i, 1]) for i in range(shape[0])], header["meta"]
