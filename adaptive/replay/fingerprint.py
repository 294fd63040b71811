"""Content fingerprints that decide whether a replayed fraction is already done.

A fraction's key is the SHA-256 of three parts, each a SHA-256 itself:

* **inputs**: the bytes of every input file (planning CT, RT Struct, RT Plan, daily image,
  Spatial Registration), sorted by their own digests, so the same objects give the same key
  whatever the folder layout or file names (an archive pulled from Orthanc again, a copy);
* **software**: ``adaptive.__version__`` and the source of every module of the package
  (any code change invalidates earlier results);
* **settings**: the replay settings (plan settings, budgets), the clinical goals file used
  and every configuration file the chain reads (``config/**/*.toml`` except the ones that
  only configure the services, the latency budgets and the replay-data generator).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import adaptive
from adaptive.config import CONFIG_DIR

#: config files that do not change what the chain computes
NOT_CHAIN_CONFIG = frozenset({"services.toml", "budgets.toml", "replay.toml"})
_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def combine_digests(digests: Iterable[str]) -> str:
    """Order-independent digest of file digests."""
    h = hashlib.sha256()
    for d in sorted(digests):
        h.update(d.encode())
    return h.hexdigest()


def inputs_digest(files: Iterable[str | Path]) -> str:
    """Layout-independent digest of a set of files (module docstring)."""
    return combine_digests(file_digest(f) for f in files)


@lru_cache(maxsize=1)
def software_digest() -> str:
    """``adaptive.__version__`` + digest of the package's Python source."""
    root = Path(adaptive.__file__).resolve().parent
    h = hashlib.sha256(adaptive.__version__.encode())
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def config_digest(config_dir: Path = CONFIG_DIR) -> str:
    h = hashlib.sha256()
    for p in sorted(config_dir.rglob("*.toml")):
        if p.name in NOT_CHAIN_CONFIG and p.parent == config_dir:
            continue
        h.update(str(p.relative_to(config_dir)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def settings_digest(settings: dict, goals_file: str | Path | None) -> str:
    """Digest of the JSON-able ``settings``, the goals file's content and the chain config."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    if goals_file is not None:
        h.update(Path(goals_file).read_bytes())
    h.update(config_digest().encode())
    return h.hexdigest()


def fraction_key(inputs: str, software: str, settings: str) -> str:
    return hashlib.sha256(f"{inputs}:{software}:{settings}".encode()).hexdigest()
