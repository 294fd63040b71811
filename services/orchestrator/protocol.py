"""The clinical protocol of a session (which ``config/goals/<name>.toml`` it is planned with):
chosen at the console's ``start`` or mapped from the scheduled RT Plan through
``config/protocols.toml`` (:mod:`adaptive.optimization.protocols`). The result travels as
``{"name", "source"}`` in the session, its status, the planning task and the provenance."""

from __future__ import annotations

import pydicom

from adaptive.errors import ClinicalProtocolError
from adaptive.optimization.protocols import ProtocolSource, ProtocolTable, protocol_path


def protocol_at_start(name) -> dict | None:
    """The protocol a console ``start`` names (validated against ``config/goals``), or None
    when it names none. :class:`ClinicalProtocolError` for an unknown or invalid name."""
    if name in (None, ""):
        return None
    protocol_path(name)
    return {"name": name, "source": ProtocolSource.CONSOLE}


def protocol_from_plan(rtplan_path: str, table: ProtocolTable) -> dict:
    """The protocol mapped from a scheduled RT Plan's Treatment Protocols or label;
    :class:`ClinicalProtocolError` (naming both and the table) when unmapped or unreadable."""
    try:
        ds = pydicom.dcmread(rtplan_path, stop_before_pixels=True)
    except Exception as e:  # an unreadable plan cannot name a protocol
        raise ClinicalProtocolError(f"cannot read the scheduled plan {rtplan_path}: {e}") from e
    name, source = table.for_plan(str(ds.get("TreatmentProtocols", "") or ""),
                                  str(ds.get("RTPlanLabel", "") or ""))
    return {"name": name, "source": source, "rtplan_sop": str(ds.get("SOPInstanceUID", ""))}
