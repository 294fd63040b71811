"""Typed configuration of the real-time services (``config/services.toml``,
``config/budgets.toml``): pydantic dataclasses whose field defaults are the only defaults,
read with :func:`adaptive.config.load_config` (unknown keys and wrong types are errors naming
the file and the key)."""

from __future__ import annotations

import ipaddress
from dataclasses import field, replace
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator
from pydantic.dataclasses import dataclass

from adaptive.config import (
    CONFIG_MODEL,
    DEFAULT_CBCT_MARKERS,
    Bool,
    Float,
    Int,
    Text,
    config_path,
    load_config,
    load_toml,
    write_toml,
)
from services.validators import validate_ae_title

FSYNC_POLICIES = ("instance", "series", "none")
#: Roles a DICOM peer of the gateway can have (what each may store: services.gateway.access).
DICOM_ROLES = ("imaging", "planning", "verification")


def _ae_title(v: str) -> str:
    ok, why = validate_ae_title(v)
    if not ok:
        raise ValueError(f"{v!r} is not a valid AE title: {why}")
    return v


def _handler(v: str) -> str:
    if ":" not in v:
        raise ValueError(f"expected 'module:function', got {v!r}")
    return v


def _ip_network(v: str) -> str:
    try:
        ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address or network (host names are not "
                         f"accepted)") from None
    return v


AeTitle = Annotated[Text, AfterValidator(_ae_title)]
Handler = Annotated[Text, AfterValidator(_handler)]
Network = Annotated[Text, AfterValidator(_ip_network)]
Seconds = Annotated[Float, Field(ge=0.1)]


@dataclass(config=CONFIG_MODEL)
class PathsConfig:
    """Where the services write (``[paths]``); relative sub-folders are under ``root``."""

    root: Path = Path("var/adaptive")
    store: Path = Path("store")
    quarantine: Path = Path("quarantine")
    outbox: Path = Path("outbox")
    sessions: Path = Path("sessions")

    @field_validator("*", mode="before")
    @classmethod
    def _non_empty_path(cls, v):
        if not isinstance(v, (str, Path)) or not str(v):
            raise ValueError("expected a non-empty path string")
        return v

    @model_validator(mode="after")
    def _under_root(self):
        for name in ("store", "quarantine", "outbox", "sessions"):
            p = getattr(self, name)
            if not p.is_absolute() and not p.is_relative_to(self.root):
                setattr(self, name, self.root / p)
        return self


@dataclass(frozen=True, config=CONFIG_MODEL)
class DicomPeer:
    """An application entity allowed to associate with the gateway: its calling AE title,
    its roles (:data:`DICOM_ROLES`) and the addresses it may connect from (IP addresses
    or networks in CIDR notation)."""

    ae_title: AeTitle
    roles: Annotated[tuple[Literal["imaging", "planning", "verification"], ...],
                     Field(min_length=1)]
    hosts: Annotated[tuple[Network, ...], Field(min_length=1)] = ("127.0.0.1",)


def default_dicom_peers() -> dict[str, DicomPeer]:
    """The loopback peers of ``config/services.toml``: the imaging system, the planning
    system and the supervisor's health check."""
    return {p.ae_title: p for p in (DicomPeer("IMAGER", ("imaging",)),
                                    DicomPeer("TPS", ("planning",)),
                                    DicomPeer("ADAPTIVE_SUPERV", ("verification",)))}


@dataclass(config=CONFIG_MODEL)
class GatewayAccessConfig:
    """Who may associate with the gateway and how many connections each may hold
    (``[gateway.access]``; see docs/dicom-gateway.md). A file's ``peers`` table
    (``[gateway.access.peers.<AE title>]``: roles, hosts) is the whole allow-list."""

    peers: dict[str, DicomPeer] = field(default_factory=default_dicom_peers)
    check_called_ae_title: Bool = True
    max_associations_per_peer: Annotated[Int, Field(ge=1)] = 4   # per calling AE title
    reserved_for_imaging: Annotated[Int, Field(ge=0)] = 2   # of max_associations, imaging only
    max_pending_connections: Annotated[Int, Field(ge=1)] = 16   # without an accepted association
    max_pending_per_host: Annotated[Int, Field(ge=1)] = 8   # the same, per peer address

    @field_validator("peers", mode="before")
    @classmethod
    def _peers_by_title(cls, v):
        """``{AE title: {roles, hosts}}`` (TOML) → ``{AE title: DicomPeer}``."""
        if not isinstance(v, dict):
            raise ValueError("expected a table of AE titles")
        out = {}
        for aet, t in v.items():
            _ae_title(aet)
            out[aet.strip()] = ({"ae_title": aet.strip(), **t} if isinstance(t, dict) else t)
        return out


@dataclass(config=CONFIG_MODEL)
class GatewayTlsConfig:
    """Optional TLS for the gateway (``[gateway.tls]``): PEM certificate and key; with
    ``client_ca`` set, peers must present a certificate signed by that CA. In a file, empty
    strings mean unset and relative paths are relative to the file's folder."""

    certificate: Path | None = None
    private_key: Path | None = None
    client_ca: Path | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _existing_file(cls, v, info: ValidationInfo):
        if v is None or v == "":
            return None
        if not isinstance(v, (str, Path)):
            raise ValueError("expected a path string")
        p = Path(v)
        base = (info.context or {}).get("path")
        if base is not None and not p.is_absolute():
            p = Path(base).parent / p
        if not p.is_file():
            raise ValueError(f"file not found: {p}")
        return p

    @model_validator(mode="after")
    def _complete(self):
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if self.client_ca is not None and self.certificate is None:
            raise ValueError("client_ca needs certificate and private_key")
        return self

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


@dataclass(config=CONFIG_MODEL)
class GatewayConfig:
    """The DICOM gateway (``[gateway]``)."""

    ae_title: AeTitle = "ADAPTIVE_GW"
    host: Text = "127.0.0.1"
    port: Annotated[Int, Field(ge=0)] = 11112            # 0: an ephemeral port
    max_pdu: Annotated[Int, Field(ge=0)] = 1 << 20       # bytes
    idle_timeout_s: Annotated[Float, Field(ge=0.05)] = 2.0
    fsync: Literal["instance", "series", "none"] = "instance"
    max_associations: Annotated[Int, Field(ge=1)] = 8
    acse_timeout_s: Seconds = 10.0
    dimse_timeout_s: Seconds = 30.0
    network_timeout_s: Seconds = 30.0
    access: GatewayAccessConfig = field(default_factory=GatewayAccessConfig)
    tls: GatewayTlsConfig = field(default_factory=GatewayTlsConfig)

    @model_validator(mode="after")
    def _imaging_reserve(self):
        if self.access.reserved_for_imaging >= self.max_associations:
            raise ValueError(f"access.reserved_for_imaging: {self.access.reserved_for_imaging} "
                             f"must be below max_associations ({self.max_associations})")
        return self


@dataclass(config=CONFIG_MODEL)
class OrchestratorConfig:
    """The orchestrator's endpoints, heartbeats and daily-image rule (``[orchestrator]``)."""

    worker_endpoint: Text = "tcp://127.0.0.1:5755"
    gateway_events_endpoint: Text = "tcp://127.0.0.1:5756"
    console_endpoint: Text = "tcp://127.0.0.1:5757"
    console_events_endpoint: Text = "tcp://127.0.0.1:5758"
    heartbeat_interval_s: Annotated[Float, Field(ge=0.01)] = 0.5
    heartbeat_liveness: Annotated[Int, Field(ge=2)] = 6
    max_task_attempts: Annotated[Int, Field(ge=1)] = 3
    cbct_markers: list[Text] = field(default_factory=lambda: list(DEFAULT_CBCT_MARKERS))
    accept_cbct_before_start_s: Annotated[Float, Field(ge=0)] = 600.0

    @field_validator("cbct_markers", mode="after")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [m.upper() for m in v]


#: the production worker handlers (``[workers.handlers]`` overrides them one by one)
DEFAULT_HANDLERS = {"registration": "services.workers.stages:run_registration",
                    "planning": "services.workers.stages:run_planning"}


@dataclass(config=CONFIG_MODEL)
class WorkersConfig:
    """How many stage workers ``adaptive serve`` starts, and their handlers (``[workers]``)."""

    registration: Annotated[Int, Field(ge=0)] = 1
    planning: Annotated[Int, Field(ge=0)] = 1
    max_restarts: Annotated[Int, Field(ge=0)] = 5
    handlers: dict[str, Handler] = field(default_factory=lambda: dict(DEFAULT_HANDLERS))

    @field_validator("handlers", mode="after")
    @classmethod
    def _over_defaults(cls, v: dict[str, str]) -> dict[str, str]:
        return {**DEFAULT_HANDLERS, **v}

    @property
    def counts(self) -> dict[str, int]:
        """Worker processes per service."""
        return {"registration": self.registration, "planning": self.planning}


@dataclass(config=CONFIG_MODEL)
class TmsConfig:
    """The treatment management system, the hand-off target (``[tms]``)."""

    ae_title: AeTitle = "TMS"
    host: Text = "127.0.0.1"
    port: Annotated[Int, Field(ge=1)] = 4242
    calling_ae_title: AeTitle = "ADAPTIVE_SCU"
    acse_timeout_s: Seconds = 5.0
    dimse_timeout_s: Seconds = 5.0
    network_timeout_s: Seconds = 10.0
    retries: Annotated[Int, Field(ge=0)] = 3
    backoff_s: Annotated[Float, Field(ge=0)] = 0.5
    associations: Annotated[Int, Field(ge=1)] = 3   # at most, at once, for a series' slices


@dataclass(config=CONFIG_MODEL)
class ServicesConfig:
    """``config/services.toml``; ``source`` is the file it was read from."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    tms: TmsConfig = field(default_factory=TmsConfig)
    source: Path | None = field(default=None, init=False, repr=False)


@dataclass(config=CONFIG_MODEL)
class StageBudget:
    """One stage's budget (s), the grace after it (s) and what happens when it overruns."""

    budget_s: Annotated[Float, Field(ge=0.01)]
    grace_s: Annotated[Float, Field(ge=0)] = 0.0
    fallback: Literal["", "rigid", "scheduled_only", "best_iterate"] = ""


@dataclass(config=CONFIG_MODEL)
class EndToEndBudget:
    budget_s: Annotated[Float, Field(ge=0.01)]
    exclude_decision_time: Bool = True


#: the fallbacks each stage allows (the hand-off has none)
STAGE_FALLBACKS = {"registration": ("rigid", "scheduled_only"),
                   "planning": ("best_iterate", "scheduled_only"), "handoff": ("",)}


@dataclass(config=CONFIG_MODEL)
class Budgets:
    """``config/budgets.toml``: seconds per stage and end to end."""

    end_to_end: EndToEndBudget
    registration: StageBudget
    planning: StageBudget
    handoff: StageBudget
    source: Path | None = field(default=None, init=False, repr=False)

    @model_validator(mode="after")
    def _fallbacks(self):
        for stage, allowed in STAGE_FALLBACKS.items():
            fb = getattr(self, stage).fallback
            if fb not in allowed:
                raise ValueError(f"{stage}.fallback: {fb!r} is not one of {allowed}")
        return self

    @property
    def end_to_end_s(self) -> float:
        return self.end_to_end.budget_s

    @property
    def exclude_decision_time(self) -> bool:
        return self.end_to_end.exclude_decision_time


def load_services_config(path: str | Path | None = None) -> ServicesConfig:
    """Read ``config/services.toml`` (or ``path``)."""
    path = Path(path) if path else config_path("services.toml")
    cfg = load_config(ServicesConfig, path)
    cfg.source = path
    return cfg


def load_budgets(path: str | Path | None = None) -> Budgets:
    """Read ``config/budgets.toml`` (or ``path``)."""
    path = Path(path) if path else config_path("budgets.toml")
    b = load_config(Budgets, path)
    b.source = path
    return b


__all__ = [
    "DICOM_ROLES",
    "Budgets",
    "DicomPeer",
    "EndToEndBudget",
    "GatewayAccessConfig",
    "GatewayConfig",
    "GatewayTlsConfig",
    "OrchestratorConfig",
    "PathsConfig",
    "ServicesConfig",
    "StageBudget",
    "TmsConfig",
    "WorkersConfig",
    "load_budgets",
    "load_services_config",
    "replace",
]


def write_config_variant(base: str | Path | None, out: str | Path, overrides: dict) -> Path:
    """Write ``out``: the TOML file ``base`` (default config) with ``overrides`` merged in
    table by table (used by tests and ``adaptive demo`` for ephemeral ports/temp paths)."""

    def merge(a: dict, b: dict) -> dict:
        r = dict(a)
        for k, v in b.items():
            r[k] = merge(r.get(k, {}), v) if isinstance(v, dict) else v
        return r

    base = Path(base) if base else config_path("services.toml")
    return write_toml(out, merge(load_toml(base), overrides))


EPHEMERAL_LOCAL_ENDPOINT = "tcp://127.0.0.1:0"


def write_local_config(workdir: str | Path, tms_port: int) -> Path:
    """A services config under ``workdir`` for one machine: the gateway and the four
    orchestrator endpoints on 127.0.0.1 port 0 (each process binds an ephemeral port
    itself and reports it in its ready record; :class:`services.supervisor.ServiceStack`
    reads them), the store in ``workdir/var``, the TMS at ``tms_port`` (used by
    ``adaptive demo`` and the session benchmark). Returns the config path."""
    workdir = Path(workdir)
    return write_config_variant(None, workdir / "services.toml", {
        "paths": {"root": str(workdir / "var")},
        "gateway": {"host": "127.0.0.1", "port": 0},
        "orchestrator": dict.fromkeys(
            ("worker_endpoint", "gateway_events_endpoint", "console_endpoint",
             "console_events_endpoint"), EPHEMERAL_LOCAL_ENDPOINT),
        "tms": {"port": tms_port}})
