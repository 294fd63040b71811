"""Loading TOML configuration with clear errors (file, key, what was expected).

Every config reader checks for unknown keys so a typo is an error, not a silent default.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from adaptive.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


def config_path(*parts: str) -> Path:
    """Path of a file under the repository's ``config/`` folder."""
    return CONFIG_DIR.joinpath(*parts)


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e


def check_keys(section: dict, allowed: set[str] | list[str], where: str,
               required: set[str] | list[str] = ()) -> None:
    """Raise :class:`ConfigError` on unknown or missing keys of ``section``."""
    allowed = set(allowed)
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(set(required) - set(section))
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")


def get_number(section: dict, key: str, where: str, *, minimum: float | None = None,
               maximum: float | None = None, default: float | None = None) -> float:
    if key not in section:
        if default is None:
            raise ConfigError(f"{where}: missing required key {key!r}")
        return default
    v = section[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}.{key}: expected a number, got {v!r}")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{where}.{key}: {v} is below the minimum {minimum}")
    if maximum is not None and v > maximum:
        raise ConfigError(f"{where}.{key}: {v} is above the maximum {maximum}")
    return float(v)
