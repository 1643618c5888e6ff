"""The safetensors file layout, both ways: dtype codes, the header export writes, and the validated
reader import uses. Written from the documented layout (no safetensors package needed):

    u64 little-endian header length N | N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]},
    "__metadata__": {str: str}}, padded with spaces to a multiple of 8 | the tensors' bytes back to back in
    C order, little-endian.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import torch

from shardckpt.errors import FormatError, UnsupportedValueError

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _code
SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_SAFETENSORS_HEADER = 100 << 20


def safetensors_header(entries: list[tuple[str, torch.dtype, tuple]], metadata: dict[str, str] | None) -> bytes:
    """The header of a safetensors file (its documented layout: u64 little-endian header length N, N bytes of
    JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}} padded with spaces
    to a multiple of 8, then the tensors' bytes back to back in C order, little-endian)."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, dtype, shape in entries:
        if dtype not in SAFETENSORS_DTYPES:
            raise UnsupportedValueError(f"safetensors has no type for {dtype}", key=name)
        n = math.prod(shape) * dtype.itemsize
        obj[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    head = json.dumps(obj, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of a local safetensors file, memory-mapped (copy-on-write), after validating the header:
    known dtypes, shapes matching byte lengths, offsets inside the file, no two tensors sharing bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FormatError("file too short for a safetensors header", file=path)
        n = int.from_bytes(head, "little")
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise FormatError(f"header length {n} is invalid for a {size}-byte file", file=path)
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise FormatError(f"header is not valid JSON: {e}", file=path) from None
    if type(header) is not dict:
        raise FormatError("header must be a JSON object", file=path)
    meta = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    mm = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n, shape=(data_len,)) if data_len else \
        np.empty(0, np.uint8)
    spans, out = [], {}
    for name, e in header.items():
        if type(e) is not dict or e.get("dtype") not in SAFETENSORS_CODES:
            raise FormatError(f"unknown or missing dtype {e.get('dtype') if type(e) is dict else e!r:.40}",
                              key=name, file=path)
        dt = SAFETENSORS_CODES[e["dtype"]]
        shape, offs = e.get("shape"), e.get("data_offsets")
        if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape) or \
                type(offs) is not list or len(offs) != 2 or any(type(o) is not int for o in offs):
            raise FormatError("bad shape or data_offsets", key=name, file=path)
        b, e_ = offs
        if not 0 <= b <= e_ <= data_len or e_ - b != math.prod(shape) * dt.itemsize:
            raise FormatError(f"data_offsets {offs} do not fit shape {shape} of {dt} in {data_len} bytes",
                              key=name, file=path)
        spans.append((b, e_, name))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = torch.from_numpy(mm[b:e_]) if e_ > b else torch.empty(0, dtype=torch.uint8)
        out[name] = raw.view(dt).reshape(shape)
    spans.sort()
    for (_, a_end, a), (b_start, _, b) in zip(spans, spans[1:]):
        if a_end > b_start:
            raise FormatError(f"tensors {a!r} and {b!r} share bytes", file=path)
    return out, meta
