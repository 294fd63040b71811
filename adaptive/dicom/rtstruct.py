"""RT Structure Set read/write (CLOSED_PLANAR contours in LPS mm)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from adaptive.dicom._common import (
    RT_STRUCT_STORAGE,
    ds_element,
    ds_floats,
    new_dataset,
    new_series,
    patient_from_ds,
    read_dataset,
    require,
    save_atomic,
    set_patient_study,
)
from adaptive.dicom.provenance import Provenance, apply_provenance, dicom_date_time, new_uid
from adaptive.errors import (
    ContourOutsideImageError,
    DicomInputError,
    UnknownReferencedSeriesError,
    UnsupportedObjectError,
)
from adaptive.geometry.rasterize import contour_slice_index, mask_to_contours, rasterize_contours
from adaptive.geometry.volume import Grid, Volume
from adaptive.log import get_logger
from adaptive.model.identity import SeriesInfo, StudyIdentity
from adaptive.model.structures import Roi, StructureSet

log = get_logger(__name__)

#: Referenced SOP Class UID the standard prescribes for RT Referenced Study Sequence items.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"


def _roi_contours(roi: Roi) -> list[np.ndarray]:
    if roi.contours:
        return [np.asarray(c, dtype=np.float64).reshape(-1, 3) for c in roi.contours]
    if roi.mask is not None:
        return mask_to_contours(np.asarray(roi.mask.array).astype(bool), roi.mask.grid)
    return []


def write_rtstruct(ss: StructureSet, path: str | Path, *, study: StudyIdentity,
                   provenance: Provenance | None = None, grid: Grid | None = None) -> str:
    """Write ``ss`` as an RT Structure Set in ``study`` referencing ``ss.referenced_series``
    (the image series the contours were drawn on; it may be in another study, which is then
    named in the RT Referenced Study Sequence). A referenced series of another patient, or one
    claiming ``study``'s UID with other study attributes, raises :class:`StudyMismatchError`.

    ROIs with contours are written as they are (LPS mm); ROIs with only a mask get contours
    from :func:`~adaptive.geometry.rasterize.mask_to_contours`. Each contour references the
    image slice it lies on (Contour Image Sequence) when the image grid is known: ``grid``
    (the referenced series' grid, slices in the order of ``sop_instance_uids``), or else the
    grid of an ROI mask having one slice per referenced SOP instance (assumed to be the image
    grid). Contours off an explicit ``grid`` raise :class:`ContourOutsideImageError` naming
    the ROI; with an inferred grid they are written without an image reference.
    Sets and returns ``ss.sop_instance_uid`` (generated when empty). Atomic write.
    """
    path = Path(path)
    series = ss.referenced_series
    if not series.frame_of_reference_uid:
        raise DicomInputError("structure set's referenced series has no Frame of Reference UID", path)
    study.check_series(series, f"image series {series.series_instance_uid} of the structure set")
    sop_uid = ss.sop_instance_uid or new_uid()
    sops = list(series.sop_instance_uids)
    grid_explicit = grid is not None
    grid = _image_grid(ss, sops, grid, path)
    date, tm = dicom_date_time()
    ds = new_dataset(RT_STRUCT_STORAGE, sop_uid)
    set_patient_study(ds, study)
    new_series(ds, "RTSTRUCT", ss.name or ss.label or "structures", date, tm)
    ds.OperatorsName = ""
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.StructureSetLabel = (ss.label or "adaptive")[:16]
    if ss.name:
        ds.StructureSetName = ss.name[:64]
    ds.StructureSetDescription = ""
    ds.StructureSetDate, ds.StructureSetTime = date, tm

    ds.ReferencedFrameOfReferenceSequence = Sequence([_referenced_frame(series, sops)])

    numbers = [r.number for r in ss.rois]
    if len(set(numbers)) != len(numbers):
        raise DicomInputError(f"duplicate ROI numbers {numbers}", path)
    roi_items, contour_items, obs_items = [], [], []
    for n, roi in enumerate(ss.rois, start=1):
        it = Dataset()
        it.ROINumber = int(roi.number)
        it.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
        it.ROIName = roi.name[:64]
        it.ROIGenerationAlgorithm = roi.generation_algorithm or ""
        roi_items.append(it)

        contour_items.append(_roi_contour(roi, series, sops, grid, grid_explicit, path))

        ob = Dataset()
        ob.ObservationNumber = n
        ob.ReferencedROINumber = int(roi.number)
        ob.RTROIInterpretedType = roi.interpreted_type or ""
        ob.ROIInterpreter = ""
        obs_items.append(ob)
    ds.StructureSetROISequence = Sequence(roi_items)
    ds.ROIContourSequence = Sequence(contour_items)
    ds.RTROIObservationsSequence = Sequence(obs_items)
    apply_provenance(ds, provenance)
    save_atomic(ds, path)
    ss.sop_instance_uid = sop_uid
    log.debug("rtstruct_written", path=str(path), rois=len(ss.rois), sop_uid=sop_uid)
    return sop_uid


def _image_grid(ss: StructureSet, sops: list[str], grid: Grid | None, path: Path) -> Grid | None:
    """The image grid contours are referenced on: ``grid``, or else that of an ROI mask with
    one slice per referenced SOP instance; its slice count must match ``sops``."""
    if grid is None:
        for roi in ss.rois:
            if roi.mask is not None and sops and roi.mask.grid.shape[0] == len(sops):
                grid = roi.mask.grid
                break
    if grid is not None and sops and grid.shape[0] != len(sops):
        raise DicomInputError(f"grid has {grid.shape[0]} slices but the referenced series has "
                              f"{len(sops)} SOP instances", path)
    return grid


def _referenced_frame(series: SeriesInfo, sops: list[str]) -> Dataset:
    """Referenced Frame of Reference Sequence item, with the image series' study, series and
    instances (RT Referenced Study Sequence) when they are known."""
    ref_for = Dataset()
    ref_for.FrameOfReferenceUID = series.frame_of_reference_uid
    if sops and series.series_instance_uid and series.study_instance_uid:
        img_items = []
        for u in sops:
            it = Dataset()
            it.ReferencedSOPClassUID = series.sop_class_uid
            it.ReferencedSOPInstanceUID = u
            img_items.append(it)
        rser = Dataset()
        rser.SeriesInstanceUID = series.series_instance_uid
        rser.ContourImageSequence = Sequence(img_items)
        rstudy = Dataset()
        rstudy.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
        rstudy.ReferencedSOPInstanceUID = series.study_instance_uid
        rstudy.RTReferencedSeriesSequence = Sequence([rser])
        ref_for.RTReferencedStudySequence = Sequence([rstudy])
    return ref_for


def _roi_contour(roi: Roi, series: SeriesInfo, sops: list[str], grid: Grid | None,
                 grid_explicit: bool, path: Path) -> Dataset:
    """ROI Contour Sequence item: display colour and the ROI's contours (LPS mm), each
    referencing the image slice it lies on when the grid is known."""
    rc = Dataset()
    rc.ROIDisplayColor = [int(v) for v in roi.color]
    contours = _roi_contours(roi)
    citems = []
    for cn, c in enumerate(contours, start=1):
        if c.shape[0] == 0:
            continue
        ci = Dataset()
        ci.ContourNumber = cn
        if grid is not None and sops:
            try:
                k = contour_slice_index(c, grid, what=f"ROI {roi.name!r} contour #{cn}")
            except ContourOutsideImageError as e:
                if grid_explicit:
                    raise ContourOutsideImageError(str(e), path) from e
                k = None  # inferred grid: leave this contour without an image reference
            if k is not None:
                im = Dataset()
                im.ReferencedSOPClassUID = series.sop_class_uid
                im.ReferencedSOPInstanceUID = sops[k]
                ci.ContourImageSequence = Sequence([im])
        ci.ContourGeometricType = "CLOSED_PLANAR" if c.shape[0] >= 3 else (
            "POINT" if c.shape[0] == 1 else "OPEN_PLANAR")
        ci.NumberOfContourPoints = int(c.shape[0])
        ci.add(ds_element("ContourData", c))
        citems.append(ci)
    if citems:
        rc.ContourSequence = Sequence(citems)
    rc.ReferencedROINumber = int(roi.number)
    return rc


def _referenced(ds: Dataset, path) -> tuple[str, str, str, list[str], str]:
    """(FoR UID, study UID, series UID, contour image SOP UIDs, SOP class) referenced by ``ds``."""
    seq = ds.get("ReferencedFrameOfReferenceSequence") or []
    for_uid = study = series_uid = sop_class = ""
    sops: list[str] = []
    for rf in seq:
        for_uid = for_uid or str(rf.get("FrameOfReferenceUID", "") or "")
        for st in rf.get("RTReferencedStudySequence") or []:
            study = study or str(st.get("ReferencedSOPInstanceUID", "") or "")
            for se in st.get("RTReferencedSeriesSequence") or []:
                if not series_uid:
                    series_uid = str(se.get("SeriesInstanceUID", "") or "")
                    for im in se.get("ContourImageSequence") or []:
                        sops.append(str(im.get("ReferencedSOPInstanceUID", "")))
                        sop_class = sop_class or str(im.get("ReferencedSOPClassUID", "") or "")
    if not for_uid:
        for it in ds.get("StructureSetROISequence") or []:
            for_uid = str(it.get("ReferencedFrameOfReferenceUID", "") or "")
            if for_uid:
                break
    if not for_uid:
        for_uid = str(ds.get("FrameOfReferenceUID", "") or "")
    return for_uid, study, series_uid, sops, sop_class


def _referenced_series(ds: Dataset, series: SeriesInfo | None, path: Path) -> SeriesInfo:
    """The image series the structure set references: ``series`` when given (checked against
    the file's Frame of Reference, series and instances), else built from the file."""
    for_uid, ref_study, ref_series, ref_sops, ref_class = _referenced(ds, path)
    if series is not None:
        if for_uid and for_uid != series.frame_of_reference_uid:
            raise UnknownReferencedSeriesError(
                f"structure set is in Frame of Reference {for_uid}, the supplied series "
                f"{series.series_instance_uid} is in {series.frame_of_reference_uid}", path)
        if ref_series and ref_series != series.series_instance_uid:
            raise UnknownReferencedSeriesError(
                f"structure set references image series {ref_series}, not the supplied series "
                f"{series.series_instance_uid}", path)
        unknown = sorted(set(ref_sops) - set(series.sop_instance_uids)) if series.sop_instance_uids else []
        if unknown:
            raise UnknownReferencedSeriesError(
                f"structure set references {len(unknown)} image instance(s) not in series "
                f"{series.series_instance_uid} (e.g. {unknown[0]})", path)
        ref_info = dataclasses.replace(series, sop_instance_uids=list(series.sop_instance_uids))
    else:
        ref_info = SeriesInfo(
            patient=patient_from_ds(ds),
            study_instance_uid=ref_study or str(ds.get("StudyInstanceUID", "") or ""),
            series_instance_uid=ref_series,
            frame_of_reference_uid=for_uid,
            sop_instance_uids=ref_sops,
            study_id=str(ds.get("StudyID", "") or ""),
            study_date=str(ds.get("StudyDate", "") or ""),
        )
        if ref_class:
            ref_info.sop_class_uid = ref_class

    return ref_info


def _read_roi_contours(rc: Dataset | None, name: str, path: Path
                       ) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """(display colour, CLOSED_PLANAR contours as float64 (n, 3) LPS mm) of an ROI Contour
    Sequence item; other geometric types are skipped."""
    color = (255, 0, 0)
    contours: list[np.ndarray] = []
    if rc is not None:
        if rc.get("ROIDisplayColor"):
            color = tuple(int(v) for v in rc.ROIDisplayColor)[:3]
        for cn, c in enumerate(rc.get("ContourSequence") or [], start=1):
            gtype = str(c.get("ContourGeometricType", "") or "")
            pts = ds_floats(c, "ContourData", path, f"ROI {name!r} contour #{cn}")
            if pts.size % 3:
                raise DicomInputError(f"ROI {name!r} contour #{cn}: ContourData has {pts.size} "
                                      f"values (not a multiple of 3)", path)
            if gtype != "CLOSED_PLANAR":
                log.debug("contour_skipped", roi=name, geometric_type=gtype, path=str(path))
                continue
            contours.append(pts.reshape(-1, 3))
    return color, contours


def read_rtstruct(path: str | Path, *, series: SeriesInfo | None = None,
                  grid: Grid | None = None) -> StructureSet:
    """Read an RT Structure Set: ROI numbers, names, colours, interpreted types, generation
    algorithms and CLOSED_PLANAR contours (float64 (n, 3) LPS mm; other geometric types are
    skipped).

    ``series``: the image series the caller will use; if the file references another
    Frame of Reference or series → :class:`UnknownReferencedSeriesError` naming both UIDs.
    ``grid``: contours are validated against it (:class:`ContourOutsideImageError` naming ROI
    and file) and every ``Roi.mask`` is rasterised onto it (bool Volume, units "mask").
    """
    path = Path(path)
    ds = read_dataset(path)
    if str(ds.get("SOPClassUID", "")) != RT_STRUCT_STORAGE and str(ds.get("Modality", "")) != "RTSTRUCT":
        raise UnsupportedObjectError(f"not an RT Structure Set (SOP class {ds.get('SOPClassUID', '?')}, "
                                     f"modality {ds.get('Modality', '?')})", path)
    sop_uid = str(require(ds, "SOPInstanceUID", path))
    ref_info = _referenced_series(ds, series, path)

    roi_seq = require(ds, "StructureSetROISequence", path)
    types = {}
    for ob in ds.get("RTROIObservationsSequence") or []:
        if "ReferencedROINumber" in ob:
            types[int(ob.ReferencedROINumber)] = str(ob.get("RTROIInterpretedType", "") or "")
    contour_by_roi = {}
    for rc in ds.get("ROIContourSequence") or []:
        num = int(require(rc, "ReferencedROINumber", path, "ROIContourSequence item"))
        contour_by_roi[num] = rc
    rois = []
    for it in roi_seq:
        num = int(require(it, "ROINumber", path, "StructureSetROISequence item"))
        name = str(it.get("ROIName", "") or f"ROI_{num}")
        color, contours = _read_roi_contours(contour_by_roi.get(num), name, path)
        roi = Roi(number=num, name=name, color=color, interpreted_type=types.get(num, ""),
                  contours=contours,
                  generation_algorithm=str(it.get("ROIGenerationAlgorithm", "") or ""))
        if grid is not None:
            for cn, c in enumerate(contours, start=1):
                try:
                    contour_slice_index(c, grid, what=f"ROI {name!r} contour #{cn}")
                except ContourOutsideImageError as e:
                    raise ContourOutsideImageError(str(e), path) from e
            roi.mask = Volume(rasterize_contours(contours, grid), grid, "mask")
        rois.append(roi)
    return StructureSet(rois=rois, referenced_series=ref_info,
                        label=str(ds.get("StructureSetLabel", "") or ""),
                        sop_instance_uid=sop_uid, name=str(ds.get("StructureSetName", "") or ""))
