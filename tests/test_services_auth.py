"""Keys and roles of the services (issue 13 item 4): key files and their permissions,
``adaptive keys``, concurrent creation agreeing on one pair, a key added while the
orchestrator runs, and the durable store's schema version. The sockets themselves are
exercised in test_services_fuzz.py (strangers, wrong roles, viewer vs therapist)."""

from __future__ import annotations

import os
import stat
import threading

import pytest
import zmq

from adaptive.cli import main as cli
from adaptive.errors import AuthenticationError, ServiceError
from services.auth import (
    CONSOLE_PERMISSIONS,
    DEFAULT_CLIENTS,
    Authenticator,
    KeyStore,
    apply_client_keys,
    role_of,
    secure_server,
)
from services.config import write_config_variant
from services.orchestrator.store import OrchestratorStore
from services.protocol import decode, encode


def test_key_files_are_private_and_loose_ones_refused(tmp_path):
    ks = KeyStore(tmp_path)
    ks.ensure_defaults()
    assert stat.S_IMODE(os.stat(ks.dir).st_mode) == 0o700
    for d in ("server", "clients", "private"):
        assert stat.S_IMODE(os.stat(ks.dir / d).st_mode) == 0o700
    for f in ks.dir.rglob("*.key*"):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    assert {(c.name, c.role) for c in ks.clients()} == {
        ("worker", "worker"), ("gateway", "gateway"), ("console", "therapist"),
        ("viewer", "viewer")}
    k = ks.client_keys("console")
    assert len(k["public"]) == len(k["secret"]) == len(k["server"]) == 40  # Z85 of 32 bytes
    os.chmod(ks.client_secret("console"), 0o644)
    with pytest.raises(AuthenticationError, match="readable by others"):
        ks.client_keys("console")
    with pytest.raises(AuthenticationError, match="no key"):
        ks.client_keys("nobody")
    for name, role in (("x", "admin"), ("../evil", "viewer"), ("console", "viewer")):
        with pytest.raises(AuthenticationError):
            ks.create(name, role)


def test_concurrent_creation_agrees_on_one_pair(tmp_path):
    """Services starting side by side each ensure the default keys: none fails, and each
    can read every default pair as soon as its own call returns."""
    stores = [KeyStore(tmp_path) for _ in range(6)]
    errors: list[BaseException] = []
    seen: list[dict] = []

    def start(s: KeyStore) -> None:
        try:
            s.ensure_defaults()
            seen.append({name: s.client_keys(name) for name, _ in DEFAULT_CLIENTS})
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(seen) == len(stores)
    pairs = {s.server_keys() for s in stores}
    assert len(pairs) == 1
    pub, _ = pairs.pop()
    assert stores[0].client_keys("worker")["server"] == pub
    # every starter got the same default client pairs
    assert all(v == seen[0] for v in seen)


def test_adaptive_keys_command(tmp_path, capsys):
    cfg = write_config_variant(None, tmp_path / "s.toml", {"paths": {"root": str(tmp_path)}})
    assert cli(["keys", "--config", str(cfg), "create", "alice", "--role", "therapist"]) == 0
    assert "alice.key_secret" in capsys.readouterr().out
    assert cli(["keys", "--config", str(cfg), "list"]) == 0
    out = capsys.readouterr().out
    assert "therapist alice" in out and "viewer    viewer" in out
    assert KeyStore(tmp_path).client_keys("alice")["name"] == "alice"


def test_a_key_created_while_running_is_admitted_with_its_role(tmp_path):
    ks = KeyStore(tmp_path)
    ks.ensure_defaults()
    ctx = zmq.Context()
    auth = Authenticator(ctx, ks)
    auth.start()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    secure_server(router, ks.server_keys(), "console")
    port = router.bind_to_random_port("tcp://127.0.0.1")
    try:
        ks.create("bob", "viewer")                     # after the authenticator started
        c = ctx.socket(zmq.DEALER)
        c.setsockopt(zmq.LINGER, 0)
        apply_client_keys(c, ks.client_keys("bob"))
        c.connect(f"tcp://127.0.0.1:{port}")
        c.send_multipart([b"", *encode("request", {"cmd": "status"})])
        assert router.poll(15_000), "the new key was not admitted"
        frames = router.recv_multipart(copy=False)
        assert frames[-1].get("User-Id") == "viewer:bob"
        assert role_of("viewer:bob") == "viewer" and "start" not in CONSOLE_PERMISSIONS["viewer"]
        assert decode([f.bytes for f in frames[2:]])[0]["cmd"] == "status"
        c.close(0)
    finally:
        router.close(0)
        auth.stop()
        ctx.term()


def test_state_store_refuses_another_schema_version(tmp_path):
    st = OrchestratorStore(tmp_path / "o.sqlite3")
    assert st.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    st.db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    st.close()
    with pytest.raises(ServiceError, match="schema version 99"):
        OrchestratorStore(tmp_path / "o.sqlite3")
