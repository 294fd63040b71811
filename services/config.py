"""Typed configuration of the real-time services (``config/services.toml``,
``config/budgets.toml``), with unknown-key checks so a typo is an error."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from adaptive.config import check_keys, config_path, get_number, load_toml
from adaptive.errors import ConfigError
from services.validators import validate_ae_title

FSYNC_POLICIES = ("instance", "series", "none")


def _str(section: dict, key: str, where: str, default: str | None = None) -> str:
    if key not in section:
        if default is None:
            raise ConfigError(f"{where}: missing required key {key!r}")
        return default
    v = section[key]
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}.{key}: expected a non-empty string, got {v!r}")
    return v


def _ae(section: dict, key: str, where: str, default: str | None = None) -> str:
    v = _str(section, key, where, default)
    ok, why = validate_ae_title(v)
    if not ok:
        raise ConfigError(f"{where}.{key}: {v!r} is not a valid AE title: {why}")
    return v


def _int(section, key, where, minimum=0, default=None) -> int:
    v = get_number(section, key, where, minimum=minimum, default=default)
    if int(v) != v:
        raise ConfigError(f"{where}.{key}: expected an integer, got {section.get(key)!r}")
    return int(v)


@dataclass
class PathsConfig:
    root: Path
    store: Path
    quarantine: Path
    outbox: Path
    sessions: Path


#: Roles a DICOM peer of the gateway can have (what each may store: services.gateway.access).
DICOM_ROLES = ("imaging", "planning", "verification")


@dataclass(frozen=True)
class DicomPeer:
    """An application entity allowed to associate with the gateway: its calling AE title,
    its roles (:data:`DICOM_ROLES`) and the addresses it may connect from (IP addresses
    or networks in CIDR notation)."""

    ae_title: str
    roles: tuple[str, ...]
    hosts: tuple[str, ...] = ("127.0.0.1",)


def default_dicom_peers() -> dict[str, DicomPeer]:
    """The loopback peers of ``config/services.toml``: the imaging system, the planning
    system and the supervisor's health check."""
    return {p.ae_title: p for p in (DicomPeer("IMAGER", ("imaging",)),
                                    DicomPeer("TPS", ("planning",)),
                                    DicomPeer("ADAPTIVE_SUPERV", ("verification",)))}


@dataclass
class GatewayAccessConfig:
    """Who may associate with the gateway and how many connections each may hold
    (``[gateway.access]``; see docs/dicom-gateway.md)."""

    peers: dict[str, DicomPeer] = field(default_factory=default_dicom_peers)
    check_called_ae_title: bool = True
    max_associations_per_peer: int = 4      # established associations per calling AE title
    reserved_for_imaging: int = 2           # of max_associations, usable by imaging peers only
    max_pending_connections: int = 16       # connections without an accepted association
    max_pending_per_host: int = 8           # the same, per peer address


@dataclass
class GatewayTlsConfig:
    """Optional TLS for the gateway (``[gateway.tls]``): PEM certificate and key; with
    ``client_ca`` set, peers must present a certificate signed by that CA."""

    certificate: Path | None = None
    private_key: Path | None = None
    client_ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


@dataclass
class GatewayConfig:
    ae_title: str = "ADAPTIVE_GW"
    host: str = "127.0.0.1"
    port: int = 11112
    max_pdu: int = 1 << 20
    idle_timeout_s: float = 2.0
    fsync: str = "instance"
    max_associations: int = 8
    acse_timeout_s: float = 10.0
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 30.0
    access: GatewayAccessConfig = field(default_factory=GatewayAccessConfig)
    tls: GatewayTlsConfig = field(default_factory=GatewayTlsConfig)


@dataclass
class OrchestratorConfig:
    worker_endpoint: str = "tcp://127.0.0.1:5755"
    gateway_events_endpoint: str = "tcp://127.0.0.1:5756"
    console_endpoint: str = "tcp://127.0.0.1:5757"
    console_events_endpoint: str = "tcp://127.0.0.1:5758"
    heartbeat_interval_s: float = 0.5
    heartbeat_liveness: int = 6
    max_task_attempts: int = 3
    cbct_markers: list[str] = field(default_factory=lambda: ["CBCT", "CONE BEAM", "CONEBEAM"])
    accept_cbct_before_start_s: float = 600.0


@dataclass
class WorkersConfig:
    counts: dict[str, int] = field(default_factory=lambda: {"registration": 1, "planning": 1})
    max_restarts: int = 5
    handlers: dict[str, str] = field(default_factory=lambda: {
        "registration": "services.workers.stages:run_registration",
        "planning": "services.workers.stages:run_planning"})


@dataclass
class TmsConfig:
    ae_title: str = "TMS"
    host: str = "127.0.0.1"
    port: int = 4242
    calling_ae_title: str = "ADAPTIVE_SCU"
    acse_timeout_s: float = 5.0
    dimse_timeout_s: float = 5.0
    network_timeout_s: float = 10.0
    retries: int = 3
    backoff_s: float = 0.5


@dataclass
class ServicesConfig:
    paths: PathsConfig
    gateway: GatewayConfig
    orchestrator: OrchestratorConfig
    workers: WorkersConfig
    tms: TmsConfig
    source: Path | None = None


@dataclass
class StageBudget:
    budget_s: float
    grace_s: float = 0.0
    fallback: str = ""


@dataclass
class Budgets:
    end_to_end_s: float
    exclude_decision_time: bool
    registration: StageBudget
    planning: StageBudget
    handoff: StageBudget
    source: Path | None = None


def load_services_config(path: str | Path | None = None) -> ServicesConfig:
    """Read ``config/services.toml`` (or ``path``)."""
    path = Path(path) if path else config_path("services.toml")
    d = load_toml(path)
    w = str(path)
    check_keys(d, {"paths", "gateway", "orchestrator", "workers", "tms"}, w)

    p = d.get("paths", {})
    check_keys(p, {"root", "store", "quarantine", "outbox", "sessions"}, f"{w}[paths]")
    root = Path(_str(p, "root", f"{w}[paths]", "var/adaptive"))

    def sub(key, default):
        q = Path(_str(p, key, f"{w}[paths]", default))
        return q if q.is_absolute() else root / q

    paths = PathsConfig(root=root, store=sub("store", "store"),
                        quarantine=sub("quarantine", "quarantine"),
                        outbox=sub("outbox", "outbox"), sessions=sub("sessions", "sessions"))

    g = d.get("gateway", {})
    wg = f"{w}[gateway]"
    check_keys(g, {"ae_title", "host", "port", "max_pdu", "idle_timeout_s", "fsync",
                   "max_associations", "acse_timeout_s", "dimse_timeout_s",
                   "network_timeout_s", "access", "tls"}, wg)
    fsync = _str(g, "fsync", wg, "instance")
    if fsync not in FSYNC_POLICIES:
        raise ConfigError(f"{wg}.fsync: {fsync!r} is not one of {FSYNC_POLICIES}")
    gateway = GatewayConfig(
        ae_title=_ae(g, "ae_title", wg, "ADAPTIVE_GW"), host=_str(g, "host", wg, "127.0.0.1"),
        port=_int(g, "port", wg, 0, 11112), max_pdu=_int(g, "max_pdu", wg, 0, 1 << 20),
        idle_timeout_s=get_number(g, "idle_timeout_s", wg, minimum=0.05, default=2.0),
        fsync=fsync, max_associations=_int(g, "max_associations", wg, 1, 8),
        acse_timeout_s=get_number(g, "acse_timeout_s", wg, minimum=0.1, default=10.0),
        dimse_timeout_s=get_number(g, "dimse_timeout_s", wg, minimum=0.1, default=30.0),
        network_timeout_s=get_number(g, "network_timeout_s", wg, minimum=0.1, default=30.0))
    gateway.access = _gateway_access(g.get("access", {}), f"{wg}.access",
                                     gateway.max_associations)
    gateway.tls = _gateway_tls(g.get("tls", {}), f"{wg}.tls", path.parent)

    o = d.get("orchestrator", {})
    wo = f"{w}[orchestrator]"
    check_keys(o, {"worker_endpoint", "gateway_events_endpoint", "console_endpoint",
                   "console_events_endpoint", "heartbeat_interval_s", "heartbeat_liveness",
                   "max_task_attempts", "cbct_markers", "accept_cbct_before_start_s"}, wo)
    markers = o.get("cbct_markers", ["CBCT", "CONE BEAM", "CONEBEAM"])
    if not isinstance(markers, list) or not all(isinstance(m, str) and m for m in markers):
        raise ConfigError(f"{wo}.cbct_markers: expected a list of non-empty strings")
    orch = OrchestratorConfig(
        worker_endpoint=_str(o, "worker_endpoint", wo, OrchestratorConfig.worker_endpoint),
        gateway_events_endpoint=_str(o, "gateway_events_endpoint", wo,
                                     OrchestratorConfig.gateway_events_endpoint),
        console_endpoint=_str(o, "console_endpoint", wo, OrchestratorConfig.console_endpoint),
        console_events_endpoint=_str(o, "console_events_endpoint", wo,
                                     OrchestratorConfig.console_events_endpoint),
        heartbeat_interval_s=get_number(o, "heartbeat_interval_s", wo, minimum=0.01,
                                        default=0.5),
        heartbeat_liveness=_int(o, "heartbeat_liveness", wo, 2, 6),
        max_task_attempts=_int(o, "max_task_attempts", wo, 1, 3),
        cbct_markers=[m.upper() for m in markers],
        accept_cbct_before_start_s=get_number(o, "accept_cbct_before_start_s", wo, minimum=0,
                                              default=600.0))

    wk = d.get("workers", {})
    ww = f"{w}[workers]"
    check_keys(wk, {"registration", "planning", "max_restarts", "handlers"}, ww)
    handlers = dict(WorkersConfig().handlers)
    hs = wk.get("handlers", {})
    if not isinstance(hs, dict):
        raise ConfigError(f"{ww}.handlers: expected a table")
    for k, v in hs.items():
        if not isinstance(v, str) or ":" not in v:
            raise ConfigError(f"{ww}.handlers.{k}: expected 'module:function', got {v!r}")
        handlers[k] = v
    workers = WorkersConfig(
        counts={"registration": _int(wk, "registration", ww, 0, 1),
                "planning": _int(wk, "planning", ww, 0, 1)},
        max_restarts=_int(wk, "max_restarts", ww, 0, 5), handlers=handlers)

    t = d.get("tms", {})
    wt = f"{w}[tms]"
    check_keys(t, {"ae_title", "host", "port", "calling_ae_title", "acse_timeout_s",
                   "dimse_timeout_s", "network_timeout_s", "retries", "backoff_s"}, wt)
    tms = TmsConfig(
        ae_title=_ae(t, "ae_title", wt, "TMS"), host=_str(t, "host", wt, "127.0.0.1"),
        port=_int(t, "port", wt, 1, 4242),
        calling_ae_title=_ae(t, "calling_ae_title", wt, "ADAPTIVE_SCU"),
        acse_timeout_s=get_number(t, "acse_timeout_s", wt, minimum=0.1, default=5.0),
        dimse_timeout_s=get_number(t, "dimse_timeout_s", wt, minimum=0.1, default=5.0),
        network_timeout_s=get_number(t, "network_timeout_s", wt, minimum=0.1, default=10.0),
        retries=_int(t, "retries", wt, 0, 3),
        backoff_s=get_number(t, "backoff_s", wt, minimum=0.0, default=0.5))
    return ServicesConfig(paths=paths, gateway=gateway, orchestrator=orch, workers=workers,
                          tms=tms, source=path)


def _gateway_access(a, where: str, max_associations: int) -> GatewayAccessConfig:
    """``[gateway.access]`` and its ``[gateway.access.peers.<AE title>]`` tables."""
    if not isinstance(a, dict):
        raise ConfigError(f"{where}: expected a table")
    check_keys(a, {"check_called_ae_title", "max_associations_per_peer",
                   "reserved_for_imaging", "max_pending_connections", "max_pending_per_host",
                   "peers"}, where)
    peers = default_dicom_peers()
    if "peers" in a:
        if not isinstance(a["peers"], dict):
            raise ConfigError(f"{where}.peers: expected a table of AE titles")
        peers = {}
        for aet, t in a["peers"].items():
            wp = f"{where}.peers.{aet}"
            ok, why = validate_ae_title(aet)
            if not ok:
                raise ConfigError(f"{wp}: {aet!r} is not a valid AE title: {why}")
            if not isinstance(t, dict):
                raise ConfigError(f"{wp}: expected a table")
            check_keys(t, {"roles", "hosts"}, wp, {"roles"})
            roles = t["roles"]
            if (not isinstance(roles, list) or not roles
                    or any(r not in DICOM_ROLES for r in roles)):
                raise ConfigError(f"{wp}.roles: expected a non-empty list of {DICOM_ROLES}, "
                                  f"got {roles!r}")
            hosts = t.get("hosts", ["127.0.0.1"])
            if not isinstance(hosts, list) or not hosts:
                raise ConfigError(f"{wp}.hosts: expected a non-empty list of addresses")
            for h in hosts:
                try:
                    ipaddress.ip_network(h, strict=False)
                except (TypeError, ValueError):
                    raise ConfigError(f"{wp}.hosts: {h!r} is not an IP address or network "
                                      f"(host names are not accepted)") from None
            peers[aet.strip()] = DicomPeer(aet.strip(), tuple(roles), tuple(hosts))
    called = a.get("check_called_ae_title", True)
    if not isinstance(called, bool):
        raise ConfigError(f"{where}.check_called_ae_title: expected true/false")
    acc = GatewayAccessConfig(
        peers=peers, check_called_ae_title=called,
        max_associations_per_peer=_int(a, "max_associations_per_peer", where, 1, 4),
        reserved_for_imaging=_int(a, "reserved_for_imaging", where, 0, 2),
        max_pending_connections=_int(a, "max_pending_connections", where, 1, 16),
        max_pending_per_host=_int(a, "max_pending_per_host", where, 1, 8))
    if acc.reserved_for_imaging >= max_associations:
        raise ConfigError(f"{where}.reserved_for_imaging: {acc.reserved_for_imaging} must be "
                          f"below max_associations ({max_associations})")
    return acc


def _gateway_tls(t, where: str, base: Path) -> GatewayTlsConfig:
    """``[gateway.tls]``: certificate and private_key (both or neither), client_ca
    optional; relative paths are relative to the config file's folder."""
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: expected a table")
    check_keys(t, {"certificate", "private_key", "client_ca"}, where)
    files = {}
    for key in ("certificate", "private_key", "client_ca"):
        v = t.get(key, "")
        if not isinstance(v, str):
            raise ConfigError(f"{where}.{key}: expected a path string")
        if v:
            p = Path(v) if Path(v).is_absolute() else base / v
            if not p.is_file():
                raise ConfigError(f"{where}.{key}: file not found: {p}")
            files[key] = p
    if ("certificate" in files) != ("private_key" in files):
        raise ConfigError(f"{where}: certificate and private_key go together")
    if "client_ca" in files and "certificate" not in files:
        raise ConfigError(f"{where}.client_ca needs certificate and private_key")
    return GatewayTlsConfig(**files)


def load_budgets(path: str | Path | None = None) -> Budgets:
    """Read ``config/budgets.toml`` (or ``path``)."""
    path = Path(path) if path else config_path("budgets.toml")
    d = load_toml(path)
    w = str(path)
    check_keys(d, {"end_to_end", "registration", "planning", "handoff"}, w,
               required={"end_to_end", "registration", "planning", "handoff"})
    e = d["end_to_end"]
    check_keys(e, {"budget_s", "exclude_decision_time"}, f"{w}[end_to_end]", {"budget_s"})
    excl = e.get("exclude_decision_time", True)
    if not isinstance(excl, bool):
        raise ConfigError(f"{w}[end_to_end].exclude_decision_time: expected true/false")

    def stage(name, fallbacks):
        s = d[name]
        ws = f"{w}[{name}]"
        check_keys(s, {"budget_s", "grace_s", "fallback"}, ws, {"budget_s"})
        fb = s.get("fallback", "")
        if fallbacks and fb not in fallbacks:
            raise ConfigError(f"{ws}.fallback: {fb!r} is not one of {fallbacks}")
        return StageBudget(budget_s=get_number(s, "budget_s", ws, minimum=0.01),
                           grace_s=get_number(s, "grace_s", ws, minimum=0.0, default=0.0),
                           fallback=fb)

    return Budgets(end_to_end_s=get_number(e, "budget_s", f"{w}[end_to_end]", minimum=0.01),
                   exclude_decision_time=excl,
                   registration=stage("registration", ("rigid", "scheduled_only")),
                   planning=stage("planning", ("best_iterate", "scheduled_only")),
                   handoff=stage("handoff", ()), source=path)


__all__ = [
    "DICOM_ROLES",
    "Budgets",
    "DicomPeer",
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


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {type(v).__name__} to TOML")


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _toml_value(k)


def dump_toml(d: dict, prefix: str = "") -> str:
    """TOML text of a nested dict of scalars, lists and tables (enough for our configs)."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d.items()
             if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
            lines += ["", f"[{name}]", dump_toml(v, name)]
    return "\n".join(lines)


def write_config_variant(base: str | Path | None, out: str | Path, overrides: dict) -> Path:
    """Write ``out``: the TOML file ``base`` (default config) with ``overrides`` merged in
    table by table (used by tests and ``adaptive demo`` for ephemeral ports/temp paths)."""

    def merge(a: dict, b: dict) -> dict:
        r = dict(a)
        for k, v in b.items():
            r[k] = merge(r.get(k, {}), v) if isinstance(v, dict) else v
        return r

    base = Path(base) if base else config_path("services.toml")
    d = merge(load_toml(base), overrides)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_toml(d) + "\n")
    return out


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
