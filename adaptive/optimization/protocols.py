"""Clinical protocols: which clinical goals (``config/goals/<name>.toml``) a patient is planned
with. The protocol travels with the patient's session (console ``start``, the task payload,
the provenance of what is written), so a clinic can treat a prostate and a liver at once.

A protocol is named by its goals file's stem (``prostate`` = ``config/goals/prostate.toml``).
It is chosen at the console when the session starts, or mapped from the scheduled RT Plan
through ``config/protocols.toml``: first its Treatment Protocols (300A,0009), then its RT Plan
Label (300A,0002), each looked up in its own table. Anything else is a
:class:`~adaptive.errors.ClinicalProtocolError` naming what was tried and what exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic.dataclasses import dataclass as pydantic_dataclass

from adaptive.config import CONFIG_MODEL, Str, config_path, load_config
from adaptive.errors import ClinicalProtocolError, ConfigError
from adaptive.optimization.goals import ClinicalGoals, load_goals

#: a protocol name is a file stem under config/goals: no paths, no surprises
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ProtocolSource:
    """Where a session's protocol came from (shown at the console, kept in provenance)."""

    CONSOLE = "chosen at console start"
    TREATMENT_PROTOCOLS = "mapped from the scheduled plan's Treatment Protocols"
    PLAN_LABEL = "mapped from the scheduled plan's RT Plan Label"


def goals_dir() -> Path:
    return config_path("goals")


def available_protocols(directory: Path | None = None) -> list[str]:
    """Names of the protocols in ``config/goals`` (sorted)."""
    d = directory or goals_dir()
    return sorted(p.stem for p in d.glob("*.toml"))


def protocol_path(name: str, directory: Path | None = None) -> Path:
    """The goals file of protocol ``name``; :class:`ClinicalProtocolError` (listing the available
    ones) for an invalid or unknown name."""
    avail = available_protocols(directory)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ClinicalProtocolError(f"invalid protocol name {name!r} (available: {', '.join(avail)})")
    p = (directory or goals_dir()) / f"{name}.toml"
    if not p.is_file():
        raise ClinicalProtocolError(f"unknown protocol {name!r}: no {p.name} in {p.parent} "
                            f"(available: {', '.join(avail)})")
    return p


def load_protocol(name: str, directory: Path | None = None) -> ClinicalGoals:
    """The clinical goals of protocol ``name`` (validated: :class:`ClinicalProtocolError` for an
    unknown name, :class:`~adaptive.errors.ConfigError` for a broken goals file)."""
    return load_goals(protocol_path(name, directory))


@pydantic_dataclass(frozen=True, config=CONFIG_MODEL)
class ProtocolFile:
    """``config/protocols.toml``: two optional tables of ``"text" = "protocol"``."""

    treatment_protocols: dict[Str, Str] = field(default_factory=dict)
    plan_labels: dict[Str, Str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProtocolTable:
    """``config/protocols.toml``: ``[treatment_protocols]`` and ``[plan_labels]`` tables
    mapping a scheduled plan's Treatment Protocols / RT Plan Label (exact text) to a protocol
    name. Every target must exist in ``config/goals`` (checked on load)."""

    treatment_protocols: dict[str, str]
    plan_labels: dict[str, str]
    source: str = ""

    @classmethod
    def load(cls, path: str | Path | None = None,
             goals_directory: Path | None = None) -> ProtocolTable:
        path = Path(path) if path else config_path("protocols.toml")
        f = load_config(ProtocolFile, path)
        for key, table in (("treatment_protocols", f.treatment_protocols),
                           ("plan_labels", f.plan_labels)):
            for text, name in table.items():
                try:
                    protocol_path(name, goals_directory)
                except ClinicalProtocolError as e:
                    raise ConfigError(f"{path}: {key}.{text!r}: {e}") from e
        return cls(dict(f.treatment_protocols), dict(f.plan_labels), str(path))

    def for_plan(self, treatment_protocols: str, label: str) -> tuple[str, str]:
        """(protocol, :class:`ProtocolSource` text) for a scheduled plan; :class:`ClinicalProtocolError`
        when neither its Treatment Protocols nor its label is in the table."""
        tp = (treatment_protocols or "").strip()
        if tp and tp in self.treatment_protocols:
            return self.treatment_protocols[tp], ProtocolSource.TREATMENT_PROTOCOLS
        lb = (label or "").strip()
        if lb and lb in self.plan_labels:
            return self.plan_labels[lb], ProtocolSource.PLAN_LABEL
        raise ClinicalProtocolError(
            f"no clinical protocol for this patient: the scheduled plan's Treatment Protocols "
            f"{tp!r} and RT Plan Label {lb!r} are not mapped in {self.source}; start the "
            f"session with a protocol (one of {', '.join(available_protocols())}) or add the "
            f"mapping")
