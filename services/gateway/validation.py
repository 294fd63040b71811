"""Validation of a received C-STORE dataset from its encoded bytes, decoding only the
header attributes needed (never the pixel data).

The checks, in order (first failure wins):

* the bytes parse as a dataset in the negotiated transfer syntax (else 0xC000);
* SOP Class UID and SOP Instance UID are present (else 0xA900);
* every UID that is present (SOP Class, SOP Instance, Study, Series, Frame of Reference)
  is a valid UID (PS3.5 §9.1) and the Patient ID a valid LO value
  (:mod:`services.validators`; else 0xA900 ``invalid_uid`` / ``invalid_patient_id``):
  these become folder and file names;
* SOP Class and SOP Instance UID equal the C-STORE request's Affected SOP Class/Instance
  UID (else 0xA900);
* Patient ID, Study Instance UID, Series Instance UID are present (else 0xA900);
* Modality matches the SOP class (CT image -> CT, RT Dose -> RTDOSE, ...; else 0xA900);
* images (CT, RT Dose): Frame of Reference UID, Image Position (3 values), Image
  Orientation (6 values, orthonormal rows), Pixel Spacing (2 positive values), Rows,
  Columns, Bits Allocated, and Pixel Data whose length equals
  Rows x Columns x Samples per Pixel x Bits Allocated / 8 x Number of Frames (an odd
  total padded by one byte is accepted) (else 0xA900);
* registrations need a Frame of Reference UID; structure sets a Referenced Frame of
  Reference Sequence (else 0xA900).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import pydicom
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom import sop_class

from adaptive.dicom._common import (
    CT_IMAGE_STORAGE,
    DEFORMABLE_REG_STORAGE,
    RT_DOSE_STORAGE,
    RT_PLAN_STORAGE,
    RT_STRUCT_STORAGE,
    SPATIAL_REG_STORAGE,
)
from services.validators import validate_patient_id, validate_uid

# the storage SOP classes the gateway accepts (pydicom's UIDs, named as in adaptive.dicom)
CT_IMAGE = CT_IMAGE_STORAGE
RT_DOSE = RT_DOSE_STORAGE
RT_STRUCT = RT_STRUCT_STORAGE
RT_PLAN = RT_PLAN_STORAGE
SPATIAL_REG = SPATIAL_REG_STORAGE
DEFORMABLE_REG = DEFORMABLE_REG_STORAGE
VERIFICATION = sop_class.Verification

#: Storage SOP classes the gateway accepts -> the Modality their content must carry.
STORAGE_CLASSES: dict[str, str] = {
    CT_IMAGE: "CT",
    RT_DOSE: "RTDOSE",
    RT_STRUCT: "RTSTRUCT",
    RT_PLAN: "RTPLAN",
    SPATIAL_REG: "REG",
    DEFORMABLE_REG: "REG",
}
IMAGE_CLASSES = {CT_IMAGE, RT_DOSE}

STATUS_SUCCESS = 0x0000
STATUS_MISMATCH = 0xA900       # Error: Data Set does not match SOP Class
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_OUT_OF_RESOURCES = 0xA700

_PIXEL_TAGS = {Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009)}


@dataclass
class InstanceHeader:
    """What the gateway needs to know about a received instance (no pixel data)."""

    sop_class_uid: str
    sop_instance_uid: str
    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    modality: str
    frame_of_reference_uid: str = ""
    series_description: str = ""
    image_type: list[str] = field(default_factory=list)
    instance_number: int | None = None
    pixel_data_bytes: int | None = None
    image_position: tuple[float, ...] | None = None      # Image Position (Patient), LPS mm
    image_orientation: tuple[float, ...] | None = None   # Image Orientation (Patient)
    expected_count: int | None = None        # images the sender says the acquisition has
    expected_count_source: str = ""          # the attribute that said so


#: Attributes in which an imager may state how many images its acquisition produced, in
#: order of preference: Images in Acquisition (0020,1002), "number of images that resulted
#: from this acquisition of data" (General Image module, type 3), and Number of Slices
#: (0054,0081) (NM/PET, seen in some exports). DCMTK's storescu sends files unchanged, so
#: whatever the exporting system wrote arrives here.
EXPECTED_COUNT_KEYWORDS = ("ImagesInAcquisition", "NumberOfSlices")


class ValidationFailure(Exception):
    """The instance is rejected. ``status`` is the DIMSE status to answer, ``reason`` a
    short machine-readable code (also the quarantine folder name), ``message`` the
    human-readable explanation sent in Error Comment (truncated to 64 chars there)."""

    def __init__(self, status: int, reason: str, message: str):
        self.context: dict = {}  # whatever identity was decoded before the failure
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"0x{status:04X} {reason}: {message}")


def _fail(reason: str, message: str, status: int = STATUS_MISMATCH):
    raise ValidationFailure(status, reason, message)


def _text(ds, keyword: str) -> str:
    v = ds.get(keyword, None)
    if v is None:
        return ""
    return str(v).strip()


def _numbers(ds, keyword: str, n: int) -> list[float]:
    v = ds.get(keyword, None)
    if v is None or v == "":
        _fail("missing_geometry", f"{keyword} is missing")
    vals = list(v) if hasattr(v, "__iter__") and not isinstance(v, str) else [v]
    if len(vals) != n:
        _fail("bad_geometry", f"{keyword} has {len(vals)} values, expected {n}")
    try:
        out = [float(x) for x in vals]
    except (TypeError, ValueError):
        _fail("bad_geometry", f"{keyword} is not numeric")
    if not all(math.isfinite(x) for x in out):
        _fail("bad_geometry", f"{keyword} is not finite")
    return out


def _int(ds, keyword: str, default: int | None = None) -> int:
    v = ds.get(keyword, None)
    if v is None or v == "":
        if default is not None:
            return default
        _fail("missing_image_attribute", f"{keyword} is missing")
    try:
        return int(v)
    except (TypeError, ValueError):
        _fail("bad_image_attribute", f"{keyword} is not an integer: {v!r}")


def validate_dataset_bytes(data: bytes, transfer_syntax: str, *, expected_sop_class: str,
                           expected_sop_instance: str) -> InstanceHeader:
    """Validate an encoded dataset (no file meta) received with ``transfer_syntax``.

    Returns its :class:`InstanceHeader`; raises :class:`ValidationFailure`.
    """
    ts = UID(transfer_syntax)
    if ts.is_compressed or ts.is_deflated or not ts.is_little_endian:
        _fail("unsupported_transfer_syntax", f"transfer syntax {ts} not supported",
              STATUS_CANNOT_UNDERSTAND)
    pixel = {}

    def stop(tag, vr, length):
        if tag in _PIXEL_TAGS:
            pixel["tag"], pixel["length"] = tag, length
            return True
        return False

    try:
        fp = io.BytesIO(data)
        ds = read_dataset(fp, ts.is_implicit_VR, True, stop_when=stop)
        pixel_element_start = fp.tell()
        context = _identity(ds)
        extra = _descriptive(ds)
    except ValidationFailure:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding problem: cannot be understood
        _fail("undecodable", f"cannot decode dataset: {type(e).__name__}: {e}",
              STATUS_CANNOT_UNDERSTAND)

    try:
        return _check(ds, data, ts, pixel, pixel_element_start, context, extra,
                      expected_sop_class, expected_sop_instance)
    except ValidationFailure as f:
        f.context = context
        raise


def _identity(ds) -> dict:
    """The identifying attributes (also the context of a rejection)."""
    return {"sop_class_uid": _text(ds, "SOPClassUID"),
            "sop_instance_uid": _text(ds, "SOPInstanceUID"),
            "patient_id": _text(ds, "PatientID"), "study_uid": _text(ds, "StudyInstanceUID"),
            "series_uid": _text(ds, "SeriesInstanceUID"),
            "modality": _text(ds, "Modality").upper()}


def _descriptive(ds) -> dict:
    inst_no = ds.get("InstanceNumber", None)
    return {"frame_of_reference_uid": _text(ds, "FrameOfReferenceUID"),
            "series_description": _text(ds, "SeriesDescription"),
            "image_type": [str(x).upper() for x in (ds.get("ImageType", None) or [])],
            "instance_number": int(inst_no) if inst_no not in (None, "") else None,
            "patient_name": _text(ds, "PatientName")}


def _expected_count(ds) -> tuple[int | None, str]:
    for kw in EXPECTED_COUNT_KEYWORDS:
        v = ds.get(kw, None)
        try:
            n = int(v) if v not in (None, "") else 0
        except (TypeError, ValueError):
            continue  # a malformed optional attribute states nothing
        if n > 0:
            return n, kw
    return None, ""


def _optional_numbers(ds, keyword: str, n: int) -> tuple[float, ...] | None:
    try:
        return tuple(_numbers(ds, keyword, n))
    except ValidationFailure:
        return None


def read_instance_header(path) -> InstanceHeader:
    """The header of an instance already in the store (written by the gateway after
    validation, so not validated again)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    idc, extra = _identity(ds), _descriptive(ds)
    count, source = _expected_count(ds)
    return InstanceHeader(
        sop_class_uid=idc["sop_class_uid"], sop_instance_uid=idc["sop_instance_uid"],
        patient_id=idc["patient_id"], study_uid=idc["study_uid"],
        series_uid=idc["series_uid"], modality=idc["modality"], **extra,
        image_position=_optional_numbers(ds, "ImagePositionPatient", 3),
        image_orientation=_optional_numbers(ds, "ImageOrientationPatient", 6),
        expected_count=count, expected_count_source=source)


def _check_identifiers(context: dict, for_uid: str) -> None:
    for kw, v in (("SOPClassUID", context["sop_class_uid"]),
                  ("SOPInstanceUID", context["sop_instance_uid"]),
                  ("StudyInstanceUID", context["study_uid"]),
                  ("SeriesInstanceUID", context["series_uid"]),
                  ("FrameOfReferenceUID", for_uid)):
        if v:
            ok, why = validate_uid(v)
            if not ok:
                _fail("invalid_uid", f"{kw} invalid: {why}; value {v[:40]!r}")
    if context["patient_id"]:
        ok, why = validate_patient_id(context["patient_id"])
        if not ok:
            _fail("invalid_patient_id", f"PatientID invalid: {why}")


def _check_identity(context: dict, for_uid: str, expected_sop_class: str,
                    expected_sop_instance: str) -> None:
    """UIDs present and valid, the SOP class and instance the C-STORE named, an accepted
    SOP class and the Modality that goes with it."""
    sop_class, sop_inst = context["sop_class_uid"], context["sop_instance_uid"]
    if not sop_class:
        _fail("missing_uid", "SOPClassUID is missing")
    if not sop_inst:
        _fail("missing_uid", "SOPInstanceUID is missing")
    _check_identifiers(context, for_uid)
    if sop_class != expected_sop_class:
        _fail("sop_class_mismatch",
              f"SOPClassUID {sop_class} != affected SOP class {expected_sop_class}")
    if sop_inst != expected_sop_instance:
        _fail("sop_instance_mismatch",
              f"SOPInstanceUID {sop_inst} != affected SOP instance {expected_sop_instance}")
    if sop_class not in STORAGE_CLASSES:
        _fail("unsupported_sop_class", f"SOP class {sop_class} is not accepted")
    for kw, v in (("PatientID", context["patient_id"]), ("StudyInstanceUID", context["study_uid"]),
                  ("SeriesInstanceUID", context["series_uid"])):
        if not v:
            _fail("missing_uid" if kw != "PatientID" else "missing_patient_id",
                  f"{kw} is missing")
    want_modality, modality = STORAGE_CLASSES[sop_class], context["modality"]
    if modality != want_modality:
        _fail("modality_mismatch",
              f"Modality {modality or '(empty)'} does not match SOP class (expected "
              f"{want_modality})")


def _check_image(ds, data, ts, pixel, pixel_element_start) -> tuple[list, list]:
    """Image geometry (orthonormal orientation, positive spacing), image attributes and the
    Pixel Data length (declared and present). Returns (position, orientation)."""
    ipp = _numbers(ds, "ImagePositionPatient", 3)
    iop = _numbers(ds, "ImageOrientationPatient", 6)
    r, c = iop[:3], iop[3:]
    nr = math.sqrt(sum(x * x for x in r))
    nc = math.sqrt(sum(x * x for x in c))
    dot = sum(a * b for a, b in zip(r, c))
    if abs(nr - 1) > 1e-3 or abs(nc - 1) > 1e-3 or abs(dot) > 1e-3:
        _fail("bad_geometry", "ImageOrientationPatient is not orthonormal")
    ps = _numbers(ds, "PixelSpacing", 2)
    if min(ps) <= 0:
        _fail("bad_geometry", "PixelSpacing must be positive")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    bits = _int(ds, "BitsAllocated")
    spp = _int(ds, "SamplesPerPixel", 1)
    frames = _int(ds, "NumberOfFrames", 1)
    if rows <= 0 or cols <= 0 or bits not in (8, 16, 32, 64) or spp <= 0 or frames <= 0:
        _fail("bad_image_attribute",
              f"Rows/Columns/BitsAllocated/SamplesPerPixel/NumberOfFrames invalid "
              f"({rows}, {cols}, {bits}, {spp}, {frames})")
    if "length" not in pixel:
        _fail("missing_pixel_data", "Pixel Data is missing")
    expected = rows * cols * spp * (bits // 8) * frames
    got = pixel["length"]
    if got == 0xFFFFFFFF or not (got == expected or (expected % 2 and got == expected + 1)):
        _fail("pixel_data_length",
              f"Pixel Data length {got} != {rows}x{cols}x{spp}x{bits // 8}x{frames} "
              f"= {expected} bytes")
    remaining = len(data) - _value_offset(data, pixel_element_start, ts.is_implicit_VR)
    if remaining < expected:
        _fail("pixel_data_length",
              f"Pixel Data truncated: {remaining} bytes present, {expected} expected")
    return ipp, iop


def _rtstruct_frame(ds, for_uid: str) -> str:
    """An RT Structure Set's frame: its own, else the first referenced one (validated)."""
    seq = ds.get("ReferencedFrameOfReferenceSequence", None)
    if not seq:
        _fail("missing_reference", "ReferencedFrameOfReferenceSequence is missing")
    if not for_uid:
        for_uid = _text(seq[0], "FrameOfReferenceUID")
        ok, why = validate_uid(for_uid) if for_uid else (True, "")
        if not ok:
            _fail("invalid_uid", f"referenced FrameOfReferenceUID invalid: {why}")
    return for_uid


def _check(ds, data, ts, pixel, pixel_element_start, context, extra, expected_sop_class,
           expected_sop_instance):
    sop_class = context["sop_class_uid"]
    for_uid = extra["frame_of_reference_uid"]
    _check_identity(context, for_uid, expected_sop_class, expected_sop_instance)
    ipp = iop = None
    try:
        needs_frame = sop_class in IMAGE_CLASSES or sop_class in (SPATIAL_REG, DEFORMABLE_REG)
        if needs_frame and not for_uid:
            _fail("missing_uid", "FrameOfReferenceUID is missing")
        if sop_class in IMAGE_CLASSES:
            ipp, iop = _check_image(ds, data, ts, pixel, pixel_element_start)
        elif sop_class == RT_STRUCT:
            for_uid = _rtstruct_frame(ds, for_uid)
        count, count_source = _expected_count(ds)
    except ValidationFailure:
        raise
    except Exception as e:  # noqa: BLE001 - a header that breaks the decoder
        _fail("undecodable", f"cannot decode header: {type(e).__name__}: {e}",
              STATUS_CANNOT_UNDERSTAND)

    return InstanceHeader(
        sop_class_uid=sop_class, sop_instance_uid=context["sop_instance_uid"],
        patient_id=context["patient_id"], study_uid=context["study_uid"],
        series_uid=context["series_uid"], modality=context["modality"],
        **dict(extra, frame_of_reference_uid=for_uid),
        pixel_data_bytes=pixel.get("length"),
        image_position=tuple(ipp) if ipp else None,
        image_orientation=tuple(iop) if iop else None,
        expected_count=count, expected_count_source=count_source)


def _value_offset(data: bytes, element_start: int, implicit: bool) -> int:
    """Offset of the first value byte of the element whose header starts at
    ``element_start`` (explicit VR OB/OW/OF/OD/UN headers are 12 bytes, others 8)."""
    if implicit:
        return element_start + 8
    vr = data[element_start + 4:element_start + 6]
    return element_start + (12 if vr in (b"OB", b"OW", b"OF", b"OD", b"UN") else 8)
