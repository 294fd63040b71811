"""Who may connect to the gateway, associate with it and store what; how many
connections each may hold. Configured by ``[gateway.access]`` and ``[gateway.tls]``
(:class:`services.config.GatewayAccessConfig`, :class:`services.config.GatewayTlsConfig`);
see docs/dicom-gateway.md.

Three gates, each answering a refusal the way the standard names it:

1. **TCP connection** (:class:`ConnectionGuard`, in the accept loop of
   :class:`GatewayServer`): a peer address that is in no configured peer's ``hosts`` is
   closed at once (no thread, no slot). Every other connection is *pending* until its
   association is accepted: at most ``max_pending_per_host`` per address and
   ``max_pending_connections`` in all; a new connection over either limit closes the
   oldest pending one of that address (or of the address holding the most), and a
   pending connection older than the ACSE timeout is closed by :meth:`reap`. A legitimate
   sender sends its A-ASSOCIATE-RQ within milliseconds of connecting, so connections
   that never do (or trickle bytes) cannot hold slots that an imager needs. (pynetdicom
   3.0.4 alone closes a connection that sends nothing after ``acse_timeout``, but one that
   sent part of a PDU is held in a blocking ``recv`` forever: accepted sockets have no
   timeout. :class:`GatewayServer` gives them ``network_timeout_s``.)
2. **A-ASSOCIATE-RQ** (:class:`AdmissionControl`): the calling AE title must be a
   configured peer connecting from one of its ``hosts`` (else A-ASSOCIATE-RJ
   rejected-permanent, service-user, "calling-AE-title-not-recognized"), the called AE
   title ours (else "called-AE-title-not-recognized"), and there must be room: at most
   ``max_associations`` established, ``max_associations_per_peer`` per calling AE title,
   and the last ``reserved_for_imaging`` of them only for peers with the "imaging" role
   (else rejected-transient, service-provider presentation, "local-limit-exceeded").
   (PS3.8 §9.3.4, A-ASSOCIATE-RJ PDU: Result, Source and Reason/Diag.)
3. **C-STORE** (:data:`ROLE_SOP_CLASSES`): a peer may store only the SOP classes of its
   roles, else status 0x0124 "Refused: Not authorized" (PS3.7 Annex C). Every admitted
   peer may C-ECHO.

With TLS configured (:func:`server_ssl_context`), the handshake runs in the
association's own thread under the socket timeout, never in the accept loop (where
pynetdicom would run it, so one silent client could stop every other connection).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from pynetdicom.transport import ThreadedAssociationServer

from services.config import DicomPeer, GatewayAccessConfig, GatewayTlsConfig
from services.gateway.validation import (
    CT_IMAGE,
    DEFORMABLE_REG,
    RT_DOSE,
    RT_PLAN,
    RT_STRUCT,
    SPATIAL_REG,
)

#: Storage SOP classes each role may send.
ROLE_SOP_CLASSES: dict[str, frozenset[str]] = {
    "imaging": frozenset({CT_IMAGE, SPATIAL_REG}),
    "planning": frozenset({CT_IMAGE, RT_STRUCT, RT_PLAN, RT_DOSE, SPATIAL_REG,
                           DEFORMABLE_REG}),
    "verification": frozenset(),
}

STATUS_NOT_AUTHORIZED = 0x0124

# A-ASSOCIATE-RJ (result, source, reason/diag), PS3.8 Table 9-21
RJ_CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
RJ_CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
RJ_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


def _host_ip(address: str):
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return ip.ipv4_mapped if getattr(ip, "ipv4_mapped", None) else ip


class PeerDirectory:
    """The configured peers with their address networks parsed once."""

    def __init__(self, peers: dict[str, DicomPeer]):
        self.peers = dict(peers)
        self._nets = {aet: [ipaddress.ip_network(h, strict=False) for h in p.hosts]
                      for aet, p in peers.items()}

    def host_known(self, address: str) -> bool:
        try:
            ip = _host_ip(address)
        except ValueError:
            return False
        return any(ip in n for nets in self._nets.values() for n in nets)

    def peer(self, calling_ae: str, address: str) -> DicomPeer | None:
        """The peer with this calling AE title if ``address`` is one of its hosts."""
        p = self.peers.get(calling_ae.strip())
        if p is None:
            return None
        try:
            ip = _host_ip(address)
        except ValueError:
            return None
        return p if any(ip in n for n in self._nets[p.ae_title]) else None


def may_store(peer: DicomPeer, sop_class_uid: str) -> bool:
    return any(sop_class_uid in ROLE_SOP_CLASSES[r] for r in peer.roles)


@dataclass(frozen=True)
class Admission:
    """The answer to an A-ASSOCIATE-RQ: ``peer`` when accepted, else the A-ASSOCIATE-RJ
    (result, source, reason/diag) and a short reason code for the event."""

    peer: DicomPeer | None
    reject: tuple[int, int, int] | None = None
    reason: str = ""
    detail: str = ""


class AdmissionControl:
    """Decides on each A-ASSOCIATE-RQ (thread-safe); an accepted association holds its
    slot until its thread ends (released, aborted or dropped)."""

    def __init__(self, access: GatewayAccessConfig, our_ae_title: str, max_associations: int):
        self.cfg = access
        self.directory = PeerDirectory(access.peers)
        self.our_ae_title = our_ae_title.strip()
        self.max_associations = max_associations
        self._lock = threading.Lock()
        self._admitted: dict[int, tuple[threading.Thread, DicomPeer]] = {}

    def _live(self) -> list[DicomPeer]:
        for k in [k for k, (t, _) in self._admitted.items() if not t.is_alive()]:
            del self._admitted[k]
        return [p for _, p in self._admitted.values()]

    def decide(self, assoc: threading.Thread, calling_ae: str, called_ae: str,
               address: str) -> Admission:
        peer = self.directory.peer(calling_ae, address)
        if peer is None:
            return Admission(None, RJ_CALLING_AE_NOT_RECOGNIZED, "calling_ae_not_recognized",
                             f"{calling_ae.strip()!r} from {address} is not an allowed peer")
        if self.cfg.check_called_ae_title and called_ae.strip() != self.our_ae_title:
            return Admission(None, RJ_CALLED_AE_NOT_RECOGNIZED, "called_ae_not_recognized",
                             f"called AE title {called_ae.strip()!r} is not "
                             f"{self.our_ae_title!r}")
        with self._lock:
            live = self._live()
            same = sum(p.ae_title == peer.ae_title for p in live)
            limit = self.max_associations
            if "imaging" not in peer.roles:
                limit -= self.cfg.reserved_for_imaging
            if same >= self.cfg.max_associations_per_peer:
                return Admission(None, RJ_LOCAL_LIMIT_EXCEEDED, "peer_limit",
                                 f"{peer.ae_title} already holds {same} associations "
                                 f"(max_associations_per_peer)")
            if len(live) >= limit:
                return Admission(None, RJ_LOCAL_LIMIT_EXCEEDED, "association_limit",
                                 f"{len(live)} associations open (limit {limit} for "
                                 f"roles {list(peer.roles)})")
            self._admitted[id(assoc)] = (assoc, peer)
        return Admission(peer)

    def peer_of(self, assoc) -> DicomPeer | None:
        with self._lock:
            got = self._admitted.get(id(assoc))
            return got[1] if got is not None and got[0] is assoc else None

    def count(self) -> int:
        with self._lock:
            return len(self._live())


@dataclass
class _Pending:
    sock: socket.socket
    host: str
    since: float


def _shutdown(sock: socket.socket) -> None:
    """Shut a connection down from another thread: its reader sees end-of-stream and the
    association ends (socket.socket.shutdown also for TLS sockets: no TLS state touched)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class ConnectionGuard:
    """Pending connections (accepted, association not yet accepted); see gate 1 in the
    module docstring. ``on_drop(host, reason, age_s)`` is told of every connection it
    closes."""

    def __init__(self, access: GatewayAccessConfig, directory: PeerDirectory,
                 on_drop=None, clock=time.monotonic):
        self.cfg = access
        self.directory = directory
        self.on_drop = on_drop or (lambda host, reason, age_s: None)
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}

    def _prune(self) -> None:
        for k in [k for k, p in self._pending.items() if p.sock.fileno() == -1]:
            del self._pending[k]

    def connection(self, sock: socket.socket, host: str) -> bool:
        """A new TCP connection from ``host``: False to close it at once."""
        if not self.directory.host_known(host):
            self.on_drop(host, "address_not_allowed", 0.0)
            return False
        now = self.clock()
        evict = []
        with self._lock:
            self._prune()
            mine = [p for p in self._pending.values() if p.host == host]
            if len(mine) >= self.cfg.max_pending_per_host:
                evict.append(min(mine, key=lambda p: p.since))
            elif len(self._pending) >= self.cfg.max_pending_connections:
                by_host: dict[str, list[_Pending]] = {}
                for p in self._pending.values():
                    by_host.setdefault(p.host, []).append(p)
                crowd = max(by_host.values(), key=len)
                evict.append(min(crowd, key=lambda p: p.since))
            for p in evict:
                self._pending.pop(id(p.sock), None)
            self._pending[id(sock)] = _Pending(sock, host, now)
        for p in evict:
            _shutdown(p.sock)
            self.on_drop(p.host, "evicted_for_new_connection", round(now - p.since, 3))
        return True

    def admitted(self, sock) -> None:
        """Its association was accepted: no longer pending."""
        with self._lock:
            self._pending.pop(id(sock), None)

    def reap(self, max_age_s: float) -> int:
        """Close pending connections older than ``max_age_s``; returns how many."""
        now = self.clock()
        with self._lock:
            self._prune()
            old = [p for p in self._pending.values() if now - p.since > max_age_s]
            for p in old:
                del self._pending[id(p.sock)]
        for p in old:
            _shutdown(p.sock)
            self.on_drop(p.host, "no_association_within_acse_timeout", round(now - p.since, 3))
        return len(old)

    def pending_count(self) -> int:
        with self._lock:
            self._prune()
            return len(self._pending)


def server_ssl_context(tls: GatewayTlsConfig) -> ssl.SSLContext | None:
    """The gateway's TLS context (TLS 1.2 or later), or None without a certificate."""
    if not tls.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(tls.client_ca))
    return ctx


class GatewayServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with gate 1: the connection guard decides in the
    accept loop, accepted sockets get a timeout, TLS handshakes leave the accept loop."""

    def __init__(self, *args, guard: ConnectionGuard, socket_timeout_s: float, **kwargs):
        self.guard = guard
        self.socket_timeout_s = socket_timeout_s
        super().__init__(*args, **kwargs)

    def get_request(self):
        client, address = self.socket.accept()
        client.settimeout(self.socket_timeout_s)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request, client_address) -> bool:
        return self.guard.connection(request, str(client_address[0]))
