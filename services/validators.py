"""Validators for identifiers that arrive from outside (DICOM peers, console clients) and
may become file names, folder names or keys: one place, used at every boundary.

In the style of pynetdicom's ``_validators.py``: each ``validate_*`` returns
``(ok, reason)`` with ``reason == ""`` when the value is valid, and never raises;
:func:`require` turns a failure into :class:`~adaptive.errors.InvalidIdentifierError`
naming the field, the value and the rule broken.

The rules, from the DICOM standard where the value is DICOM:

* **UID** (PS3.5 §9.1): "Each component of a UID is a number and shall consist of one or
  more digits. The first digit of each component shall not be zero unless the component is
  a single digit." Components are separated by "." and use the characters 0-9 only;
  "UIDs ... shall not exceed 64 total characters". So a valid UID contains no path
  separator, is never "." or "..", and is a safe file name as it is.
* **AE title** (PS3.5 §6.2, VR AE): at most 16 characters of the default repertoire
  (ASCII) excluding the backslash and control characters; leading and trailing spaces are
  not significant; a value of spaces only is not allowed.
* **Patient ID** (VR LO): at most 64 characters, no backslash (the value delimiter), no
  control characters except ESC (used by ISO 2022 code extensions). Surrounding spaces are
  padding and not significant. It may contain "/" or "..": it never becomes a path as it is
  (see :func:`services.gateway.store.patient_folder_name`).
* **Room names and session ids** (ours): a slug of ASCII letters, digits, ".", "_" and
  "-", starting with a letter or digit, without "..", at most 32 (room) or 64 (session)
  characters: usable as one path component and as a ZeroMQ topic part.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from adaptive.errors import InvalidIdentifierError

UID_MAX_LEN = 64
AE_MAX_LEN = 16
LO_MAX_LEN = 64
ROOM_MAX_LEN = 32
SESSION_ID_MAX_LEN = 64

_UID_COMPONENT = re.compile(r"0|[1-9][0-9]*")
_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ESC = "\x1b"

Result = tuple[bool, str]


def _text_within(value, max_len: int) -> str:
    """Why ``value`` is not a non-empty string of at most ``max_len`` characters ("" if it is)."""
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "must not be empty"
    if len(value) > max_len:
        return f"must not exceed {max_len} characters (has {len(value)})"
    return ""


def validate_uid(value) -> Result:
    """A DICOM UID (PS3.5 §9.1): digits and dots, <= 64 characters, no empty component,
    no leading zero in a component of more than one digit."""
    why = _text_within(value, UID_MAX_LEN)
    if why:
        return False, why
    for i, comp in enumerate(value.split(".")):
        if not comp:
            return False, f"component {i + 1} is empty"
        if not comp.isascii() or not comp.isdigit():
            return False, f"component {i + 1} {comp[:16]!r} is not made of the digits 0-9"
        if not _UID_COMPONENT.fullmatch(comp):
            return False, f"component {i + 1} {comp[:16]!r} has a leading zero"
    return True, ""


def validate_ae_title(value) -> Result:
    """A DICOM AE title (VR AE): 1-16 ASCII characters, no backslash or control
    characters, not only spaces (leading/trailing spaces are not significant)."""
    if not isinstance(value, str):
        return False, "must be a string"
    if len(value) > AE_MAX_LEN:
        return False, f"must not exceed {AE_MAX_LEN} characters (has {len(value)})"
    if not value.strip(" "):
        return False, "must not be empty or only spaces"
    if not value.isascii():
        return False, "must contain ASCII characters only"
    if "\\" in value:
        return False, "must not contain a backslash"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return False, "must not contain control characters"
    return True, ""


def validate_patient_id(value) -> Result:
    """A DICOM Patient ID (VR LO) after removing padding spaces: 1-64 characters, no
    backslash, no control characters except ESC."""
    why = _text_within(value.strip(" ") if isinstance(value, str) else value, LO_MAX_LEN)
    if why:
        return False, why
    v = value.strip(" ")
    if "\\" in v:
        return False, "must not contain a backslash"
    if any((ord(c) < 0x20 and c != _ESC) or 0x7F <= ord(c) < 0xA0 for c in v):
        return False, "must not contain control characters"
    return True, ""


def _validate_slug(value, max_len: int) -> Result:
    why = _text_within(value, max_len)
    if why:
        return False, why
    if not _SLUG.fullmatch(value):
        return False, ("may contain only ASCII letters, digits, '.', '_' and '-', starting "
                       "with a letter or digit")
    if ".." in value:
        return False, "must not contain '..'"
    return True, ""


def validate_room(value) -> Result:
    """A treatment room name: a slug of at most 32 characters (see module docstring)."""
    return _validate_slug(value, ROOM_MAX_LEN)


def validate_session_id(value) -> Result:
    """A session id: a slug of at most 64 characters (see module docstring)."""
    return _validate_slug(value, SESSION_ID_MAX_LEN)


def require(validator: Callable[[object], Result], value, field: str):
    """``value`` if ``validator`` accepts it, else raise
    :class:`~adaptive.errors.InvalidIdentifierError` naming ``field`` and the rule."""
    ok, reason = validator(value)
    if not ok:
        raise InvalidIdentifierError(field, value, reason)
    return value
