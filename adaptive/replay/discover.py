"""What can be replayed in a folder of DICOM as a clinic exports it: the fractions (one daily
image each) of every patient, with the planning data each one belongs to.

The folder is scanned with :func:`adaptive.dicom.inventory.inventory` (headers only, any
layout, one or many patients). Per patient:

**Scheduled plans.** Every RT Plan whose referenced RT Structure Set is in the folder and
whose structure set references a CT series in the folder (the planning CT). A plan that
names another plan as its PREDECESSOR is an adaptation made in an earlier session (its
"planning CT" is that session's synthetic CT), not a scheduled plan: it and the CT series
its structure set references are left out.

**Daily images.** A CT series of the patient that is not a planning CT nor a left-out
synthetic CT and that :func:`adaptive.dicom.daily_image.is_daily_image` (the rule of the
services' orchestrator, with the services' markers) recognises against a scheduled plan's
planning CT: a CBCT marker in its Series Description or Image Type, or a Frame of Reference
other than the planning CT's.

**Which plan a daily image belongs to.** (1) The only scheduled plan of the patient; else
(2) the plan whose planning Frame of Reference a rigid Spatial Registration in the folder
relates to the image's Frame of Reference (the image-guidance match); else (3) the latest
plan dated (RT Plan Date, else its Study Date) on or before the image's date (Acquisition,
Content, Series, then Study Date); else the image is reported unusable ("ambiguous").
The rigid Spatial Registration relating the two frames, when there is one, travels with
the fraction (one candidate of the registration's initial alignment, as in a session).

**Fractions** of a patient are numbered ``fx01``, ``fx02``... by image date and time, then
Series Number. Fractions whose image or planning data the inventory found broken (gaps,
mixed frames, missing references) are listed as unusable with the inventory's reason.

**Ground truth** (replay cases built by :mod:`adaptive.replay.build`): a ``truth.json``
anywhere in the folder whose ``cbct_series_uid`` is the daily image's series, with its
``dvf.mha`` and ``RS.dcm`` beside it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from adaptive.dicom.daily_image import is_daily_image, services_cbct_markers
from adaptive.dicom.inventory import Inventory, RtObject, SeriesEntry, inventory
from adaptive.errors import ReplayDataError


@dataclass(frozen=True)
class ImageSeries:
    """An image series of the archive: its files (absolute paths) and identity."""

    series_instance_uid: str
    frame_of_reference_uid: str
    description: str
    date: str
    time: str
    number: int | None
    files: tuple[str, ...]

    @classmethod
    def of(cls, e: SeriesEntry) -> ImageSeries:
        return cls(e.series_instance_uid, (e.frame_of_reference_uids or [""])[0], e.description,
                   e.date, e.time, e.number, tuple(sorted(e.files)))


@dataclass(frozen=True)
class PlanningData:
    """A scheduled plan with the structure set and planning CT it references."""

    rtplan: str
    rtplan_uid: str
    rtplan_label: str
    rtplan_date: str
    rtstruct: str
    rtstruct_uid: str
    planning_ct: ImageSeries


@dataclass(frozen=True)
class TruthFiles:
    """Ground truth of a simulated fraction (see :mod:`adaptive.replay.truth`)."""

    truth_json: str
    dvf: str
    rtstruct: str


@dataclass(frozen=True)
class FractionInputs:
    """One fraction to replay: a daily image and the planning data it belongs to.

    ``matched_by`` says how the plan was chosen (module docstring); ``spatial_registration``
    is the path of a rigid Spatial Registration relating the image's and the planning
    frames (or None)."""

    patient_id: str
    patient_name: str
    label: str
    planning: PlanningData
    cbct: ImageSeries
    matched_by: str
    spatial_registration: str | None = None
    truth: TruthFiles | None = None

    @property
    def fraction_id(self) -> str:
        """Stable folder name of the fraction's outputs (does not move when another image
        of the patient is added to the archive): image date, series number, UID digest."""
        return fraction_folder(self.cbct)

    def input_files(self) -> list[str]:
        """Every file the chain reads (planning CT, RT Struct, RT Plan, daily image, REG)."""
        files = [*self.planning.planning_ct.files, self.planning.rtstruct, self.planning.rtplan,
                 *self.cbct.files]
        if self.spatial_registration:
            files.append(self.spatial_registration)
        return files


@dataclass(frozen=True)
class Unusable:
    """A daily image (or a patient's planning data) that cannot be replayed, and why."""

    patient_id: str
    label: str
    series_instance_uid: str
    reason: str
    fraction_id: str = ""


@dataclass
class ArchiveContents:
    root: str
    fractions: list[FractionInputs] = field(default_factory=list)
    unusable: list[Unusable] = field(default_factory=list)
    inventory: Inventory | None = None

    def patients(self) -> list[str]:
        return sorted({f.patient_id for f in self.fractions} |
                      {u.patient_id for u in self.unusable})


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, *, digest: bool = True) -> str:
    """A file-name-safe, injective rendering of an identifier (patient ID, UID): allowed
    characters kept, others replaced, plus a digest of the original when anything was
    replaced (or always, with ``digest``)."""
    base = _SAFE.sub("_", text or "").strip("._")[:48] or "none"
    if digest or base != text:
        base += "-" + hashlib.sha256((text or "").encode()).hexdigest()[:8]
    return base


def fraction_folder(series: ImageSeries) -> str:
    num = f"S{series.number}" if series.number is not None else "S"
    return f"{series.date or 'nodate'}-{num}-{hashlib.sha256(series.series_instance_uid.encode()).hexdigest()[:8]}"


def _date_key(date: str, time: str) -> str:
    return f"{date or ''}{(time or '').split('.')[0]:0<6}"


def discover(root: str | Path, *, markers=None, inv: Inventory | None = None
             ) -> ArchiveContents:
    """The fractions of every patient in ``root`` (module docstring). ``markers``: CBCT
    markers (default: the services', :func:`services_cbct_markers`)."""
    root = Path(root)
    if not root.is_dir():
        raise ReplayDataError(f"archive folder not found [{root}]")
    markers = tuple(markers) if markers is not None else services_cbct_markers()
    inv = inv or inventory(root)
    out = ArchiveContents(str(root), inventory=inv)
    problems_by_file: dict[str, list[str]] = defaultdict(list)
    for p in inv.problems:
        if p.severity == "error":
            problems_by_file[p.path].append(f"{p.kind}: {p.message}")
    series_by_uid = {s.series_instance_uid: s for s in inv.series}
    truths = _truth_files(inv)
    for pid in sorted(inv.patients):
        _discover_patient(pid, inv, series_by_uid, problems_by_file, markers, truths, out)
    return out


def _series_problems(e: SeriesEntry, problems_by_file) -> list[str]:
    msgs = [m for f in e.files for m in problems_by_file.get(f, [])]
    if not msgs and not e.geometry_ok:
        msgs.append(f"series {e.series_instance_uid}: inconsistent geometry")
    return msgs


def _discover_patient(pid: str, inv: Inventory, series_by_uid: dict[str, SeriesEntry],
                      problems_by_file, markers, truths, out: ArchiveContents) -> None:
    name = inv.patients.get(pid, "")
    rts = [o for o in inv.rt_objects if o.patient_id == pid]
    structs = {o.sop_instance_uid: o for o in rts if o.kind == "RTSTRUCT"}
    plans = [o for o in rts if o.kind == "RTPLAN"]
    adapted = [o for o in plans if o.details.get("predecessor_plan_uid")]
    derived_images = {structs[o.details["referenced_structure_set_uid"]].details.get(
        "referenced_series_uid") for o in adapted
        if o.details.get("referenced_structure_set_uid") in structs}
    scheduled, broken = _scheduled_plans([o for o in plans if o not in adapted], structs,
                                         series_by_uid, problems_by_file)
    planning_uids = {p.planning_ct.series_instance_uid for p in scheduled}
    images = []
    for e in inv.series:
        if (e.patient_id != pid or e.series_instance_uid in planning_uids
                or e.series_instance_uid in derived_images):
            continue
        for_uid = (e.frame_of_reference_uids or [""])[0]
        if scheduled:
            cands = [p for p in scheduled
                     if is_daily_image(e.modality, e.series_instance_uid, e.description,
                                       e.image_type, for_uid, p.planning_ct.series_instance_uid,
                                       p.planning_ct.frame_of_reference_uid, markers)]
            if not cands:
                continue
        elif is_daily_image(e.modality, e.series_instance_uid, e.description, e.image_type,
                            for_uid, None, None, markers):
            cands = []  # a daily image with no plan to replay it against: reported
        else:
            continue
        images.append((e, cands))
    images.sort(key=lambda t: (_date_key(t[0].date or inv.studies.get(
        t[0].study_instance_uid, {}).get("date", ""), t[0].time), t[0].number or 0,
        t[0].series_instance_uid))
    regs = [o for o in rts if o.kind == "REG" and not o.details.get("deformable")]
    for n, (e, cands) in enumerate(images, start=1):
        label = f"fx{n:02d}"
        series = ImageSeries.of(e)
        fid = fraction_folder(series)
        if not cands:
            reason = ("no scheduled plan for this patient in the archive"
                      + (": " + "; ".join(broken) if broken else ""))
            out.unusable.append(Unusable(pid, label, e.series_instance_uid, reason, fid))
            continue
        bad = _series_problems(e, problems_by_file)
        if bad:
            out.unusable.append(Unusable(pid, label, e.series_instance_uid,
                                         "daily image unusable: " + "; ".join(bad), fid))
            continue
        study_date = inv.studies.get(e.study_instance_uid, {}).get("date", "")
        plan, how = _match_plan(series, study_date, cands, regs)
        if plan is None:
            out.unusable.append(Unusable(pid, label, e.series_instance_uid, how, fid))
            continue
        reg = _linking_registration(series, plan, regs)
        out.fractions.append(FractionInputs(pid, name, label, plan, series, how,
                                            reg.path if reg else None,
                                            truths.get(e.series_instance_uid)))


def _scheduled_plans(plans: list[RtObject], structs: dict[str, RtObject],
                     series_by_uid: dict[str, SeriesEntry], problems_by_file
                     ) -> tuple[list[PlanningData], list[str]]:
    """(the plans usable as scheduled plans: their structure set and planning CT are in the
    archive and have no problems, why each other plan is not)."""
    scheduled: list[PlanningData] = []
    broken: list[str] = []
    for o in plans:
        rs = structs.get(o.details.get("referenced_structure_set_uid", ""))
        if rs is None:
            broken.append(f"plan {o.details.get('label', '')!r} ({o.sop_instance_uid}): its "
                          f"structure set {o.details.get('referenced_structure_set_uid') or '?'}"
                          f" is not in the archive")
            continue
        ct = series_by_uid.get(rs.details.get("referenced_series_uid", ""))
        if ct is None or ct.modality != "CT":
            broken.append(f"plan {o.details.get('label', '')!r} ({o.sop_instance_uid}): the "
                          f"planning CT {rs.details.get('referenced_series_uid') or '?'} its "
                          f"structure set references is not in the archive")
            continue
        bad = (_series_problems(ct, problems_by_file) + problems_by_file.get(o.path, [])
               + problems_by_file.get(rs.path, []))
        if bad:
            broken.append(f"plan {o.details.get('label', '')!r} ({o.sop_instance_uid}): "
                          + "; ".join(bad))
            continue
        scheduled.append(PlanningData(o.path, o.sop_instance_uid, o.details.get("label", ""),
                                      o.details.get("date", ""), rs.path, rs.sop_instance_uid,
                                      ImageSeries.of(ct)))
    return scheduled, broken



def _linking_registration(series: ImageSeries, plan: PlanningData, regs: list[RtObject]
                          ) -> RtObject | None:
    want = {series.frame_of_reference_uid, plan.planning_ct.frame_of_reference_uid}
    for r in regs:
        if want <= set(r.details.get("frames_of_reference", [])):
            return r
    return None


def _match_plan(series: ImageSeries, study_date: str, cands: list[PlanningData],
                regs: list[RtObject]) -> tuple[PlanningData | None, str]:
    if len(cands) == 1:
        return cands[0], "the patient's only scheduled plan"
    linked = [p for p in cands if _linking_registration(series, p, regs) is not None]
    if len(linked) == 1:
        return linked[0], ("a Spatial Registration relates the image's Frame of Reference to "
                           "this plan's planning CT")
    day = series.date or study_date
    dated = sorted((p for p in cands if p.rtplan_date and day and p.rtplan_date <= day),
                   key=lambda p: p.rtplan_date)
    if dated and (len(dated) == 1 or dated[-1].rtplan_date != dated[-2].rtplan_date):
        return dated[-1], f"the latest scheduled plan dated on or before the image ({day})"
    labels = ", ".join(f"{p.rtplan_label!r} ({p.rtplan_date or 'no date'})" for p in cands)
    return None, (f"ambiguous: {len(cands)} scheduled plans could own this image ({labels}); "
                  f"no Spatial Registration relates it to one and the dates do not decide")


def _truth_files(inv: Inventory) -> dict[str, TruthFiles]:
    out = {}
    for f in inv.other_files:
        p = Path(f)
        if p.name != "truth.json":
            continue
        try:
            uid = json.loads(p.read_text()).get("cbct_series_uid", "")
        except (OSError, ValueError):
            continue
        dvf, rs = p.parent / "dvf.mha", p.parent / "RS.dcm"
        if uid and dvf.is_file() and rs.is_file():
            out[uid] = TruthFiles(str(p), str(dvf), str(rs))
    return out
