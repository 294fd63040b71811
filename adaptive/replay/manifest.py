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
``truth_json``, ``cbct_series_uid``, ``cbct_frame_of_reference_uid``, ``rectal_gas``). The
complete schema, with the informational keys the builder also writes, is the typed model
below (``_ManifestFile``); the loader refuses unknown keys and wrong types.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from pydantic.dataclasses import dataclass as pydantic_dataclass

from adaptive.atomic import write_text_atomic
from adaptive.config import CONFIG_MODEL, Bool, Float, Int, Str, Text, validate_config
from adaptive.errors import ConfigError, ReplayDataError
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
# The file's schema: every key the builder writes (adaptive.replay.build), typed; unknown
# keys and wrong types are errors naming the file and the key (adaptive.config's models).

Vec3 = tuple[Float, Float, Float]


@pydantic_dataclass(config=CONFIG_MODEL)
class _GridEntry:
    shape_zyx: tuple[Int, Int, Int]
    spacing_mm: Vec3
    origin_lps_mm: Vec3


@pydantic_dataclass(config=CONFIG_MODEL)
class _PrescriptionEntry:
    dose_per_fraction_gy: Float
    number_of_fractions: Int
    total_dose_gy: Float | None = None
    target_roi_name: Text = "PTV"

    def __post_init__(self) -> None:
        if self.dose_per_fraction_gy <= 0 or self.number_of_fractions < 1:
            raise ValueError("dose_per_fraction_gy > 0 and number_of_fractions >= 1 expected")
        if self.total_dose_gy is not None and abs(
                self.total_dose_gy - self.dose_per_fraction_gy * self.number_of_fractions) > 1e-6:
            raise ValueError(f"total_dose_gy {self.total_dose_gy:g} is not dose_per_fraction_gy "
                             f"x number_of_fractions")


@pydantic_dataclass(config=CONFIG_MODEL)
class _FractionEntry:
    number: Int
    path: Text
    cbct: Text
    truth_dvf: Text
    truth_rtstruct: Text
    truth_json: Text
    cbct_series_uid: Str = ""
    cbct_frame_of_reference_uid: Str = ""
    convention: Text = "isocenter"
    rectal_gas: Bool = False
    #: the simulated variation, for the reader (the truth is truth.json and the DVF)
    isocenter_cbct_lps_mm: Vec3 | None = None
    setup_rotation_deg: Vec3 | None = None
    setup_translation_mm: Vec3 | None = None
    bladder_scale: Float | None = None


@pydantic_dataclass(config=CONFIG_MODEL)
class _CaseEntry:
    name: Text
    anatomy: Text
    path: Text
    planning_ct: Text
    planning_rtstruct: Text
    planning_grid: _GridEntry
    planning_rtplan: Text | None = None  # default: <path>/planning/RP.dcm
    planning_rtplan_note: Str = ""
    planning_rtplan_uid: Str = ""
    description: Str = ""
    seed: Int = 0
    patient_id: Str = ""
    planning_series_uid: Str = ""
    planning_frame_of_reference_uid: Str = ""
    isocenter_lps_mm: Vec3 | None = None
    roi_names: list[Str] = field(default_factory=list)
    roi_types: list[Str] = field(default_factory=list)
    roi_volumes_cc: dict[str, Float] = field(default_factory=dict)
    prescription: _PrescriptionEntry | None = None
    cbct_grid: _GridEntry | None = None
    cbct_fov_diameter_mm: Float | None = None
    n_fractions: Int | None = None
    size_bytes: Int = 0
    software_version: Str = ""
    fractions: list[_FractionEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n_fractions is not None and self.n_fractions != len(self.fractions):
            raise ValueError(f"n_fractions = {self.n_fractions} but {len(self.fractions)} "
                             f"[[cases.fractions]] tables")
        numbers = [f.number for f in self.fractions]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"fraction numbers repeat: {numbers}")
        if self.roi_types and len(self.roi_types) != len(self.roi_names):
            raise ValueError("roi_types and roi_names differ in length")


@pydantic_dataclass(config=CONFIG_MODEL)
class _ManifestFile:
    schema_version: Int
    cases: list[_CaseEntry]
    software: Str = ""
    software_version: Str = ""
    research_use: Str = ""
    seed: Int = 0


def _grid_info(g: _GridEntry) -> GridInfo:
    return GridInfo(g.shape_zyx, g.spacing_mm, g.origin_lps_mm)


def _fraction(case: str, fx: _FractionEntry, root: Path) -> Fraction:
    return Fraction(case=case, number=fx.number, directory=root / fx.path,
                    cbct_dir=root / fx.cbct, truth_dvf=root / fx.truth_dvf,
                    truth_rtstruct=root / fx.truth_rtstruct, truth_json=root / fx.truth_json,
                    cbct_series_uid=fx.cbct_series_uid,
                    cbct_frame_of_reference_uid=fx.cbct_frame_of_reference_uid,
                    rectal_gas=fx.rectal_gas, convention=fx.convention)


def _case(c: _CaseEntry, root: Path) -> Case:
    rx = c.prescription
    return Case(
        name=c.name, anatomy=c.anatomy, directory=root / c.path,
        planning_ct_dir=root / c.planning_ct, planning_rtstruct=root / c.planning_rtstruct,
        planning_rtplan=root / (c.planning_rtplan or f"{c.path}/planning/RP.dcm"),
        prescription=(Prescription(rx.dose_per_fraction_gy, rx.number_of_fractions,
                                   rx.target_roi_name) if rx else None),
        planning_grid=_grid_info(c.planning_grid), seed=c.seed, description=c.description,
        patient_id=c.patient_id, planning_series_uid=c.planning_series_uid,
        planning_frame_of_reference_uid=c.planning_frame_of_reference_uid,
        isocenter_lps_mm=c.isocenter_lps_mm, roi_names=list(c.roi_names),
        cbct_grid=_grid_info(c.cbct_grid) if c.cbct_grid else None,
        fractions=sorted((_fraction(c.name, f, root) for f in c.fractions),
                         key=lambda f: f.number),
        size_bytes=c.size_bytes)


def load_manifest(path: str | Path) -> Manifest:
    """Load ``manifest.toml`` (a file, or a folder containing one) into dataclasses with
    absolute paths. Raises :class:`ReplayDataError` naming the file and key on problems
    (a missing or unknown key, a wrong type, counts that disagree)."""
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
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ReplayDataError(f"manifest schema_version {version!r} is not supported "
                              f"(expected {SCHEMA_VERSION}) [{path}]")
    try:
        m = validate_config(_ManifestFile, data, path)
    except ConfigError as e:
        raise ReplayDataError(str(e)) from None
    root = path.parent.resolve()
    return Manifest(root=root, path=path, schema_version=m.schema_version,
                    software_version=m.software_version, seed=m.seed,
                    cases=[_case(c, root) for c in m.cases])


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
