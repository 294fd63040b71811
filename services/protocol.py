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


def decode(frames) -> tuple[dict, dict[str, np.ndarray]]:
    """(header dict, arrays) of a message's frames (bytes or zmq.Frame)."""
    if not frames:
        raise ProtocolError("empty message")
    first = frames[0]
    raw = first.bytes if hasattr(first, "bytes") else bytes(first)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"header is not JSON: {e}") from e
    if not isinstance(header, dict) or "type" not in header:
        raise ProtocolError("header has no 'type'")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r} != {PROTOCOL_VERSION}")
    specs = header.pop("arrays", []) or []
    if len(specs) != len(frames) - 1:
        raise ProtocolError(f"header lists {len(specs)} arrays but {len(frames) - 1} "
                            f"binary frames follow")
    arrays = {}
    for spec, fr in zip(specs, frames[1:]):
        buf = fr.buffer if hasattr(fr, "buffer") else fr
        dt = np.dtype(spec["dtype"])
        shape = tuple(spec["shape"])
        n = int(np.prod(shape)) if shape else 1
        if len(memoryview(buf)) != n * dt.itemsize:
            raise ProtocolError(f"array {spec['name']!r}: {len(memoryview(buf))} bytes for "
                                f"shape {shape} {dt}")
        arrays[spec["name"]] = np.frombuffer(buf, dtype=dt).reshape(shape) if n else \
            np.zeros(shape, dt)
    return header, arrays


def split_routed(frames) -> tuple[bytes, list]:
    """(identity, remaining frames) of a message received on a ROUTER socket; a REQ
    peer's empty delimiter frame is dropped."""
    if len(frames) < 2:
        raise ProtocolError("routed message without identity")
    ident = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
    rest = list(frames[1:])
    first = rest[0].bytes if hasattr(rest[0], "bytes") else bytes(rest[0])
    if first == b"" and len(rest) > 1:
        rest = rest[1:]
    return ident, rest
