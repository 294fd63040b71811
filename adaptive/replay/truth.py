"""Ground-truth records of the replay cases (``truth.json``) and the precision their
displacement fields are stored with (the DVF files themselves: :mod:`adaptive.geometry.dvf_io`).
"""

from __future__ import annotations

import json
from pathlib import Path

from adaptive.atomic import write_text_atomic
from adaptive.errors import ReplayDataError

#: the replay truth fields are stored rounded to this (mm): ≤ 0.0005 mm from the computed
#: field, 1/5000 of a voxel, and compressed to ~60 % of the size (the repository carries them)
TRUTH_QUANTUM_MM = 1.0 / 1024.0


def write_truth_json(path: str | Path, record: dict) -> Path:
    """Write a truth record (``truth.json``) with sorted keys, atomically."""
    return write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_truth_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ReplayDataError(f"truth record not found [{path}]") from e
    except json.JSONDecodeError as e:
        raise ReplayDataError(f"truth record is not valid JSON: {e} [{path}]") from e
