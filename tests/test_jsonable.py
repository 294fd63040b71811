"""Strict JSON conversion and atomic writes."""

import json
from pathlib import Path

import numpy as np

from adaptive.jsonable import to_jsonable, write_json_atomic


def test_numpy_paths_and_non_finite_become_strict_json(tmp_path):
    data = {1: np.float32(1.5), "a": np.arange(3), "p": Path("/x/y"), "nan": float("nan"),
            "inf": np.float64(np.inf), "t": (np.int64(2), None, True), "o": object}
    out = to_jsonable(data)
    assert out["1"] == 1.5 and out["a"] == [0, 1, 2] and out["p"] == "/x/y"
    assert out["nan"] is None and out["inf"] is None and out["t"] == [2, None, True]
    text = json.dumps(out, allow_nan=False)  # would raise on NaN/inf
    write_json_atomic(tmp_path / "r.json", data)
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(text)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind
