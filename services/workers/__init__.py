"""Stage workers: long-lived processes serving one service (registration | planning).

Run one with ``python -m services.workers --config config/services.toml --service
registration`` (``adaptive serve`` starts them). The handler is named in
``[workers.handlers]`` as ``module:function`` with signature
``handler(payload: dict, arrays: dict, ctx: TaskContext) -> dict | (dict, arrays)``;
if the function has a ``warm_up`` attribute it is called once before announcing READY
(e.g. the first elastix registration in a fresh process is ~3x slower).
"""

from __future__ import annotations

import importlib

from adaptive.errors import ConfigError


def load_handler(spec: str):
    """The callable named by ``"module:function"``."""
    mod_name, _, fn = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"worker handler {spec!r}: cannot import {mod_name}: {e}") from e
    try:
        return getattr(mod, fn)
    except AttributeError as e:
        raise ConfigError(f"worker handler {spec!r}: {mod_name} has no {fn!r}") from e
