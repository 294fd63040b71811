"""Configuration: finding ``config/``, reading TOML, validating it against typed models, and
writing TOML, with clear errors (file, key, what was expected).

Every configuration file is read into a typed model: a pydantic dataclass built with
:data:`CONFIG_MODEL` (unknown keys are errors, so a typo is not a silent default) whose field
defaults are the one place a default is written. Scalars use the strict types below (a TOML
string is not an integer, ``1`` is not ``true``; a TOML integer is accepted as a float).
:func:`load_config` turns a validation failure into a :class:`ConfigError` naming the file
and the key (``file: gateway.access.peers.IMAGER.roles: ...``).

``config/`` is the repository's folder in a source checkout and package data
(``adaptive/_config``, copied at build time by ``setup.py``) in an installed wheel;
``$ADAPTIVE_CONFIG_DIR`` overrides both.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import tomli_w
from pydantic import AfterValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError

from adaptive.atomic import write_text_atomic
from adaptive.errors import ConfigError

#: where ``config/`` is in a source checkout (also the editable install)
SOURCE_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
#: where ``config/`` is in an installed wheel (package data)
PACKAGED_CONFIG_DIR = Path(__file__).resolve().parent / "_config"


def config_dir() -> Path:
    """The configuration folder: ``$ADAPTIVE_CONFIG_DIR``, else the source checkout's
    ``config/``, else the copy installed with the package."""
    env = os.environ.get("ADAPTIVE_CONFIG_DIR")
    if env:
        return Path(env)
    if SOURCE_CONFIG_DIR.is_dir():
        return SOURCE_CONFIG_DIR
    if PACKAGED_CONFIG_DIR.is_dir():
        return PACKAGED_CONFIG_DIR
    raise ConfigError(f"no config folder: neither {SOURCE_CONFIG_DIR} (source checkout) nor "
                      f"{PACKAGED_CONFIG_DIR} (installed package); set ADAPTIVE_CONFIG_DIR")


def config_path(*parts: str) -> Path:
    """Path of a file under the configuration folder (:func:`config_dir`)."""
    return config_dir().joinpath(*parts)


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e


def write_toml(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` (tables, lists, strings, numbers, booleans; :class:`Path` values as
    strings) as TOML with tomli-w, to a temporary name renamed into place."""
    path = Path(path)
    try:
        text = tomli_w.dumps(_toml_ready(data))
    except TypeError as e:
        raise ConfigError(f"cannot write {path} as TOML: {e}") from e
    return write_text_atomic(path, text)


def _toml_ready(v):
    if isinstance(v, Mapping):
        return {str(k): _toml_ready(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_toml_ready(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


#: the series markers of a daily image (``[orchestrator] cbct_markers`` of services.toml):
#: the default of the services' model and of the replay's daily-image rule (two layers)
DEFAULT_CBCT_MARKERS = ("CBCT", "CONE BEAM", "CONEBEAM")


# --- typed models ---------------------------------------------------------------------------

#: the configuration of every config model: unknown keys are errors
CONFIG_MODEL = ConfigDict(extra="forbid")

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]   # a TOML integer is accepted
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
#: a non-empty string
Text = Annotated[str, Field(strict=True, min_length=1)]


def _increasing_pair(v: tuple[float, float]) -> tuple[float, float]:
    if v[0] >= v[1]:
        raise ValueError(f"expected [low, high] with low < high, got {list(v)}")
    return v


#: ``[low, high]`` numbers with low < high (a range of positions, ratios, HU, ...)
Interval = Annotated[tuple[Float, Float], AfterValidator(_increasing_pair)]

T = TypeVar("T")


def validate_config(model: type[T], data: Any, where: str | Path, *,
                    context: dict | None = None, key_names: Mapping[str, str] | None = None
                    ) -> T:
    """``data`` (parsed TOML) as ``model``; a :class:`ConfigError` naming ``where`` and the
    key path of every problem otherwise. ``context`` is handed to the model's validators
    (e.g. the config file's folder, for relative paths); ``key_names`` renames top-level
    keys in messages (a model read from several tables: field → ``table.field``)."""
    try:
        return TypeAdapter(model).validate_python(data, context=context)
    except ValidationError as e:
        raise config_error(where, e, key_names) from None


def load_config(model: type[T], path: str | Path, *, context: dict | None = None) -> T:
    """Read the TOML file ``path`` into ``model`` (:func:`validate_config`); the validators
    get ``context`` plus ``{"path": path}``."""
    path = Path(path)
    return validate_config(model, load_toml(path), path,
                           context={"path": path, **(context or {})})


def config_error(where: str | Path, e: ValidationError,
                 key_names: Mapping[str, str] | None = None) -> ConfigError:
    """One line per problem: ``where: dotted.key: message (got value)``."""
    lines = []
    for err in e.errors(include_url=False):
        parts = [str(p) for p in err["loc"] if p != "__root__"]
        if parts and key_names:
            parts[0] = key_names.get(parts[0], parts[0])
        loc = ".".join(parts) or "(top level)"
        kind = err["type"]
        if kind in ("unexpected_keyword_argument", "extra_forbidden"):
            lines.append(f"{loc}: unknown key")
            continue
        if kind == "missing" or kind == "missing_argument":
            lines.append(f"{loc}: missing required key")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        lines.append(f"{loc}: {msg}{shown}")
    return ConfigError(f"{where}: " + "; ".join(lines))
