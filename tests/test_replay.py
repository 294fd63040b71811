"""Replay cases: DICOM + ground truth written by the builder, read back through real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from adaptive.dicom import read_ct_series, read_rtstruct
from adaptive.errors import ConfigError, ReplayDataError
from adaptive.geometry.dvf_io import read_dvf, write_dvf
from adaptive.geometry.jacobian import jacobian_determinant
from adaptive.geometry.volume import Grid, Volume, displacement_warp
from adaptive.phantoms.deformation import DailyVariation, daily_dvf
from adaptive.phantoms.pelvis import GasPocket, PelvisAnatomy
from adaptive.phantoms.shapes import rotation_matrix
from adaptive.registration.evaluate import dice
from adaptive.replay import load_manifest
from adaptive.replay.build import (
    PelvisCaseConfig,
    ReplayConfig,
    Tg119Config,
    build_replay_data,
    det_uid,
    load_replay_config,
)
from adaptive.replay.manifest import dumps_manifest

REPO = Path(__file__).resolve().parent.parent

SMALL = ReplayConfig(
    seed=4242,
    pelvis=PelvisCaseConfig(name="pelvis_small", fractions=2, planning_spacing_mm=(3.5, 3.5, 3.5),
                            planning_size_ijk=(116, 80, 44), cbct_spacing_mm=(3.5, 3.5, 3.5),
                            cbct_size_ijk=(73, 73, 35), cbct_fov_diameter_mm=240.0),
    tg119=Tg119Config(spacing_mm=(4.0, 4.0, 4.0)))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay")
    path = build_replay_data(out, config=SMALL, scheduled_plan=False)
    return load_manifest(path)




def test_dvf_roundtrip_keeps_geometry_and_components(tmp_path):
    g = Grid(shape=(4, 5, 6), origin=(-10.0, 20.5, -300.0), spacing=(1.5, 2.0, 3.0),
             direction=rotation_matrix(0, 0, 20))
    rng = np.random.default_rng(0)
    u = rng.normal(size=g.shape + (3,)).astype(np.float32)
    u[..., 0] += 100.0  # components stay in (x, y, z) order
    p = write_dvf(tmp_path / "dvf.mha", u, g)
    back, g2 = read_dvf(p)
    assert np.array_equal(back, u)
    assert g2.same_as(g)
    with pytest.raises(ReplayDataError):
        write_dvf(tmp_path / "bad.mha", u[..., :2], g)
    with pytest.raises(ReplayDataError, match="not found"):
        read_dvf(tmp_path / "missing.mha")


def test_manifest_lists_cases_fractions_and_files(built):
    m = built
    assert m.names() == ["pelvis_small", "tg119_cshape", "tg119_prostate"]
    pel = m.case("pelvis_small")
    assert pel.anatomy == "male_pelvis" and pel.seed == 4242
    assert pel.prescription.total_dose_gy == pytest.approx(60.0)
    assert m.case("tg119_cshape").prescription.number_of_fractions == 25
    assert m.case("tg119_prostate").prescription.dose_per_fraction_gy == pytest.approx(1.8)
    assert m.case("tg119_prostate").fractions == []
    assert [f.number for f in pel.fractions] == [1, 2]
    assert pel.planning_rtplan.name == "RP.dcm" and not pel.has_rtplan  # left for the planning stage
    for f in pel.fractions:
        for p in (f.cbct_dir, f.truth_dvf, f.truth_rtstruct, f.truth_json):
            assert p.exists(), p
    assert pel.fraction(2).label == "fx02"
    with pytest.raises(ReplayDataError):
        pel.fraction(9)
    with pytest.raises(ReplayDataError):
        m.case("nope")


def test_cbct_has_own_frame_centred_on_isocenter(built):
    pel = built.case("pelvis_small")
    _, plan_info = read_ct_series(pel.planning_ct_dir)
    assert plan_info.frame_of_reference_uid == pel.planning_frame_of_reference_uid
    fors = set()
    for f in pel.fractions:
        cbct, info = read_ct_series(f.cbct_dir)
        assert info.frame_of_reference_uid != plan_info.frame_of_reference_uid
        assert info.frame_of_reference_uid == f.cbct_frame_of_reference_uid
        assert "CBCT" in info.series_description
        assert info.patient.patient_id == plan_info.patient.patient_id
        fors.add(info.frame_of_reference_uid)
        assert np.allclose(cbct.grid.center_lps(), 0.0, atol=1e-3)
        dvf, dgrid = read_dvf(f.truth_dvf)
        assert dgrid.same_as(cbct.grid)
        truth = f.truth()
        iso = np.asarray(truth["isocenter_planning_lps_mm"])
        assert np.allclose(iso, pel.isocenter_lps_mm, atol=1e-3)
        # the CBCT origin voxel maps to isocenter + setup shift + (small) organ motion
        c = tuple(s // 2 for s in dgrid.shape)
        t = np.asarray(truth["variation"]["setup_translation_mm"])
        assert np.linalg.norm(dvf[c] - (iso + t)) < 8.0
        assert jacobian_determinant(dvf, dgrid).min() > 0
    assert len(fors) == len(pel.fractions)


def test_truth_json_reproduces_the_dvf(built):
    """truth.json fully describes the field: recomputing it from the record gives the file."""
    pel = built.case("pelvis_small")
    anat = PelvisAnatomy.sample(pel.seed, ptv_margin_mm=SMALL.pelvis.ptv_margin_mm)
    for f in pel.fractions:
        rec = f.truth()
        v = dict(rec["variation"])
        v.pop("rectal_gas")
        v["gas_pockets"] = tuple(GasPocket(tuple(g["center_mm"]), tuple(g["semi_axes_mm"]))
                                 for g in v["gas_pockets"])
        var = DailyVariation(**{k: tuple(x) if isinstance(x, list) else x for k, x in v.items()})
        dvf, grid = read_dvf(f.truth_dvf)
        again = daily_dvf(grid, anat, var, rec["isocenter_planning_lps_mm"])
        assert np.abs(again - dvf).max() < 1e-3
        assert f.rectal_gas == bool(var.gas_pockets)


@pytest.mark.parametrize("fraction", [1, 2])
def test_warping_planning_structures_with_truth_dvf_reproduces_truth_structures(built, fraction):
    """THE KEY TEST: planning RS (rasterised on the planning CT) pulled back through
    truth/dvf.mha onto the CBCT grid matches truth/RS.dcm (rasterised on the CBCT)."""
    pel = built.case("pelvis_small")
    fx = pel.fraction(fraction)
    plan_ct, plan_info = read_ct_series(pel.planning_ct_dir)
    plan_ss = read_rtstruct(pel.planning_rtstruct, series=plan_info, grid=plan_ct.grid)
    cbct, cbct_info = read_ct_series(fx.cbct_dir)
    truth_ss = read_rtstruct(fx.truth_rtstruct, series=cbct_info, grid=cbct.grid)
    dvf, dgrid = read_dvf(fx.truth_dvf)
    assert dgrid.same_as(cbct.grid)
    assert set(truth_ss.names()) == set(plan_ss.names()) == set(pel.roi_names)
    for name in ("PROSTATE", "BLADDER", "RECTUM", "PTV"):
        src = plan_ss.get(name).mask
        warped = displacement_warp(Volume(src.array.astype(bool), plan_ct.grid, "mask"), dvf, cbct.grid)
        truth = truth_ss.get(name).mask.array.astype(bool)
        assert truth.sum() > 50, name
        d = dice(warped.array, truth)
        assert d >= 0.95, (name, d)
    # and the structures did move: the identity mapping (FoR offset only) is clearly worse
    # for at least one organ somewhere in the course
    iso = np.asarray(pel.isocenter_lps_mm)
    ident = np.broadcast_to(iso.astype(np.float32), dvf.shape).copy()
    worse = []
    for name in ("BLADDER", "RECTUM", "PROSTATE"):
        w = displacement_warp(Volume(plan_ss.get(name).mask.array.astype(bool), plan_ct.grid), ident, cbct.grid)
        worse.append(dice(w.array, truth_ss.get(name).mask.array.astype(bool)))
    assert min(worse) < 0.93


def test_planning_structures_match_phantom_masks(built):
    pel = built.case("pelvis_small")
    ct, info = read_ct_series(pel.planning_ct_dir)
    assert ct.grid.shape == pel.planning_grid.shape_zyx
    assert np.allclose(ct.grid.spacing, pel.planning_grid.spacing_mm)
    from adaptive.phantoms.pelvis import default_planning_grid, pelvis_phantom

    anat = PelvisAnatomy.sample(pel.seed, ptv_margin_mm=SMALL.pelvis.ptv_margin_mm)
    ph = pelvis_phantom(default_planning_grid(anat, (3.5, 3.5, 3.5), (116, 80, 44)), pel.seed, anatomy=anat)
    assert np.abs(ct.array - ph.ct.array).max() <= 0.5  # int16 rounding only
    ss = read_rtstruct(pel.planning_rtstruct, series=info, grid=ct.grid)
    for name in ("PROSTATE", "BLADDER", "PTV", "FEMUR_L"):
        assert dice(ss.get(name).mask.array.astype(bool), ph.masks[name]) > 0.95, name


def test_uids_are_deterministic():
    assert det_uid("a", 1, "ct", 3) == det_uid("a", 1, "ct", 3)
    assert det_uid("a", 1, "ct", 3) != det_uid("a", 2, "ct", 3)
    assert len(det_uid("x" * 100, 2**40)) <= 64


def test_manifest_writer_round_trips_and_loader_errors(tmp_path):
    import tomllib

    data = {"schema_version": 1, "seed": 3, "cases": [
        {"name": 'a "q"', "path": "a", "anatomy": "x", "planning_ct": "a/CT", "planning_rtstruct": "a/RS.dcm",
         "planning_grid": {"shape_zyx": [1, 2, 3], "spacing_mm": [1.0, 1.0, 2.5], "origin_lps_mm": [0.0, -1.5, 2.0]},
         "fractions": [{"number": 1, "path": "a/fx01", "cbct": "a/fx01/CBCT", "truth_dvf": "d",
                        "truth_rtstruct": "r", "truth_json": "j", "rectal_gas": True}]}]}
    text = dumps_manifest(data)
    assert tomllib.loads(text)["cases"][0]["fractions"][0]["rectal_gas"] is True
    (tmp_path / "manifest.toml").write_text(text)
    m = load_manifest(tmp_path)
    assert m.cases[0].name == 'a "q"' and m.cases[0].fractions[0].cbct_dir == tmp_path.resolve() / "a/fx01/CBCT"
    (tmp_path / "manifest.toml").write_text(text.replace('planning_ct = "a/CT"\n', ""))
    with pytest.raises(ReplayDataError, match="planning_ct"):
        load_manifest(tmp_path)
    # the schema is typed: a misspelt key, a wrong type and counts that disagree are named
    for bad, key in ((text.replace("rectal_gas = true", "rectal_gass = true"), "rectal_gass"),
                     (text.replace("seed = 3", 'seed = "3"'), "seed"),
                     (text.replace('path = "a"\n', 'path = "a"\nn_fractions = 2\n'),
                      "n_fractions = 2 but 1")):
        assert bad != text
        (tmp_path / "manifest.toml").write_text(bad)
        with pytest.raises(ReplayDataError, match=key) as e:
            load_manifest(tmp_path)
        assert str(tmp_path / "manifest.toml") in str(e.value)
    (tmp_path / "manifest.toml").write_text(text.replace("schema_version = 1", "schema_version = 2"))
    with pytest.raises(ReplayDataError, match="schema_version 2 is not supported"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.toml").write_text("schema_version = [")
    with pytest.raises(ReplayDataError, match="invalid TOML"):
        load_manifest(tmp_path)
    with pytest.raises(ReplayDataError, match="not found"):
        load_manifest(tmp_path / "nowhere")


def test_replay_config_rejects_unknown_keys(tmp_path):
    p = tmp_path / "replay.toml"
    p.write_text("seed = 1\n[pelvis]\nfractoins = 3\n")
    with pytest.raises(ConfigError, match="fractoins"):
        load_replay_config(p)
    p.write_text("seed = 1\n[pelvis]\nfractions = 'x'\n")
    with pytest.raises(ConfigError, match="fractions"):
        load_replay_config(p)
    cfg = load_replay_config(REPO / "config" / "replay.toml")
    assert cfg.pelvis.fractions >= 3


def test_committed_replay_data_matches_its_manifest():
    root = REPO / "replay_data"
    m = load_manifest(root)
    assert {"tg119_cshape", "tg119_prostate"} <= set(m.names())
    pelvis = [c for c in m.cases if c.anatomy == "male_pelvis"]
    assert pelvis and len(pelvis[0].fractions) >= 3
    # day-to-day rectal gas: some fractions have it, some do not
    assert len({f.rectal_gas for f in pelvis[0].fractions}) == 2
    total = 0
    for c in m.cases:
        files = sorted(c.planning_ct_dir.glob("*.dcm"))
        assert len(files) == c.planning_grid.shape_zyx[0], c.name
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert ds.SeriesInstanceUID == c.planning_series_uid
        assert ds.FrameOfReferenceUID == c.planning_frame_of_reference_uid
        assert (int(ds.Rows), int(ds.Columns)) == tuple(c.planning_grid.shape_zyx[1:])
        assert c.planning_rtstruct.is_file()
        rs = pydicom.dcmread(c.planning_rtstruct, stop_before_pixels=True)
        assert [r.ROIName for r in rs.StructureSetROISequence] == c.roi_names
        for f in c.fractions:
            cb = sorted(f.cbct_dir.glob("*.dcm"))
            assert len(cb) == c.cbct_grid.shape_zyx[0]
            ds = pydicom.dcmread(cb[0], stop_before_pixels=True)
            assert ds.SeriesInstanceUID == f.cbct_series_uid
            assert ds.FrameOfReferenceUID == f.cbct_frame_of_reference_uid != c.planning_frame_of_reference_uid
            assert f.truth_dvf.is_file() and f.truth_rtstruct.is_file()
            assert f.truth()["cbct_series_uid"] == f.cbct_series_uid
        total += sum(p.stat().st_size for p in c.directory.rglob("*") if p.is_file())
    # nothing in the folder that the manifest does not describe
    listed = {c.directory.name for c in m.cases}
    present = {p.name for p in root.iterdir() if p.is_dir()}
    assert present == listed
    # 6 pelvis fractions (3 isocenter-centred + one per other CBCT frame convention) with
    # truth fields stored to 1/1024 mm: ~41 MB
    assert total < 45e6


def test_committed_pelvis_truth_structures_follow_the_truth_dvf():
    m = load_manifest(REPO / "replay_data")
    pel = next(c for c in m.cases if c.anatomy == "male_pelvis")
    fx = next(f for f in pel.fractions if f.rectal_gas)
    plan_ct, plan_info = read_ct_series(pel.planning_ct_dir)
    plan_ss = read_rtstruct(pel.planning_rtstruct, series=plan_info, grid=plan_ct.grid)
    cbct, cbct_info = read_ct_series(fx.cbct_dir)
    truth_ss = read_rtstruct(fx.truth_rtstruct, series=cbct_info, grid=cbct.grid)
    dvf, dgrid = read_dvf(fx.truth_dvf)
    assert dgrid.same_as(cbct.grid)
    for name in ("PROSTATE", "BLADDER", "RECTUM", "PTV"):
        warped = displacement_warp(Volume(plan_ss.get(name).mask.array.astype(bool), plan_ct.grid), dvf,
                                   cbct.grid)
        assert dice(warped.array, truth_ss.get(name).mask.array.astype(bool)) >= 0.95, name
    # gas in today's rectum (CBCT) where the planning CT has none
    assert plan_ct.array[plan_ss.get("RECTUM").mask.array.astype(bool)].min() > -300
    assert cbct.array[truth_ss.get("RECTUM").mask.array.astype(bool)].min() < -500


def test_written_objects_pass_dciodvfy(built, dciodvfy):
    pel = built.case("pelvis_small")
    fx = pel.fraction(1)
    files = [min(pel.planning_ct_dir.glob("*.dcm")), pel.planning_rtstruct,
             min(fx.cbct_dir.glob("*.dcm")), fx.truth_rtstruct]
    for f in files:
        errors, out = dciodvfy(f)
        assert not errors, (f, out[-2000:])


def test_cli_lists_committed_replay_data(capsys):
    from adaptive.cli import main

    assert main(["replay-data", "list", "--dir", str(REPO / "replay_data")]) == 0
    out = capsys.readouterr().out
    assert "pelvis01" in out and "tg119_cshape" in out and "RP.dcm" in out


def test_worker_thread_setting_leaves_the_registration_its_own_count():
    """A Dask worker's thread setting goes through the registration's ITK backend, so every
    registration then runs with its configured count whatever the worker ran before (the
    archive's results must not depend on the order the scheduler hands out fractions)."""
    import socket

    from adaptive.registration.elastix_backend import itk_module
    from adaptive.replay.archive import _apply_threads

    itk = itk_module(2)                      # a first registration on this worker
    _apply_threads({socket.gethostname(): 1})   # the next task's worker set-up
    assert itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads() == 1
    itk_module(2)                            # the next registration asks for its count
    assert itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads() == 2
