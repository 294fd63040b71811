"""Identifier validators (services/validators.py) against independent implementations
and the standard's rules; patient folder names; config of the gateway's access; the
orchestrator refusing a room name that is a path (issue 13 item 6)."""

from __future__ import annotations

import string
import urllib.parse
import warnings

import numpy as np
import pytest
import zmq
from pydicom.uid import UID
from pynetdicom._validators import validate_ae as pynetdicom_validate_ae

from adaptive.config import config_path
from adaptive.errors import ConfigError, InvalidIdentifierError
from services.config import (
    load_budgets,
    load_services_config,
    write_config_variant,
)
from services.gateway.store import patient_folder_name
from services.orchestrator.core import Orchestrator
from services.validators import (
    require,
    validate_ae_title,
    validate_patient_id,
    validate_room,
    validate_session_id,
    validate_uid,
)


def _random_strings(alphabet: str, n: int, max_len: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    chars = list(alphabet)
    return ["".join(rng.choice(chars, size=rng.integers(0, max_len + 1)))
            for _ in range(n)]


def test_uid_validator_agrees_with_pydicom():
    """pydicom's UID.is_valid (an independent implementation of PS3.5 §9.1) on 3000
    random strings of digits and dots (lengths 0-70) and on hand-made edge cases."""
    cases = _random_strings("0123456789.", 2000, 70, 1) + \
        _random_strings("0123456789", 500, 70, 2) + \
        _random_strings("01.", 500, 12, 3) + \
        ["0", "0.0", "00", "1.01", "1.2.3", "1.2.3.", ".1", "1..2", "1" * 64, "1" * 65,
         "1." + "2" * 62, "1." + "2" * 63, "1.2.840.10008.5.1.4.1.1.2", "1.2.a", "1.2/3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in cases:
            assert validate_uid(c)[0] == UID(c).is_valid, c
    ok, why = validate_uid("1.2.03")
    assert not ok and "leading zero" in why
    assert validate_uid(12)[0] is False and validate_uid(None)[0] is False


def test_ae_title_validator_agrees_with_pynetdicom():
    """pynetdicom's own validate_ae on random printable/control/non-ASCII strings; where
    they differ by design: PS3.5 §6.2 AE "A value consisting solely of spaces shall not
    be used" (pynetdicom accepts an empty or all-space title)."""
    alphabet = string.ascii_letters + string.digits + " _-\\\x00\x07\x1b\x7féß"
    for c in _random_strings(alphabet, 3000, 18, 4):
        if not c.strip(" "):
            assert validate_ae_title(c) == (False, "must not be empty or only spaces")
            continue
        assert validate_ae_title(c)[0] == pynetdicom_validate_ae(c)[0], repr(c)


@pytest.mark.parametrize("value, ok", [
    ("PAT001", True), ("  PAT001  ", True), ("A/B/../..", True), ("名前", True),
    ("a\x1bb", True),                     # ESC is allowed in LO (ISO 2022 code extensions)
    ("", False), ("   ", False), ("x" * 65, False), ("a\\b", False), ("a\nb", False),
    ("a\x00b", False), ("a\x7fb", False), (None, False), (123, False),
])
def test_patient_id_follows_the_lo_rules(value, ok):
    """PS3.5 §6.2 LO: 64 characters maximum; "The character code 5CH (the BACKSLASH) shall
    not be present"; "shall not have Control Characters except for ESC"."""
    assert validate_patient_id(value)[0] is ok


@pytest.mark.parametrize("value, ok", [
    ("ROOM1", True), ("DEMO_ROOM", True), ("room-a.2", True), ("x" * 32, True),
    ("x" * 33, False), ("", False), ("/etc/cron.d", False), ("../../tmp", False),
    ("a/b", False), ("a..b", False), (".hidden", False), ("-flag", False),
    ("salle é", False), ("a b", False), ("a\\b", False), (None, False),
])
def test_room_names_are_safe_slugs(value, ok):
    assert validate_room(value)[0] is ok


def test_session_ids_and_require():
    assert validate_session_id("ROOM1-20260101T120000-abcdef")[0]
    assert not validate_session_id("x" * 65)[0]
    assert require(validate_room, "ROOM1", "room") == "ROOM1"
    with pytest.raises(InvalidIdentifierError) as ei:
        require(validate_room, "/abs/path", "room")
    assert ei.value.field == "room" and "'/abs/path'" in str(ei.value)


def test_patient_folder_names_are_injective_single_components():
    """Distinct (valid) patient IDs give distinct names, each one path component that is
    never "." or ".."; decoding with the standard library's unquote gives the ID back."""
    ids = [".", "..", "a/b", "a%2Fb", "a_b", "a b", "a.b", "a%2Eb", "~x", "%7Ex", "A", "a",
           "../../etc", "x" * 64, "é" * 64, "名" * 64, "a\x1bb"]
    names = [patient_folder_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    for pid, name in zip(ids, names):
        assert "/" not in name and "\x00" not in name and name not in (".", "..")
        assert len(name.encode()) <= 255
        if not name.startswith("~"):
            assert urllib.parse.unquote(name) == pid
    assert patient_folder_name("名" * 64).startswith("~")       # too long: hashed


def _config_with(tmp_path, gateway: dict):
    return load_services_config(write_config_variant(None, tmp_path / "s.toml",
                                                     {"gateway": gateway}))


@pytest.mark.parametrize("gateway, message", [
    ({"access": {"typo": 1}}, "unknown key"),
    ({"access": {"peers": {"IMAGER": {"roles": ["imager"]}}}}, "roles"),
    ({"access": {"peers": {"IMAGER": {"roles": ["imaging"], "hosts": ["linac.local"]}}}},
     "not an IP address"),
    ({"access": {"peers": {"TOO_LONG_AE_TITLE_X": {"roles": ["imaging"]}}}}, "AE title"),
    ({"access": {"reserved_for_imaging": 8}}, "below max_associations"),
    ({"tls": {"certificate": "missing.pem", "private_key": "missing.key"}}, "not found"),
    ({"tls": {"typo": ""}}, "unknown key"),
])
def test_gateway_access_config_errors_name_the_key(tmp_path, gateway, message):
    with pytest.raises(ConfigError, match=message):
        _config_with(tmp_path, gateway)


def test_gateway_access_config_peers(tmp_path):
    """A file's peers table is the whole allow-list; a config variant (tests, demo)
    merges into the default one (AE titles with spaces survive the TOML writer)."""
    f = tmp_path / "own.toml"
    f.write_text('[gateway.access.peers."MY LINAC"]\nroles = ["imaging", "planning"]\n'
                 'hosts = ["10.1.2.0/24", "::1"]\n')
    cfg = load_services_config(f)
    assert list(cfg.gateway.access.peers) == ["MY LINAC"]
    peer = cfg.gateway.access.peers["MY LINAC"]
    assert peer.roles == ("imaging", "planning") and peer.hosts == ("10.1.2.0/24", "::1")
    merged = _config_with(tmp_path, {"access": {"peers": {"MY LINAC": {"roles": ["imaging"]}}}})
    assert sorted(merged.gateway.access.peers) == ["ADAPTIVE_SUPERV", "IMAGER", "MY LINAC", "TPS"]
    assert merged.gateway.access.peers["MY LINAC"].hosts == ("127.0.0.1",)


@pytest.fixture
def orchestrator(tmp_path):
    cfg = load_services_config(write_config_variant(None, tmp_path / "s.toml", {
        "paths": {"root": str(tmp_path / "var")},
        "orchestrator": dict.fromkeys(("worker_endpoint", "gateway_events_endpoint", "console_endpoint", "console_events_endpoint"), "tcp://127.0.0.1:0")}))
    # its own context: the ZAP endpoint (inproc://zeromq.zap.01) is per context, and the
    # process-wide one may hold another test's authenticator
    ctx = zmq.Context()
    o = Orchestrator(cfg, load_budgets(config_path("budgets.toml")), context=ctx)
    yield o
    o.close()
    ctx.term()


@pytest.mark.parametrize("room", ["/tmp/adaptive-escape", "../../escape", "a/../../b", None, 7])
def test_orchestrator_refuses_room_names_that_are_paths(orchestrator, tmp_path, room):
    with pytest.raises(InvalidIdentifierError, match="room"):
        orchestrator.handle_command({"cmd": "start", "room": room, "patient_id": "P1"})
    assert not orchestrator.sessions
    with pytest.raises(InvalidIdentifierError, match="patient_id"):
        orchestrator.handle_command({"cmd": "start", "room": "ROOM1", "patient_id": None})
    r = orchestrator.handle_command({"cmd": "start", "room": "ROOM1", "patient_id": "P1"})
    assert validate_session_id(r["session"]["session_id"])[0]
    assert r["session"]["session_id"].startswith("ROOM1-")
