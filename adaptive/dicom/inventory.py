"""Inventory of a folder of DICOM files (headers only): what is there and what is wrong.

Scans recursively (hidden files, e.g. in-progress ``.tmp_*`` writes, are skipped), reads
headers with ``stop_before_pixels`` and never raises on bad files: non-DICOM or unreadable
files, slice gaps, mixed Frames of Reference within a series and references to objects not
in the folder are collected as :class:`Problem` entries.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from adaptive import RESEARCH_USE_STATEMENT
from adaptive.dicom._common import (
    DEFORMABLE_REG_STORAGE,
    RT_DOSE_STORAGE,
    RT_PLAN_STORAGE,
    RT_STRUCT_STORAGE,
    SPATIAL_REG_STORAGE,
    read_dataset,
)
from adaptive.dicom.ct_series import SPACING_ABS_TOL_MM, SPACING_REL_TOL
from adaptive.errors import DicomInputError

_RT_KINDS = {RT_STRUCT_STORAGE: "RTSTRUCT", RT_PLAN_STORAGE: "RTPLAN", RT_DOSE_STORAGE: "RTDOSE",
             SPATIAL_REG_STORAGE: "REG", DEFORMABLE_REG_STORAGE: "REG"}


@dataclass
class Problem:
    severity: str  # "error" (unusable/inconsistent) or "warning" (e.g. a reference to an absent object)
    kind: str  # not_dicom, unreadable, missing_tag, series_gap, mixed_for, missing_reference, ...
    path: str
    message: str


@dataclass
class SeriesEntry:
    """An image series. Geometry: ``slice_spacing_mm`` along the slice normal (None if
    it could not be determined), ``rows`` × ``columns``, ``pixel_spacing_mm`` [row, col]."""

    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    modality: str
    number: int | None = None
    description: str = ""
    frame_of_reference_uids: list[str] = field(default_factory=list)
    n_instances: int = 0
    rows: int | None = None
    columns: int | None = None
    pixel_spacing_mm: list[float] | None = None
    slice_spacing_mm: float | None = None
    sop_instance_uids: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    geometry_ok: bool = True
    image_type: list[str] = field(default_factory=list)
    #: acquisition date/time of the images (Acquisition, else Content, else Series Date and
    #: Time of the first instance read; DICOM DA/TM text, "" when absent)
    date: str = ""
    time: str = ""


@dataclass
class RtObject:
    """A non-image RT object (RTSTRUCT, RTPLAN, RTDOSE, REG). ``details`` holds its
    summary: label, ROI names, referenced series / structure set / plan, beams, MU..."""

    kind: str
    path: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    frame_of_reference_uid: str = ""
    details: dict = field(default_factory=dict)
    sop_class_uid: str = ""


@dataclass
class Inventory:
    root: str
    n_files: int = 0
    n_dicom: int = 0
    other_files: list[str] = field(default_factory=list)  # known non-DICOM data (.json, .mha ...)
    patients: dict[str, str] = field(default_factory=dict)  # patient id → name
    studies: dict[str, dict] = field(default_factory=dict)  # study uid → {patient_id, date, id, description}
    series: list[SeriesEntry] = field(default_factory=list)
    rt_objects: list[RtObject] = field(default_factory=list)
    frames_of_reference: dict[str, list[str]] = field(default_factory=dict)  # FoR → "KIND uid" users
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        """Readable multi-line summary grouped by patient and study."""

        lines = [(f"Folder {self.root}: {self.n_files} files, {self.n_dicom} DICOM, "
                  f"{len(self.other_files)} other (json/mha/...) "
                 f"({RESEARCH_USE_STATEMENT})")]
        for pid, pname in sorted(self.patients.items()):
            lines.append(f"Patient {pid!r} {pname!r}")
            for suid, st in sorted(self.studies.items()):
                if st.get("patient_id") != pid:
                    continue
                lines.append(f"  Study {suid} date={st.get('date', '')} id={st.get('id', '')!r}")
                for s in self.series:
                    if s.study_instance_uid != suid:
                        continue
                    geo = (f"{s.columns}x{s.rows} px @ {s.pixel_spacing_mm} mm, "
                           f"slices {s.slice_spacing_mm if s.slice_spacing_mm is not None else '?'} mm"
                           if s.rows else "no geometry")
                    lines.append(f"    Series {s.modality} #{s.number} {s.description!r}: "
                                 f"{s.n_instances} instances, {geo}, uid {s.series_instance_uid}, "
                                 f"FoR {', '.join(s.frame_of_reference_uids)}"
                                 + ("" if s.geometry_ok else "  [GEOMETRY PROBLEM]"))
                for o in self.rt_objects:
                    if o.study_instance_uid != suid:
                        continue
                    lines.append(f"    {o.kind} {Path(o.path).name}: {_describe(o)}")
        orphans = [o for o in self.rt_objects if o.study_instance_uid not in self.studies]
        for o in orphans:
            lines.append(f"  {o.kind} {Path(o.path).name}: {_describe(o)}")
        if self.frames_of_reference:
            lines.append("Frames of Reference:")
            for f, users in sorted(self.frames_of_reference.items()):
                lines.append(f"  {f}: {', '.join(users)}")
        lines.append(f"Problems ({len(self.problems)}):" if self.problems else "Problems: none")
        for p in self.problems:
            lines.append(f"  {p.severity.upper()} {p.kind}: {p.message} [{p.path}]")
        return "\n".join(lines)


def _describe(o: RtObject) -> str:
    d = o.details
    if o.kind == "RTSTRUCT":
        return (f"label {d.get('label', '')!r}, {len(d.get('roi_names', []))} ROIs "
                f"{d.get('roi_names', [])}, references series {d.get('referenced_series_uid') or '?'}, "
                f"uid {o.sop_instance_uid}")
    if o.kind == "RTPLAN":
        s = (f"label {d.get('label', '')!r}, intent {d.get('intent', '')}, {d.get('n_beams', 0)} beams, "
             f"{d.get('total_mu', 0.0):.1f} MU, fractions {d.get('fractions')}, "
             f"structure set {d.get('referenced_structure_set_uid') or '-'}")
        if d.get("predecessor_plan_uid"):
            s += f", predecessor {d['predecessor_plan_uid']}"
        return s + f", uid {o.sop_instance_uid}"
    if o.kind == "RTDOSE":
        return (f"{d.get('summation_type', '')} dose, {d.get('frames')} frames, plan "
                f"{d.get('referenced_plan_uid') or '-'}, uid {o.sop_instance_uid}")
    if o.kind == "REG":
        return f"registration between FoR {d.get('frames_of_reference', [])}, uid {o.sop_instance_uid}"
    return o.sop_instance_uid


def _s(ds, kw) -> str:
    v = ds.get(kw, "")
    return "" if v is None else str(v)


def _first_date_time(ds, prefixes) -> tuple[str, str]:
    """The first non-empty ``<prefix>Date`` of ``ds`` and its ``<prefix>Time``."""
    for p in prefixes:
        d = _s(ds, f"{p}Date")
        if d:
            return d, _s(ds, f"{p}Time")
    return "", ""


def _rt_details(kind: str, ds) -> tuple[dict, str]:
    d: dict = {}
    for_uid = _s(ds, "FrameOfReferenceUID")
    if kind == "RTSTRUCT":
        d["label"] = _s(ds, "StructureSetLabel")
        d["roi_names"] = [str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence") or []]
        d["referenced_series_uid"] = ""
        for rf in ds.get("ReferencedFrameOfReferenceSequence") or []:
            for_uid = for_uid or str(rf.get("FrameOfReferenceUID", ""))
            for st in rf.get("RTReferencedStudySequence") or []:
                for se in st.get("RTReferencedSeriesSequence") or []:
                    d["referenced_series_uid"] = d["referenced_series_uid"] or str(se.get("SeriesInstanceUID", ""))
    elif kind == "RTPLAN":
        d["label"] = _s(ds, "RTPlanLabel")
        d["treatment_protocols"] = _s(ds, "TreatmentProtocols")
        d["date"], d["time"] = _first_date_time(ds, ("RTPlan", "Study"))
        d["intent"] = _s(ds, "PlanIntent")
        d["n_beams"] = len(ds.get("BeamSequence") or [])
        mu, nfx = 0.0, None
        for fg in (ds.get("FractionGroupSequence") or [])[:1]:
            nfx = int(fg.NumberOfFractionsPlanned) if fg.get("NumberOfFractionsPlanned") not in (None, "") else None
            for rb in fg.get("ReferencedBeamSequence") or []:
                if rb.get("BeamMeterset") not in (None, ""):
                    mu += float(rb.BeamMeterset)
        d["total_mu"], d["fractions"] = mu, nfx
        d["referenced_structure_set_uid"] = next(
            (str(r.get("ReferencedSOPInstanceUID", "")) for r in ds.get("ReferencedStructureSetSequence") or []), "")
        d["predecessor_plan_uid"] = next(
            (str(r.get("ReferencedSOPInstanceUID", "")) for r in ds.get("ReferencedRTPlanSequence") or []
             if str(r.get("RTPlanRelationship", "")) == "PREDECESSOR"), "")
    elif kind == "RTDOSE":
        d["summation_type"] = _s(ds, "DoseSummationType")
        d["frames"] = int(ds.get("NumberOfFrames", 1) or 1)
        d["referenced_plan_uid"] = next(
            (str(r.get("ReferencedSOPInstanceUID", "")) for r in ds.get("ReferencedRTPlanSequence") or []), "")
    elif kind == "REG":
        d["deformable"] = bool(ds.get("DeformableRegistrationSequence"))
        fors = []
        for seq_kw in ("RegistrationSequence", "DeformableRegistrationSequence"):
            for r in ds.get(seq_kw) or []:
                f = str(r.get("FrameOfReferenceUID", "") or r.get("SourceFrameOfReferenceUID", "") or "")
                if f:
                    fors.append(f)
        d["frames_of_reference"] = fors
        d["referenced_series_uids"] = [str(s.get("SeriesInstanceUID", ""))
                                       for st in ds.get("StudiesContainingOtherReferencedInstancesSequence") or []
                                       for s in st.get("ReferencedSeriesSequence") or []] + [
            str(s.get("SeriesInstanceUID", "")) for s in ds.get("ReferencedSeriesSequence") or []]
    return d, for_uid


def _check_geometry(entry: SeriesEntry, geo: list[tuple[str, np.ndarray, np.ndarray]],
                    problems: list[Problem]) -> None:
    """Slice spacing / orientation sanity of one image series (geo: (path, ipp, iop))."""
    if not geo:
        entry.geometry_ok = False
        return
    iop0 = geo[0][2]
    if any(not np.allclose(g[2], iop0, atol=1e-4) for g in geo):
        entry.geometry_ok = False
        problems.append(Problem("error", "mixed_orientation", geo[0][0],
                                f"series {entry.series_instance_uid}: slices have different orientations"))
        return
    if len(geo) == 1:
        return
    normal = np.cross(iop0[:3], iop0[3:])
    s = np.array([g[1] @ normal for g in geo])
    order = np.argsort(s)
    s = s[order]
    d = np.diff(s)
    if np.any(d < SPACING_ABS_TOL_MM):
        k = int(np.nonzero(d < SPACING_ABS_TOL_MM)[0][0])
        entry.geometry_ok = False
        problems.append(Problem("error", "series_gap", geo[order[k]][0],
                                f"series {entry.series_instance_uid}: duplicate slice position "
                                f"{s[k]:.2f} mm ({Path(geo[order[k]][0]).name}, {Path(geo[order[k + 1]][0]).name})"))
        return
    dz = float(np.median(d))
    bad = np.nonzero(np.abs(d - dz) > max(SPACING_ABS_TOL_MM, SPACING_REL_TOL * dz))[0]
    entry.slice_spacing_mm = round(dz, 4)
    if bad.size:
        k = int(bad[0])
        entry.geometry_ok = False
        problems.append(Problem("error", "series_gap", geo[order[k]][0],
                                f"series {entry.series_instance_uid}: {d[k]:.2f} mm gap between "
                                f"{Path(geo[order[k]][0]).name} and {Path(geo[order[k + 1]][0]).name} "
                                f"(expected {dz:.2f} mm)"))


#: Files of these types sit beside DICOM data in our folders (displacement fields, reports,
#: manifests); they are listed as other files, not reported as broken DICOM.
KNOWN_NON_DICOM_SUFFIXES = {".json", ".mha", ".mhd", ".nii", ".toml", ".md"}


def inventory(folder: str | Path) -> Inventory:
    """Scan ``folder`` recursively (headers only) and return an :class:`Inventory`."""
    root = Path(folder)
    inv = Inventory(root=str(root))
    if not root.is_dir():
        inv.problems.append(Problem("error", "not_a_folder", str(root), "no such folder"))
        return inv
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    inv.n_files = len(files)
    series: dict[str, SeriesEntry] = {}
    geo: dict[str, list] = defaultdict(list)
    for f in files:
        if f.suffix.lower() in KNOWN_NON_DICOM_SUFFIXES:
            inv.other_files.append(str(f))
            continue
        try:
            ds = read_dataset(f, stop_before_pixels=True)
        except DicomInputError as e:
            inv.problems.append(Problem("error", "not_dicom", str(f), str(e).split(" [")[0]))
            continue
        inv.n_dicom += 1
        sop_class = _s(ds, "SOPClassUID")
        sop_uid = _s(ds, "SOPInstanceUID")
        if not sop_uid or not sop_class:
            inv.problems.append(Problem("error", "missing_tag", str(f), "no SOP Class/Instance UID"))
            continue
        if sop_class == "1.2.840.10008.1.3.10":  # Media Storage Directory (DICOMDIR)
            continue
        pid, study = _s(ds, "PatientID"), _s(ds, "StudyInstanceUID")
        inv.patients.setdefault(pid, _s(ds, "PatientName"))
        if pid in inv.patients and not inv.patients[pid]:
            inv.patients[pid] = _s(ds, "PatientName")
        if study:
            inv.studies.setdefault(study, {"patient_id": pid, "date": _s(ds, "StudyDate"),
                                           "id": _s(ds, "StudyID"), "description": _s(ds, "StudyDescription")})
        kind = _RT_KINDS.get(sop_class)
        if kind is not None:
            details, for_uid = _rt_details(kind, ds)
            inv.rt_objects.append(RtObject(kind, str(f), sop_uid, _s(ds, "SeriesInstanceUID"), study, pid,
                                           for_uid, details, sop_class))
            continue
        suid = _s(ds, "SeriesInstanceUID")
        if not suid:
            inv.problems.append(Problem("error", "missing_tag", str(f), "no SeriesInstanceUID"))
            continue
        e = series.get(suid)
        if e is None:
            e = series[suid] = _new_series_entry(ds, suid, study, pid)
        e.n_instances += 1
        e.sop_instance_uids.append(sop_uid)
        e.files.append(str(f))
        f_uid = _s(ds, "FrameOfReferenceUID")
        if f_uid and f_uid not in e.frame_of_reference_uids:
            e.frame_of_reference_uids.append(f_uid)
        try:
            ipp = np.array([float(v) for v in ds.ImagePositionPatient])
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            if ipp.shape == (3,) and iop.shape == (6,) and int(ds.get("NumberOfFrames", 1) or 1) == 1:
                geo[suid].append((str(f), ipp, iop))
        except (AttributeError, TypeError, ValueError):
            pass
    inv.series = list(series.values())
    _check_series_and_frames(inv, geo)
    _check_references(inv)
    return inv


def _new_series_entry(ds: Dataset, suid: str, study: str, pid: str) -> SeriesEntry:
    """A series entry from its first instance's header: modality, number, description, size,
    pixel spacing (mm), image type, acquisition date/time."""
    e = SeriesEntry(suid, study, pid, _s(ds, "Modality"),
                    int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
                    _s(ds, "SeriesDescription"))
    if ds.get("Rows"):
        e.rows, e.columns = int(ds.Rows), int(ds.get("Columns", 0) or 0)
    if ds.get("PixelSpacing"):
        e.pixel_spacing_mm = [float(v) for v in ds.PixelSpacing]
    it = ds.get("ImageType") or []
    e.image_type = [str(it)] if isinstance(it, str) else [str(v) for v in it]
    e.date, e.time = _first_date_time(ds, ("Acquisition", "Content", "Series"))
    return e


def _check_series_and_frames(inv: Inventory, geo: dict[str, list]) -> None:
    """Flag series with several Frames of Reference or an irregular slice geometry; index
    every Frame of Reference with the series and RT objects in it."""
    for e in inv.series:
        if len(e.frame_of_reference_uids) > 1:
            e.geometry_ok = False
            inv.problems.append(Problem("error", "mixed_for", e.files[0],
                                        f"series {e.series_instance_uid} has {len(e.frame_of_reference_uids)} "
                                        f"Frames of Reference: {e.frame_of_reference_uids}"))
        if geo.get(e.series_instance_uid):
            _check_geometry(e, geo[e.series_instance_uid], inv.problems)
        for f_uid in e.frame_of_reference_uids:
            inv.frames_of_reference.setdefault(f_uid, []).append(f"{e.modality} series {e.series_instance_uid}")
    for o in inv.rt_objects:
        if o.frame_of_reference_uid:
            inv.frames_of_reference.setdefault(o.frame_of_reference_uid, []).append(f"{o.kind} {o.sop_instance_uid}")
        for f_uid in o.details.get("frames_of_reference", []):
            inv.frames_of_reference.setdefault(f_uid, []).append(f"{o.kind} {o.sop_instance_uid}")


def _check_references(inv: Inventory) -> None:
    series_uids = {s.series_instance_uid for s in inv.series}
    by_kind: dict[str, set[str]] = defaultdict(set)
    for o in inv.rt_objects:
        by_kind[o.kind].add(o.sop_instance_uid)

    def missing(o: RtObject, what: str, uid: str, severity: str = "error"):
        inv.problems.append(Problem(severity, "missing_reference", o.path,
                                    f"{o.kind} {o.sop_instance_uid} references {what} {uid}, not in the folder"))

    for o in inv.rt_objects:
        d = o.details
        if o.kind == "RTSTRUCT" and d.get("referenced_series_uid") and d["referenced_series_uid"] not in series_uids:
            missing(o, "image series", d["referenced_series_uid"])
        if o.kind == "RTPLAN":
            if d.get("referenced_structure_set_uid") and d["referenced_structure_set_uid"] not in by_kind["RTSTRUCT"]:
                missing(o, "structure set", d["referenced_structure_set_uid"])
            if d.get("predecessor_plan_uid") and d["predecessor_plan_uid"] not in by_kind["RTPLAN"]:
                missing(o, "predecessor plan", d["predecessor_plan_uid"], "warning")
        if o.kind == "RTDOSE" and d.get("referenced_plan_uid") and d["referenced_plan_uid"] not in by_kind["RTPLAN"]:
            missing(o, "plan", d["referenced_plan_uid"])
        if o.kind == "REG":
            for s in d.get("referenced_series_uids", []):
                if s and s not in series_uids:
                    missing(o, "image series", s, "warning")
