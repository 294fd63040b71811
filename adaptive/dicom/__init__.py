"""DICOM-RT I/O (pydicom): CT series, RT Structure Set, RT Plan, RT Dose, provenance, inventory.

Every object written here is marked research use only and carries a provenance record
(see :mod:`adaptive.dicom.provenance`). Coordinates are DICOM patient LPS (mm).
"""

from adaptive.dicom.ct_series import read_ct_series, write_ct_series
from adaptive.dicom.inventory import Inventory, inventory
from adaptive.dicom.provenance import Provenance, apply_provenance, new_uid, read_provenance
from adaptive.dicom.rtdose import read_rtdose, write_rtdose
from adaptive.dicom.rtplan import read_rtplan, write_rtplan
from adaptive.dicom.rtstruct import read_rtstruct, write_rtstruct

__all__ = [
    "Inventory",
    "Provenance",
    "apply_provenance",
    "inventory",
    "new_uid",
    "read_ct_series",
    "read_provenance",
    "read_rtdose",
    "read_rtplan",
    "read_rtstruct",
    "write_ct_series",
    "write_rtdose",
    "write_rtplan",
    "write_rtstruct",
]
