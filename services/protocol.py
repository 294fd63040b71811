"""Wire format of every ZeroMQ message between the services (versioned).

A message is a list of frames: one small JSON header (UTF-8), then zero or more binary
frames holding numpy arrays. The header names the message ``type``, carries the protocol
version ``v`` and, under ``"arrays"``, one ``{"name", "dtype", "shape"}`` entry per binary
frame, in order. Arrays are sent without copying (``copy=False`` on a C-contiguous
buffer) and received as read-only views on the ZeroMQ frame.

ROUTER sockets prepend the peer identity frame; :func:`split_routed` strips it.
"""

from __future__ import annotations

import json

import numpy as np

from adaptive.errors import AdaptiveError

PROTOCOL_VERSION = 1


class ProtocolError(AdaptiveError):
    """A message does not follow the protocol (bad JSON, wrong version, frame mismatch)."""


def encode(msg_type: str, body: dict | None = None,
           arrays: dict[str, np.ndarray] | None = None) -> list:
    """Frames for a message: ``[header JSON, *array buffers]``."""
    header = {"v": PROTOCOL_VERSION, "type": msg_type}
    if body:
        header.update(body)
    frames: list = [b""]
    if arrays:
        specs = []
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            specs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape)})
            frames.append(memoryview(a).cast("B") if a.size else b"")
        header["arrays"] = specs
    frames[0] = json.dumps(header, separators=(",", ":"), default=_json_default).encode()
    return frames


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "__fspath__"):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


#: Bounds on what a received message may ask the receiver to build (a message is input).
MAX_HEADER_BYTES = 4 << 20          # a JSON header larger than this is refused unparsed
MAX_JSON_DEPTH = 64                 # nesting of JSON objects/arrays in a header
MAX_ARRAYS = 64                     # binary frames per message
MAX_ARRAY_DIMS = 8
MAX_ARRAY_BYTES = 1 << 31           # one array (the frame must hold exactly that many bytes)
#: dtype kinds an array may have: bool, signed/unsigned integers, floats, complex (no
#: objects, strings, void/structured or datetimes: np.frombuffer of those is unsafe or
#: meaningless on bytes from the network)
ARRAY_KINDS = frozenset("biufc")


def _frame_bytes(fr) -> bytes:
    if hasattr(fr, "bytes"):
        return fr.bytes
    if isinstance(fr, (bytes, bytearray, memoryview)):
        return bytes(fr)
    raise ProtocolError(f"frame of type {type(fr).__name__} is not bytes")


def _json_depth_ok(raw: bytes, limit: int) -> bool:
    """Whether the JSON text nests objects/arrays at most ``limit`` deep (counted on the
    bytes before parsing, so a 200k-deep document never reaches the recursive parser)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:     # fast path: cannot nest deeper
        return True
    depth = 0
    in_str = esc = False
    for b in raw:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:      # backslash
                esc = True
            elif b == 0x22:      # quote
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return False
        elif b in (0x5D, 0x7D):
            depth -= 1
    return True


def _array_spec(spec, i: int) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(spec, dict):
        raise ProtocolError(f"arrays[{i}] is not an object")
    name, dtype, shape = spec.get("name"), spec.get("dtype"), spec.get("shape")
    if not isinstance(name, str) or not name or len(name) > 128:
        raise ProtocolError(f"arrays[{i}].name must be a non-empty string (<= 128 chars)")
    if not isinstance(dtype, str) or len(dtype) > 16:
        raise ProtocolError(f"arrays[{i}].dtype must be a short string")
    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError) as e:
        raise ProtocolError(f"arrays[{i}].dtype {dtype!r}: {e}") from None
    if dt.kind not in ARRAY_KINDS or dt.hasobject or dt.fields is not None or dt.subdtype:
        raise ProtocolError(f"arrays[{i}].dtype {dtype!r} is not a plain numeric dtype")
    if not isinstance(shape, list) or len(shape) > MAX_ARRAY_DIMS or not all(
            type(n) is int and n >= 0 for n in shape):
        raise ProtocolError(f"arrays[{i}].shape must be a list of at most {MAX_ARRAY_DIMS} "
                            f"non-negative integers")
    n = 1
    for d in shape:
        n *= d
        if n * dt.itemsize > MAX_ARRAY_BYTES:
            raise ProtocolError(f"arrays[{i}] {shape} {dt} exceeds {MAX_ARRAY_BYTES} bytes")
    return name, dt, tuple(shape)


def decode(frames) -> tuple[dict, dict[str, np.ndarray]]:
    """(header dict, arrays) of a message's frames (bytes or zmq.Frame). Any malformed
    message raises :class:`ProtocolError` (never another exception): frames that are not
    bytes, a header that is not a JSON object of bounded size and depth, a wrong version,
    a bad ``arrays`` list, non-numeric dtypes, shapes that do not match their frame."""
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ProtocolError("empty message")
    if len(frames) - 1 > MAX_ARRAYS:
        raise ProtocolError(f"{len(frames) - 1} binary frames (at most {MAX_ARRAYS})")
    raw = _frame_bytes(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes (at most {MAX_HEADER_BYTES})")
    if not _json_depth_ok(raw, MAX_JSON_DEPTH):
        raise ProtocolError(f"header nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(f"header is not JSON: {str(e)[:200]}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("header is not an object with a string 'type'")
    if header.get("v") != PROTOCOL_VERSION or isinstance(header.get("v"), bool):
        raise ProtocolError(f"protocol version {str(header.get('v'))[:20]!r} != "
                            f"{PROTOCOL_VERSION}")
    specs = header.pop("arrays", None)
    if specs is None:
        specs = []
    if not isinstance(specs, list):
        raise ProtocolError("'arrays' must be a list")
    if len(specs) != len(frames) - 1:
        raise ProtocolError(f"header lists {len(specs)} arrays but {len(frames) - 1} "
                            f"binary frames follow")
    arrays = {}
    for i, (spec, fr) in enumerate(zip(specs, frames[1:])):
        name, dt, shape = _array_spec(spec, i)
        if name in arrays:
            raise ProtocolError(f"arrays[{i}]: duplicate name {name!r}")
        buf = fr.buffer if hasattr(fr, "buffer") else fr
        try:
            nbytes = len(memoryview(buf).cast("B"))
        except TypeError:
            raise ProtocolError(f"array {name!r}: frame is not a buffer") from None
        n = 1
        for d in shape:
            n *= d
        if nbytes != n * dt.itemsize:
            raise ProtocolError(f"array {name!r}: {nbytes} bytes for shape {shape} {dt}")
        arrays[name] = np.frombuffer(buf, dtype=dt).reshape(shape) if n else \
            np.zeros(shape, dt)
    return header, arrays


def split_routed(frames) -> tuple[bytes, list]:
    """(identity, remaining frames) of a message received on a ROUTER socket; a REQ
    peer's empty delimiter frame is dropped."""
    if not isinstance(frames, (list, tuple)) or len(frames) < 2:
        raise ProtocolError("routed message without identity")
    ident = _frame_bytes(frames[0])
    rest = list(frames[1:])
    if _frame_bytes(rest[0]) == b"" and len(rest) > 1:
        rest = rest[1:]
    return ident, rest
