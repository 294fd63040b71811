"""The replay-data manifest (``manifest.toml``): which cases exist, where their files are.

Layout of a replay folder (paths in the manifest are relative to the manifest's folder)::

    manifest.toml
    <case>/planning/CT/            planning CT series (DICOM CT Image Storage)
    <case>/planning/RS.dcm         planning RT Structure Set (references planning/CT)
    <case>/planning/RP.dcm         scheduled RT Plan - OPTIONAL, written later by planning
    <case>/fxNN/CBCT/              the day's CBCT series (own Frame of Reference, origin = isocenter)
    <case>/fxNN/truth/dvf.mha      CBCT point x ↔ planning point x + u(x) (LPS mm, CBCT grid)
    <case>/fxNN/truth/RS.dcm       truth structures on the CBCT (references fxNN/CBCT)
    <case>/fxNN/truth/truth.json   the fraction's parameters and measured facts

Manifest keys: top level ``schema_version``, ``software``, ``software_version``,
``research_use``, ``seed``; one ``[[cases]]`` table per case (``name``, ``anatomy``,
``description``, ``seed``, ``path``, ``planning_ct``, ``planning_rtstruct``, ``planning_rtplan``,
``patient_id``, ``planning_series_uid``, ``planning_frame_of_reference_uid``,
``isocenter_lps_mm``, ``roi_names``, ``n_fractions``, ``size_bytes``, sub-tables
``prescription``, ``planning_grid``, optional ``cbct_grid``) and one ``[[cases.fractions]]``
table per fraction (``number``, ``path``, ``cbct``, ``truth_dvf``, ``truth_rtstruct``,
``truth_json``, ``cbct_series_uid``, ``cbct_frame_of_reference_uid``, ``rectal_gas``).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from adaptive.atomic import write_text_atomic
from adaptive.errors import ReplayDataError
from adaptive.model.plan import Prescription
from adaptive.replay.truth import read_truth_json

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.toml"


@dataclass
class Fraction:
    """One archived fraction of a case (absolute paths)."""

    case: str
    number: int
    directory: Path
    cbct_dir: Path
    truth_dvf: Path
    truth_rtstruct: Path
    truth_json: Path
    cbct_series_uid: str = ""
    cbct_frame_of_reference_uid: str = ""
    rectal_gas: bool = False
    convention: str = "isocenter"  # the CBCT's frame convention (see adaptive.replay.build)

    @property
    def label(self) -> str:
        return f"fx{self.number:02d}"

    def truth(self) -> dict:
        """The fraction's ``truth.json`` record."""

        return read_truth_json(self.truth_json)


@dataclass
class GridInfo:
    """Grid summary from the manifest: shape (nz, ny, nx), spacing (i, j, k) mm, origin LPS mm."""

    shape_zyx: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_lps_mm: tuple[float, float, float]


@dataclass
class Case:
    """One replay case (absolute paths). ``planning_rtplan`` is where the scheduled plan
    lives once the planning stage has written it (``has_rtplan`` tells whether it exists)."""

    name: str
    anatomy: str
    directory: Path
    planning_ct_dir: Path
    planning_rtstruct: Path
    planning_rtplan: Path
    prescription: Prescription | None
    planning_grid: GridInfo
    seed: int = 0
    description: str = ""
    patient_id: str = ""
    planning_series_uid: str = ""
    planning_frame_of_reference_uid: str = ""
    isocenter_lps_mm: tuple[float, float, float] | None = None
    roi_names: list[str] = field(default_factory=list)
    cbct_grid: GridInfo | None = None
    fractions: list[Fraction] = field(default_factory=list)
    size_bytes: int = 0

    @property
    def has_rtplan(self) -> bool:
        return self.planning_rtplan.is_file()

    def fraction(self, number: int) -> Fraction:
        for f in self.fractions:
            if f.number == number:
                return f
        raise ReplayDataError(f"case {self.name!r} has no fraction {number} "
                              f"(have {[f.number for f in self.fractions]})")


@dataclass
class Manifest:
    root: Path
    path: Path
    schema_version: int
    software_version: str
    seed: int
    cases: list[Case]

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise ReplayDataError(f"no case {name!r} in {self.path} (have {[c.name for c in self.cases]})")

    def names(self) -> list[str]:
        return [c.name for c in self.cases]


# --- loading -----------------------------------------------------------------------------


def _req(table: dict, key: str, where: str, path: Path, types=None):
    if key not in table:
        raise ReplayDataError(f"{where}: missing key {key!r} [{path}]")
    v = table[key]
    if types is not None and not isinstance(v, types):
        raise ReplayDataError(f"{where}.{key}: expected {types}, got {v!r} [{path}]")
    return v


def _grid_info(t: dict, where: str, path: Path) -> GridInfo:
    shape = _req(t, "shape_zyx", where, path, list)
    sp = _req(t, "spacing_mm", where, path, list)
    org = _req(t, "origin_lps_mm", where, path, list)
    if len(shape) != 3 or len(sp) != 3 or len(org) != 3:
        raise ReplayDataError(f"{where}: shape_zyx/spacing_mm/origin_lps_mm need 3 values [{path}]")
    return GridInfo(tuple(int(v) for v in shape), tuple(float(v) for v in sp), tuple(float(v) for v in org))


def load_manifest(path: str | Path) -> Manifest:
    """Load ``manifest.toml`` (a file, or a folder containing one) into dataclasses with
    absolute paths. Raises :class:`ReplayDataError` naming the file and key on problems."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ReplayDataError(f"replay manifest not found [{path}]")
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ReplayDataError(f"invalid TOML: {e} [{path}]") from e
    root = path.parent.resolve()
    version = _req(data, "schema_version", "manifest", path, int)
    if version != SCHEMA_VERSION:
        raise ReplayDataError(f"manifest schema_version {version} is not supported "
                              f"(expected {SCHEMA_VERSION}) [{path}]")
    cases = []
    for i, c in enumerate(_req(data, "cases", "manifest", path, list)):
        where = f"cases[{i}]"
        name = _req(c, "name", where, path, str)
        where = f"cases[{name}]"
        rx = c.get("prescription")
        presc = None
        if rx:
            presc = Prescription(float(_req(rx, "dose_per_fraction_gy", where + ".prescription", path, (int, float))),
                                 int(_req(rx, "number_of_fractions", where + ".prescription", path, int)),
                                 str(rx.get("target_roi_name", "PTV")))
        fractions = []
        for j, fx in enumerate(c.get("fractions", [])):
            fw = f"{where}.fractions[{j}]"
            fractions.append(Fraction(
                case=name, number=int(_req(fx, "number", fw, path, int)),
                directory=root / _req(fx, "path", fw, path, str),
                cbct_dir=root / _req(fx, "cbct", fw, path, str),
                truth_dvf=root / _req(fx, "truth_dvf", fw, path, str),
                truth_rtstruct=root / _req(fx, "truth_rtstruct", fw, path, str),
                truth_json=root / _req(fx, "truth_json", fw, path, str),
                cbct_series_uid=str(fx.get("cbct_series_uid", "")),
                cbct_frame_of_reference_uid=str(fx.get("cbct_frame_of_reference_uid", "")),
                rectal_gas=bool(fx.get("rectal_gas", False)),
                convention=str(fx.get("convention", "isocenter"))))
        iso = c.get("isocenter_lps_mm")
        cases.append(Case(
            name=name, anatomy=str(_req(c, "anatomy", where, path, str)),
            directory=root / _req(c, "path", where, path, str),
            planning_ct_dir=root / _req(c, "planning_ct", where, path, str),
            planning_rtstruct=root / _req(c, "planning_rtstruct", where, path, str),
            planning_rtplan=root / str(c.get("planning_rtplan", f"{c['path']}/planning/RP.dcm")),
            prescription=presc,
            planning_grid=_grid_info(_req(c, "planning_grid", where, path, dict), where + ".planning_grid", path),
            seed=int(c.get("seed", 0)), description=str(c.get("description", "")),
            patient_id=str(c.get("patient_id", "")),
            planning_series_uid=str(c.get("planning_series_uid", "")),
            planning_frame_of_reference_uid=str(c.get("planning_frame_of_reference_uid", "")),
            isocenter_lps_mm=tuple(float(v) for v in iso) if iso else None,
            roi_names=[str(v) for v in c.get("roi_names", [])],
            cbct_grid=_grid_info(c["cbct_grid"], where + ".cbct_grid", path) if "cbct_grid" in c else None,
            fractions=sorted(fractions, key=lambda f: f.number),
            size_bytes=int(c.get("size_bytes", 0))))
    return Manifest(root=root, path=path, schema_version=version,
                    software_version=str(data.get("software_version", "")),
                    seed=int(data.get("seed", 0)), cases=cases)


# --- writing ---------------------------------------------------------------------------------


def _plain(v, where: str = "manifest"):
    """``v`` without None values (TOML has no null); non-finite numbers are refused."""
    if isinstance(v, dict):
        return {str(k): _plain(x, f"{where}.{k}") for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [_plain(x, where) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        raise ReplayDataError(f"cannot write non-finite number {v} to the manifest ({where})")
    return v


def dumps_manifest(data: dict) -> str:
    """TOML text of ``data`` (str/int/float/bool/lists, nested tables and arrays of tables),
    written by tomli-w under a header comment."""
    try:
        body = tomli_w.dumps(_plain(data))
    except TypeError as e:
        raise ReplayDataError(f"cannot write the manifest: {e}") from e
    return ("# adaptive replay data manifest (generated by `adaptive replay-data build`).\n"
            "# RESEARCH USE ONLY - NOT FOR CLINICAL USE. Paths are relative to this file.\n\n"
            + body)


def write_manifest(path: str | Path, data: dict) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    return write_text_atomic(path, dumps_manifest(data))
