"""Provenance and research-use marking of every DICOM object we write.

Every object written by :mod:`adaptive.dicom` carries

* General Equipment attributes naming the software (Manufacturer "adaptive",
  Manufacturer's Model Name, Software Versions);
* the research-use statement (:data:`adaptive.RESEARCH_USE_STATEMENT`) in a standard,
  human-visible attribute of its IOD (Series Description always; plus Image Comments for
  images, Structure Set Description, RT Plan Description or Dose Comment for RT objects);
* the full provenance record (inputs' UIDs, parameters, timings) as JSON in a private
  block: private creator ``"ADAPTIVE_PROVENANCE"`` in group 0x0071, element (0071,xx01) UT.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import pydicom
from pydicom import uid
from pydicom.uid import generate_uid

import adaptive
from adaptive import RESEARCH_USE_STATEMENT
from adaptive.jsonable import to_jsonable

PRIVATE_GROUP = 0x0071
PRIVATE_CREATOR = "ADAPTIVE_PROVENANCE"
PRIVATE_ELEMENT = 0x01  # (0071,xx01) UT: provenance JSON

#: UID root of the generated UIDs (pydicom's registered root; one place for all UIDs).
UID_PREFIX = pydicom.uid.PYDICOM_ROOT_UID


def new_uid() -> str:
    """A new globally unique DICOM UID (pydicom.uid.generate_uid, random 2.25-like suffix)."""
    return str(generate_uid(prefix=UID_PREFIX))


@dataclass
class Provenance:
    """Where a written object came from.

    ``input_uids``: role → UID (or list of UIDs), e.g. ``{"planning_ct_series": "1.2...",
    "cbct_series": "1.2...", "predecessor_plan": "1.2..."}``.
    ``parameters``: the settings used (JSON-serialisable; numpy values are converted).
    ``timings_s``: stage name → wall time in seconds.
    """

    software: str = adaptive.SOFTWARE_NAME
    version: str = adaptive.__version__
    input_uids: dict[str, str | list[str]] = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    description: str = ""

    def to_json(self) -> str:
        d = to_jsonable(asdict(self))
        d["research_use"] = RESEARCH_USE_STATEMENT
        return json.dumps(d, sort_keys=True, separators=(",", ":"))


# Attributes (per SOP class) where the research-use statement goes, besides SeriesDescription.
_RESEARCH_ATTRS = {
    uid.CTImageStorage: "ImageComments",
    uid.RTStructureSetStorage: "StructureSetDescription",
    uid.RTPlanStorage: "RTPlanDescription",
    uid.RTDoseStorage: "DoseComment",
    uid.SpatialRegistrationStorage: "ContentDescription",
    uid.DeformableSpatialRegistrationStorage: "ContentDescription",
}


def _prefix(text: str, limit: int) -> str:
    text = (text or "").strip()
    if text.startswith(RESEARCH_USE_STATEMENT):
        out = text
    else:
        out = f"{RESEARCH_USE_STATEMENT}: {text}" if text else RESEARCH_USE_STATEMENT
    return out[:limit]


def apply_provenance(ds: pydicom.Dataset, prov: Provenance | None, *,
                     text: str | None = None) -> None:
    """Mark ``ds`` as written by adaptive, research use only, and store ``prov``.

    Sets Manufacturer, ManufacturerModelName, SoftwareVersions; prefixes SeriesDescription
    (LO, 64 chars) and the IOD's free-text attribute (see module doc) with
    :data:`adaptive.RESEARCH_USE_STATEMENT`; writes the provenance JSON (``prov`` or a
    default record) to the private block (0071,"ADAPTIVE_PROVENANCE",01) as UT.
    Call after SOPClassUID is set. ``text``: ``prov.to_json()`` when the caller already has
    it (the slices of one series share it; serialising the record per slice cost ~5 ms each).
    """
    prov = prov if prov is not None else Provenance()
    ds.Manufacturer = adaptive.SOFTWARE_NAME
    ds.ManufacturerModelName = f"{prov.software}"[:64]
    ds.SoftwareVersions = f"{prov.software} {prov.version}"[:64]
    ds.SeriesDescription = _prefix(str(ds.get("SeriesDescription", "") or ""), 64)
    attr = _RESEARCH_ATTRS.get(str(ds.get("SOPClassUID", "")))
    if attr is not None:
        # maximum lengths of the attributes' VRs: ST 1024, LT 10240, LO 64
        limit = {"StructureSetDescription": 1024, "RTPlanDescription": 1024,
                 "DoseComment": 64, "ContentDescription": 64}.get(attr, 10240)
        ds.__setattr__(attr, _prefix(str(ds.get(attr, "") or ""), limit))
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(PRIVATE_ELEMENT, "UT", prov.to_json() if text is None else text)


def read_provenance(ds: pydicom.Dataset) -> dict | None:
    """The provenance record written by :func:`apply_provenance`, or None if absent/unreadable."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        elem = block[PRIVATE_ELEMENT]
    except (KeyError, ValueError):
        return None
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return None


def dicom_date_time(t: float | None = None) -> tuple[str, str]:
    """(DA, TM) strings for local time ``t`` (default now)."""
    t = time.time() if t is None else t
    lt = time.localtime(t)
    frac = int((t % 1) * 1e6)
    return time.strftime("%Y%m%d", lt), time.strftime("%H%M%S", lt) + f".{frac:06d}"
