"""The planning-data registry: what the gateway has received, per patient, and which of it is
the patient's planning data (scheduled RT Plan, the structure set it references, the CT
series that structure set references) and which series is today's CBCT.

Headers are read only through :func:`adaptive.dicom.inventory.inventory` (the RT objects'
references, labels, Treatment Protocols, Frames of Reference): the orchestrator parses no
DICOM of its own. Series arrive as the gateway's ``series_complete`` events; the registry is
persisted (:mod:`services.orchestrator.store`) and, at start-up, completed from the
gateway's store (``store/<patient>/<study>/<series>/``), so series received while the
orchestrator was down are known too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from adaptive.dicom.daily_image import is_daily_image
from adaptive.dicom.inventory import inventory
from adaptive.log import get_logger

SPATIAL_REG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.1"


@dataclass
class PatientData:
    """Completed series of one patient as reported by the gateway."""

    patient_id: str
    series: dict[str, dict] = field(default_factory=dict)      # series UID -> event body
    rtstructs: list[dict] = field(default_factory=list)        # {"path","sop","ref_series","for"}
    rtplans: list[dict] = field(default_factory=list)          # {"path","sop","ref_rs","label"}
    regs: list[dict] = field(default_factory=list)             # spatial registrations


class PlanningRegistry:
    """Patient -> :class:`PatientData`; ``store`` (optional) persists every series."""

    def __init__(self, store=None, cbct_markers=("CBCT",)):
        self.patients: dict[str, PatientData] = {}
        self.store = store
        self.cbct_markers = [m.upper() for m in cbct_markers]
        self.log = get_logger("services.registry")

    # -- input --------------------------------------------------------------------------
    def add_series(self, d: dict, *, persist: bool = True) -> PatientData:
        """Register a completed series (a ``series_complete`` body with ``completed_at``)
        and index its RT objects."""
        pid = d["patient_id"]
        pd = self.patients.setdefault(pid, PatientData(pid))
        pd.series[d["series_uid"]] = d
        if d.get("modality") in ("RTSTRUCT", "RTPLAN", "REG"):
            self._index_rt(pd, d)
        if persist and self.store is not None:
            self.store.save_series(pid, d["series_uid"], d)
        return pd

    def _index_rt(self, pd: PatientData, d: dict) -> None:
        inv = inventory(d["path"])
        for o in inv.rt_objects:
            if o.patient_id.strip(" ") != pd.patient_id.strip(" "):
                self.log.warning("rt_object_of_another_patient", path=o.path,
                                 patient_id=o.patient_id, registered_for=pd.patient_id)
                continue
            t = d["completed_at"]
            if o.kind == "RTSTRUCT":
                pd.rtstructs = [r for r in pd.rtstructs if r["sop"] != o.sop_instance_uid]
                pd.rtstructs.append({"path": o.path, "sop": o.sop_instance_uid,
                                     "ref_series": o.details.get("referenced_series_uid", ""),
                                     "for": o.frame_of_reference_uid, "study": o.study_instance_uid,
                                     "t": t})
            elif o.kind == "RTPLAN":
                pd.rtplans = [r for r in pd.rtplans if r["sop"] != o.sop_instance_uid]
                pd.rtplans.append({"path": o.path, "sop": o.sop_instance_uid,
                                   "ref_rs": o.details.get("referenced_structure_set_uid", ""),
                                   "label": o.details.get("label", ""),
                                   "treatment_protocols": o.details.get("treatment_protocols", ""),
                                   "for": o.frame_of_reference_uid,
                                   "study": o.study_instance_uid, "t": t})
            elif o.kind == "REG" and o.sop_class_uid == SPATIAL_REG_STORAGE:
                pd.regs = [r for r in pd.regs if r["sop"] != o.sop_instance_uid]
                pd.regs.append({"path": o.path, "sop": o.sop_instance_uid, "t": t,
                                "frames": sorted({o.frame_of_reference_uid,
                                                  *o.details.get("frames_of_reference", [])}
                                                 - {""})})

    def load(self) -> int:
        """Every series persisted in the store (the database), indexed again."""
        n = 0
        for _pid, _uid, rec in (self.store.series() if self.store is not None else []):
            if Path(rec.get("path", "")).is_dir():
                self.add_series(rec, persist=False)
                n += 1
        return n

    def rebuild_from(self, store_dir: str | Path) -> int:
        """Register the series folders of the gateway's store that the registry does not
        know yet (``store/<patient>/<study>/<series>/*.dcm``; headers read by
        :func:`inventory`). Returns how many were added."""
        known = {u for pd in self.patients.values() for u in pd.series}
        added = 0
        root = Path(store_dir)
        if not root.is_dir():
            return 0
        for series_dir in sorted(p for p in root.glob("*/*/*") if p.is_dir()):
            if series_dir.name in known:
                continue
            inv = inventory(series_dir)
            files = sorted(series_dir.glob("*.dcm"))
            if not files:
                continue
            done = max(os.stat(f).st_mtime for f in files)
            for e in inv.series:
                self.add_series({"patient_id": e.patient_id, "study_uid": e.study_instance_uid,
                                 "series_uid": e.series_instance_uid, "modality": e.modality,
                                 "path": str(series_dir), "count": e.n_instances,
                                 "series_description": e.description, "image_type": [],
                                 "frame_of_reference_uid": (e.frame_of_reference_uids or [""])[0],
                                 "completed_at": done, "rebuilt_from_store": True})
                added += 1
            rt = {o.series_instance_uid: o for o in inv.rt_objects}
            for suid, o in rt.items():
                self.add_series({"patient_id": o.patient_id, "study_uid": o.study_instance_uid,
                                 "series_uid": suid, "modality": o.kind,
                                 "path": str(series_dir), "count": sum(
                                     1 for x in inv.rt_objects if x.series_instance_uid == suid),
                                 "series_description": "", "image_type": [],
                                 "frame_of_reference_uid": o.frame_of_reference_uid,
                                 "completed_at": done, "rebuilt_from_store": True})
                added += 1
        if added:
            self.log.info("registry_rebuilt_from_store", series=added, store=str(root))
        return added

    # -- queries ------------------------------------------------------------------------
    def resolve_planning(self, pid: str) -> dict:
        """The patient's planning data: latest RT Plan, the structure set it references
        and the CT series that structure set references. Missing pieces listed."""
        pd = self.patients.get(pid)
        out = {"missing": []}
        if pd is None:
            out["missing"] = ["RTPLAN", "RTSTRUCT", "planning CT"]
            return out
        plan = max(pd.rtplans, key=lambda r: r["t"]) if pd.rtplans else None
        rs = None
        if plan is not None and plan["ref_rs"]:
            rs = next((r for r in pd.rtstructs if r["sop"] == plan["ref_rs"]), None)
            if rs is None:
                out["missing"].append(f"RTSTRUCT {plan['ref_rs']} (referenced by the plan)")
        elif pd.rtstructs:
            rs = max(pd.rtstructs, key=lambda r: r["t"])
        if plan is None:
            out["missing"].append("RTPLAN")
        if rs is None and not any(m.startswith("RTSTRUCT") for m in out["missing"]):
            out["missing"].append("RTSTRUCT")
        ct = None
        if rs is not None:
            ct = pd.series.get(rs["ref_series"])
            if ct is None:
                out["missing"].append(f"planning CT series {rs['ref_series']}")
        if plan:
            out["rtplan"] = plan
        if rs:
            out["rtstruct"] = rs
        if ct:
            out["ct"] = ct
        return out

    def is_cbct(self, series: dict, planning_ct: dict | None) -> bool:
        """A daily image by the rule the archive replay uses too
        (:func:`adaptive.dicom.daily_image.is_daily_image`)."""
        return is_daily_image(series.get("modality", ""), series["series_uid"],
                              series.get("series_description", ""),
                              series.get("image_type", []),
                              series.get("frame_of_reference_uid", ""),
                              planning_ct["series_uid"] if planning_ct else None,
                              planning_ct.get("frame_of_reference_uid") if planning_ct else None,
                              self.cbct_markers)

    def cbct_candidates(self, pid: str, planning_ct: dict | None, used: set[str],
                        earliest: float) -> list[dict]:
        pd = self.patients.get(pid)
        if pd is None:
            return []
        return [x for x in pd.series.values()
                if x["series_uid"] not in used and self.is_cbct(x, planning_ct)
                and x.get("completed_at", 0.0) >= earliest]

    def spatial_registration_for(self, pid: str, cbct_for: str | None,
                                 planning_for: str | None) -> str | None:
        """A rigid Spatial Registration received for this patient that relates the CBCT's
        Frame of Reference to the planning CT's (the imaging system's match), if any:
        the latest one."""
        pd = self.patients.get(pid)
        if pd is None or not cbct_for or not planning_for:
            return None
        for r in sorted(pd.regs, key=lambda r: -r["t"]):
            if {cbct_for, planning_for} <= set(r["frames"]):
                return r["path"]
        return None

    def planning_ct_frame(self, pid: str, ct_series_uid: str) -> str | None:
        pd = self.patients.get(pid)
        return ((pd.series.get(ct_series_uid) or {}).get("frame_of_reference_uid")
                if pd else None)
