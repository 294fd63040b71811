"""The clinical protocol of a session (which ``config/goals/<name>.toml`` it is planned with):
chosen at the console's ``start`` or mapped from the scheduled RT Plan through
``config/protocols.toml`` (:mod:`adaptive.optimization.protocols`). The result travels as
``{"name", "source"}`` in the session, its status, the planning task and the provenance."""

from __future__ import annotations

from adaptive.optimization.protocols import ProtocolSource, ProtocolTable, protocol_path


def protocol_at_start(name) -> dict | None:
    """The protocol a console ``start`` names (validated against ``config/goals``), or None
    when it names none. :class:`ClinicalProtocolError` for an unknown or invalid name."""
    if name in (None, ""):
        return None
    protocol_path(name)
    return {"name": name, "source": ProtocolSource.CONSOLE}


def protocol_from_plan(rtplan: dict, table: ProtocolTable) -> dict:
    """The protocol mapped from a scheduled RT Plan's Treatment Protocols or label (the
    registry's record of the plan, :mod:`services.orchestrator.registry`, headers read by
    adaptive.dicom.inventory); :class:`ClinicalProtocolError` (naming both and the table)
    when unmapped."""
    name, source = table.for_plan(str(rtplan.get("treatment_protocols", "") or ""),
                                  str(rtplan.get("label", "") or ""))
    return {"name": name, "source": source, "rtplan_sop": str(rtplan.get("sop", ""))}
