"""The `adaptive register` command on one committed replay fraction (truth known)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "replay_data" / "manifest.toml"


@pytest.fixture(scope="module")
def replay_fx():
    if not MANIFEST.is_file():
        pytest.skip("no replay_data/manifest.toml (run `adaptive replay-data build`)")
    from adaptive.replay.manifest import load_manifest

    m = load_manifest(MANIFEST)
    for case in m.cases:
        for fx in case.fractions:
            if fx.truth_dvf.is_file() and case.planning_rtstruct.is_file():
                return case, fx
    pytest.skip("no replay fraction with a truth DVF")


@pytest.fixture(scope="module")
def cli_out(replay_fx, tmp_path_factory):
    from adaptive.cli import main

    case, fx = replay_fx
    out = tmp_path_factory.mktemp("reg") / "out"
    iso = ",".join(repr(float(v)) for v in case.isocenter_lps_mm)
    rc = main(["register", str(fx.cbct_dir), str(case.planning_ct_dir), "--structures",
               str(case.planning_rtstruct), "--isocenter", iso, "-o", str(out)])
    assert rc == 0
    return case, fx, out


def test_register_command_outputs_match_truth(cli_out):
    from adaptive.dicom.ct_series import read_ct_series
    from adaptive.dicom.rtstruct import read_rtstruct
    from adaptive.geometry.dvf_io import read_dvf
    from adaptive.registration.evaluate import dice, dilate_mm, tre

    _case, fx, out = cli_out
    cbct, cb_info = read_ct_series(fx.cbct_dir)
    dvf, grid = read_dvf(out / "dvf.mha")
    truth, tgrid = read_dvf(fx.truth_dvf)
    assert grid.same_as(cbct.grid) and tgrid.same_as(grid)
    truth_ss = read_rtstruct(fx.truth_rtstruct, grid=grid)
    ptv20 = dilate_mm(truth_ss.mask("PTV", grid), grid, 20.0)
    e = tre(dvf, truth, ptv20, grid)
    assert e["mean_mm"] < 2.0 and e["max_mm"] < 5.0, e  # TG-132
    rec = json.loads((out / "registration.json").read_text())
    assert rec["fallback"] is None
    assert rec["quality"]["jacobian_fraction_nonpositive"] == 0.0
    assert set(rec["timings_s"]["registration_stages"]) >= {"rigid", "deformable", "total"}
    # synthetic CT: the CBCT's Frame of Reference and study, a new series whose grid holds the
    # CBCT's voxel lattice and extends beyond it (the rigidly mapped planning CT)
    sct_full, sct_info = read_ct_series(out / "synthetic_ct")
    assert sct_info.frame_of_reference_uid == cb_info.frame_of_reference_uid
    assert sct_info.series_instance_uid != cb_info.series_instance_uid
    assert sct_info.study == cb_info.study  # every study-level attribute, not only the UID
    assert np.allclose(sct_full.grid.spacing, cbct.grid.spacing)
    lo, hi = sct_full.grid.bounds_lps()
    clo, chi = cbct.grid.bounds_lps()
    assert np.all(lo <= clo + 1e-3) and np.all(hi >= chi - 1e-3) and sct_full.grid.n_voxels > \
        cbct.grid.n_voxels
    sct = sct_full.resample_to(cbct.grid, order=0)  # the lattices coincide: an exact copy
    # propagated structures reference the synthetic CT and agree with the truth contours
    prop = read_rtstruct(out / "RS.dcm", series=sct_info, grid=grid)
    for organ in ("PROSTATE", "BLADDER", "RECTUM"):
        assert dice(prop.mask(organ, grid), truth_ss.mask(organ, grid)) > 0.85, organ
    near_body = dilate_mm(truth_ss.mask("BODY", grid), grid, 6.0)  # edge voxels: partial volume
    assert np.mean(sct.array[~near_body] < -900) > 0.95


def test_register_command_dicom_valid(cli_out, dciodvfy):
    case, _fx, out = cli_out
    for p in (out / "REG.dcm", out / "RS.dcm", min((out / "synthetic_ct").iterdir())):
        errors, text = dciodvfy(p)
        assert not errors, f"{p}: {text}"
    from adaptive.geometry.dvf_io import read_dvf
    from adaptive.registration.dicom_reg import read_deformable_registration

    reg = read_deformable_registration(out / "REG.dcm")
    dvf, _ = read_dvf(out / "dvf.mha")
    np.testing.assert_allclose(reg.dvf_lps_mm, dvf, atol=1e-3)
    ds = pydicom.dcmread(out / "REG.dcm")
    assert ds.DeformableRegistrationSequence[0].SourceFrameOfReferenceUID == \
        case.planning_frame_of_reference_uid


def test_structure_set_and_registration_name_the_synthetic_ct_written_beside_them(cli_out):
    """The synthetic CT is written by a child process while the structure set and the
    registration, which name its slices, are written: every slice they reference is a file
    of the synthetic CT series, with that series' UID."""
    _case, _fx, out = cli_out
    sct = {}
    for f in (out / "synthetic_ct").glob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sct[str(ds.SOPInstanceUID)] = str(ds.SeriesInstanceUID)
    assert sct and len(set(sct.values())) == 1
    series_uid = next(iter(sct.values()))
    rs = pydicom.dcmread(out / "RS.dcm")
    refs = {str(im.ReferencedSOPInstanceUID) for rc in rs.ROIContourSequence
            for c in rc.get("ContourSequence", []) for im in c.get("ContourImageSequence", [])}
    assert refs and refs <= set(sct)
    rser = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0]
    assert str(rser.SeriesInstanceUID) == series_uid
    reg = pydicom.dcmread(out / "REG.dcm")
    listed = {str(i.ReferencedSOPInstanceUID) for s in reg.ReferencedSeriesSequence
              if str(s.SeriesInstanceUID) == series_uid for i in s.ReferencedInstanceSequence}
    assert listed == set(sct)


def test_an_error_beside_the_synthetic_ct_writer_is_the_one_raised(replay_fx, tmp_path,
                                                                   monkeypatch):
    """When writing the registration object fails while the child writes the synthetic CT
    (here failing too), the parent's error is raised, not the child's, and the child is
    ended."""
    import adaptive.registration.register_and_write as rw
    from adaptive.errors import DicomWriteError
    from services.ready import pid_alive

    started = []
    real_start = rw.start_in_child

    def start(*a, **k):
        run = real_start(*a, **k)
        started.append(run.pid)
        return run

    def broken(*_a, **_k):
        raise DicomWriteError("REG.dcm: disk said no")

    def child_fails(*_a, **_k):
        raise DicomWriteError("synthetic CT: also no")

    monkeypatch.setattr(rw, "start_in_child", start)
    monkeypatch.setattr(rw, "write_synthetic_ct", child_fails)
    monkeypatch.setattr(rw, "write_deformable_registration", broken)
    case, fx = replay_fx
    with pytest.raises(DicomWriteError, match="disk said no"):
        rw.register_fraction(fx.cbct_dir, case.planning_ct_dir,
                             structures=case.planning_rtstruct,
                             isocenter_lps_mm=case.isocenter_lps_mm, out_dir=tmp_path / "out")
    assert len(started) == 1 and not pid_alive(started[0])
