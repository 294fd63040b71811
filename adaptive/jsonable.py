"""Turning results (numpy arrays/scalars, paths, nested containers) into strict JSON, and
writing JSON files atomically. One implementation for reports, records and provenance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from adaptive.atomic import write_text_atomic


def to_jsonable(obj):
    """A JSON-serialisable copy of ``obj``: dict keys become str, tuples/arrays lists, numpy
    scalars Python scalars, paths str, non-finite floats None (strict JSON has no NaN/inf);
    anything else is rendered with ``str``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def write_json_atomic(path: str | Path, data, *, indent: int | None = 2,
                      sort_keys: bool = False) -> None:
    """Write ``to_jsonable(data)`` to ``path`` atomically (:mod:`adaptive.atomic`)."""
    write_text_atomic(path, json.dumps(to_jsonable(data), indent=indent, sort_keys=sort_keys)
                      + "\n")
