"""Authentication and authorisation on the services' ZeroMQ sockets (CURVE + ZAP).

Every orchestrator socket is a CURVE server (``curve_server``, its secret key, a ZAP domain);
pyzmq's authenticator thread (:class:`zmq.auth.thread.ThreadAuthenticator`) admits a
connection only if the client's public key is on the allow-list of that socket's domain:

=================  ===============================  ========================================
domain             socket (orchestrator side)        roles admitted
=================  ===============================  ========================================
``workers``        ROUTER ``worker_endpoint``        ``worker``
``gateway``        PULL ``gateway_events_endpoint``  ``gateway``
``console``        ROUTER ``console_endpoint``,      ``therapist``, ``viewer``
                   PUB ``console_events_endpoint``
=================  ===============================  ========================================

A client without a key, or with a key not on the list, completes no handshake: it can send
nothing and receives nothing (events included). The authenticator names each admitted
connection ``<role>:<name>`` (ZAP User-Id); the orchestrator reads it from every console
request (frame property ``User-Id``) and checks the role's permissions
(:data:`CONSOLE_PERMISSIONS`) per request, and the broker binds a worker's identity to the
key that announced it.

Keys live under ``<paths.root>/keys`` (folder 0700, files 0600; secret files with looser
permissions are refused)::

    keys/server/orchestrator.key[_secret]      the orchestrator's key pair
    keys/clients/<role>/<name>.key             allow-list: client public keys by role
    keys/private/<name>.key_secret             a client's key pair (give it to that client)

:meth:`KeyStore.ensure_defaults` creates the server pair and one client of each role
(``worker``, ``gateway``, ``console`` = therapist, ``viewer``) if missing; ``adaptive
serve``, ``adaptive demo``, the tests and the benchmarks call it, so a fresh clone works
with no manual step. ``adaptive keys create NAME --role ROLE`` adds a client, ``adaptive
keys list`` lists them; a worker on another host needs its ``.key_secret`` and the server's
public ``orchestrator.key``. Keys added while the orchestrator runs are accepted within a
second (the allow-list is re-read when an unknown key connects, at most once a second).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from adaptive.errors import AuthenticationError
from adaptive.log import get_logger

ROLES = ("worker", "gateway", "therapist", "viewer")
DOMAINS: dict[str, tuple[str, ...]] = {"workers": ("worker",), "gateway": ("gateway",),
                                       "console": ("therapist", "viewer")}
#: console commands each role may send (docs/console-protocol.md)
CONSOLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"ping", "status", "attach", "review", "planning_data"}),
    "therapist": frozenset({"ping", "status", "attach", "review", "planning_data", "start",
                            "choose", "cancel", "retry-handoff"}),
}
DEFAULT_CLIENTS = (("worker", "worker"), ("gateway", "gateway"), ("console", "therapist"),
                   ("viewer", "viewer"))
SERVER_NAME = "orchestrator"
RELOAD_MIN_S = 1.0        # the allow-list is re-read for an unknown key at most this often


@dataclass(frozen=True)
class ClientKey:
    name: str
    role: str
    public_key: str          # Z85
    path: str                # its public file (allow-list entry)


def _check_private(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthenticationError(f"{path}: secret key readable by others (mode "
                                  f"{stat.S_IMODE(mode):04o}); chmod 600 it")


def _name_ok(name: str) -> bool:
    return bool(name) and len(name) <= 64 and name.replace("-", "").replace(
        "_", "").isalnum() and name.isascii()


class KeyStore:
    """The key files under ``<root>/keys`` (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / "keys"

    # -- layout ------------------------------------------------------------------------
    def _mkdir(self, d: Path) -> Path:
        d.mkdir(parents=True, exist_ok=True)
        for p in [d, *d.parents]:
            if p == self.dir.parent:
                break
            os.chmod(p, 0o700)
        return d

    def server_public(self) -> Path:
        return self.dir / "server" / f"{SERVER_NAME}.key"

    def server_secret(self) -> Path:
        return self.dir / "server" / f"{SERVER_NAME}.key_secret"

    def client_public(self, name: str, role: str) -> Path:
        return self.dir / "clients" / role / f"{name}.key"

    def client_secret(self, name: str) -> Path:
        return self.dir / "private" / f"{name}.key_secret"

    # -- creation ------------------------------------------------------------------------
    def _new_pair(self, public: Path, secret: Path) -> None:
        """Create a key pair at ``public`` / ``secret`` unless ``secret`` exists; atomic
        (hard links of complete files), so concurrent creators agree on one pair."""
        if secret.exists():
            # made before, or being made by another creator right now: its public half
            # follows the secret within microseconds
            self._await_public(public)
            return
        self._mkdir(public.parent)
        self._mkdir(secret.parent)
        tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=self._mkdir(self.dir)))
        try:
            pub, sec = zmq.auth.create_certificates(tmp, "k")
            os.chmod(sec, 0o600)
            os.chmod(pub, 0o600)
            try:
                os.link(sec, secret)
            except FileExistsError:
                # another creator won: use its pair, once its public half is in place too
                self._await_public(public)
                return
            try:
                os.link(pub, public)
            except FileExistsError:
                os.replace(pub, public)   # a stale public file of an earlier pair
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _await_public(public: Path, timeout_s: float = 10.0) -> None:
        """Wait (bounded) for a pair's public half: the creator links it right after the
        secret. A pair whose public half never appears is left for the reader to report."""
        deadline = time.monotonic() + timeout_s
        while not public.exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # bounded poll for the other creator's second link

    def ensure_defaults(self) -> None:
        """The server pair and the default clients (:data:`DEFAULT_CLIENTS`), if missing."""
        self._new_pair(self.server_public(), self.server_secret())
        for name, role in DEFAULT_CLIENTS:
            # not create(): services starting side by side each ensure the defaults, and
            # the one that finds a default being created by another must use that pair,
            # not fail with "exists already"
            self._new_pair(self.client_public(name, role), self.client_secret(name))

    def create(self, name: str, role: str) -> ClientKey:
        """A new client key pair ``name`` with ``role``; refuses an existing name."""
        if role not in ROLES:
            raise AuthenticationError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        if not _name_ok(name):
            raise AuthenticationError(f"key name {name!r}: use 1-64 ASCII letters, digits, "
                                      f"'-' or '_'")
        if self.client_secret(name).exists() or self._find(name) is not None:
            raise AuthenticationError(f"a key named {name!r} exists already")
        self._new_pair(self.client_public(name, role), self.client_secret(name))
        return self._find(name)

    # -- reading ------------------------------------------------------------------------
    def clients(self) -> list[ClientKey]:
        out = []
        for role in ROLES:
            d = self.dir / "clients" / role
            for f in sorted(d.glob("*.key")) if d.is_dir() else []:
                try:
                    pub, _ = zmq.auth.load_certificate(f)
                except (OSError, ValueError):
                    continue
                out.append(ClientKey(f.stem, role, pub.decode(), str(f)))
        return out

    def _find(self, name: str) -> ClientKey | None:
        return next((c for c in self.clients() if c.name == name), None)

    def _load_secret(self, path: Path) -> tuple[bytes, bytes]:
        if not path.is_file():
            raise AuthenticationError(f"no key {path} (create it with `adaptive keys create`)")
        _check_private(path)
        try:
            pub, sec = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as e:
            raise AuthenticationError(f"{path}: unreadable key: {e}") from e
        if not sec:
            raise AuthenticationError(f"{path}: holds no secret key")
        return pub, sec

    def server_keys(self) -> tuple[bytes, bytes]:
        """(public, secret) of the orchestrator."""
        return self._load_secret(self.server_secret())

    def client_keys(self, name: str) -> dict:
        """What a client named ``name`` needs to connect: its pair and the server's public key."""
        pub, sec = self._load_secret(self.client_secret(name))
        try:
            server, _ = zmq.auth.load_certificate(self.server_public())
        except (OSError, ValueError) as e:
            raise AuthenticationError(f"{self.server_public()}: no orchestrator public key: "
                                      f"{e}") from e
        return {"public": pub, "secret": sec, "server": server, "name": name}


def apply_client_keys(sock: zmq.Socket, keys: dict) -> None:
    """Make ``sock`` a CURVE client with ``keys`` (:meth:`KeyStore.client_keys`); call before
    ``connect``."""
    sock.curve_secretkey = keys["secret"]
    sock.curve_publickey = keys["public"]
    sock.curve_serverkey = keys["server"]


def secure_server(sock: zmq.Socket, server_keys: tuple[bytes, bytes], domain: str) -> None:
    """Make ``sock`` a CURVE server in ZAP ``domain``; call before ``bind``."""
    if domain not in DOMAINS:
        raise AuthenticationError(f"unknown ZAP domain {domain!r}")
    pub, sec = server_keys
    sock.curve_secretkey = sec
    sock.curve_publickey = pub
    sock.zap_domain = domain.encode()
    sock.curve_server = True


class _AllowList:
    """ZAP credentials provider: a key is admitted in a domain when its role is."""

    def __init__(self, keys: KeyStore):
        self.keys = keys
        self._lock = threading.Lock()
        self._by_key: dict[bytes, ClientKey] = {}
        self._read_at = -RELOAD_MIN_S
        self.log = get_logger("services.auth")

    def lookup(self, z85_key: bytes) -> ClientKey | None:
        with self._lock:
            c = self._by_key.get(z85_key)
            now = time.monotonic()
            if c is None and now - self._read_at >= RELOAD_MIN_S:
                # a key added since: re-read the allow-list (at most every RELOAD_MIN_S, so
                # strangers trying random keys cannot keep the thread scanning the folder)
                self._read_at = now
                self._by_key = {k.public_key.encode(): k for k in self.keys.clients()}
                c = self._by_key.get(z85_key)
            return c

    def callback(self, domain: str, z85_key: bytes) -> bool:
        c = self.lookup(z85_key)
        ok = c is not None and c.role in DOMAINS.get(domain, ())
        if not ok:
            self.log.warning("curve_client_refused", domain=domain,
                             key=z85_key[:8].decode(errors="replace") + "...",
                             known_as=f"{c.role}:{c.name}" if c else None)
        return ok


class Authenticator(ThreadAuthenticator):
    """pyzmq's authenticator thread with the key store's allow-lists per domain; the ZAP
    User-Id of an admitted connection is ``<role>:<name>``."""

    def __init__(self, context: zmq.Context, keys: KeyStore):
        super().__init__(context)
        self.allow = _AllowList(keys)

    def curve_user_id(self, client_public_key: bytes) -> str:
        c = self.allow.lookup(zmq.utils.z85.encode(client_public_key))
        return f"{c.role}:{c.name}" if c else "unknown:unknown"

    def start(self) -> None:
        super().start()
        for domain in DOMAINS:
            self.configure_curve_callback(domain, credentials_provider=self.allow)


def role_of(user_id: str | None) -> str | None:
    """The role in a ZAP User-Id ``<role>:<name>`` (None when there is none)."""
    if not user_id or ":" not in user_id:
        return None
    role = user_id.split(":", 1)[0]
    return role if role in ROLES else None
