"""A small archive as a clinic would export it, made from the phantom replay cases: for the
archive replay's test and benchmark.

:func:`build_cases` builds pelvis cases in the replay layout (:mod:`adaptive.replay.build`:
planning CT + RT Struct, simulated daily CBCTs with ground truth) and plans each from
scratch (its scheduled plan, labelled with its treatment protocol as a TPS would);
:func:`export_archive` copies their DICOM objects into one
folder laid out like a PACS export (``<patient>/<study>/<modality>_<series number>/IMnnnn``,
file names that say nothing about content), with each fraction's ground truth beside it.
:func:`corrupt_series` truncates the pixel data of one image of a series (a "bad series":
its headers still read, its pixels do not).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pydicom

from adaptive.config import config_path
from adaptive.pipeline.planning import PlanSettings, make_scheduled_plan
from adaptive.replay.build import PELVIS_GOALS, PelvisCaseConfig, build_pelvis_case
from adaptive.replay.discover import safe_name

#: Treatment Protocols (300A,0009) the phantom's scheduled plans carry, as a TPS would write
#: the course's protocol (mapped to ``prostate`` by ``config/protocols.toml``)
TREATMENT_PROTOCOL = "CHHiP 60Gy/20fx"


def label_protocol(rtplan: Path, protocol: str) -> None:
    """Set the plan's Treatment Protocols (RT General Plan module, Type 3), in place."""
    ds = pydicom.dcmread(rtplan)
    ds.TreatmentProtocols = protocol
    ds.save_as(rtplan, enforce_file_format=True)


@dataclass(frozen=True)
class ArchiveCase:
    """One built case: its replay-layout folder and its fraction folders."""

    name: str
    patient_id: str
    directory: Path
    fractions: tuple[Path, ...]


def coarse_pelvis(name: str, fractions: int, spacing_mm: float = 6.0) -> PelvisCaseConfig:
    """The committed pelvis case's field of view at ``spacing_mm`` isotropic voxels."""
    def n(extent_mm: float) -> int:
        return round(extent_mm / spacing_mm)

    sp = (spacing_mm,) * 3
    return PelvisCaseConfig(name=name, fractions=fractions, planning_spacing_mm=sp,
                            planning_size_ijk=(n(480), n(360), n(210)), cbct_spacing_mm=sp,
                            cbct_size_ijk=(n(270), n(270), n(135)), cbct_fov_diameter_mm=264.0)


def build_cases(root: str | Path, names_seeds: list[tuple[str, int]], fractions: int,
                spacing_mm: float, plan_settings: PlanSettings) -> list[ArchiveCase]:
    """Build and plan one pelvis case per (name, seed) under ``root`` (replay layout)."""
    root = Path(root)
    out = []
    for name, seed in names_seeds:
        entry = build_pelvis_case(root, coarse_pelvis(name, fractions, spacing_mm), seed)
        case = root / entry["path"]
        make_scheduled_plan(case, config_path(*PELVIS_GOALS), settings=plan_settings)
        label_protocol(case / "planning" / "RP.dcm", TREATMENT_PROTOCOL)
        out.append(ArchiveCase(name, entry["patient_id"], case,
                               tuple(root / f["path"] for f in entry["fractions"])))
    return out


def export_archive(cases: list[ArchiveCase], archive: str | Path) -> Path:
    """Copy every DICOM object of ``cases`` (planning CT, RT Struct, scheduled RT Plan,
    CBCTs; not the scheduled RT Dose) into ``archive`` in a PACS-export layout; the ground
    truth of each fraction goes to ``<patient>/truth/<fraction>/``."""
    archive = Path(archive)
    for c in cases:
        files = sorted((c.directory / "planning" / "CT").glob("*.dcm"))
        files += [c.directory / "planning" / "RS.dcm", c.directory / "planning" / "RP.dcm"]
        for fx in c.fractions:
            files += sorted((fx / "CBCT").glob("*.dcm"))
            t = archive / safe_name(c.patient_id) / "truth" / fx.name
            t.mkdir(parents=True, exist_ok=True)
            for f in ("truth.json", "dvf.mha", "RS.dcm"):
                shutil.copy2(fx / "truth" / f, t / f)
        counters: dict[Path, int] = {}
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            d = (archive / safe_name(c.patient_id) / safe_name(str(ds.StudyInstanceUID))
                 / f"{ds.Modality}_{ds.get('SeriesNumber', 0)}")
            counters[d] = counters.get(d, 0) + 1
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, d / f"IM{counters[d]:04d}")
    return archive


def corrupt_series(series_files: list[Path]) -> Path:
    """Truncate the pixel data of the middle image of a series (in place); returns it."""
    f = sorted(series_files)[len(series_files) // 2]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - len(data) // 3])
    return f
