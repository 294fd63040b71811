"""``adaptive dose`` end to end through real DICOM files."""

from __future__ import annotations

import numpy as np

from adaptive.cli import main
from adaptive.dicom.ct_series import write_ct_series
from adaptive.dicom.provenance import new_uid
from adaptive.dicom.rtdose import read_rtdose
from adaptive.dicom.rtplan import write_rtplan
from adaptive.geometry.volume import Grid, Volume
from adaptive.model import Beam, ControlPoint, PatientInfo, Plan, SeriesInfo


def test_dose_command_writes_rtdose(tmp_path, dciodvfy):
    g = Grid((20, 40, 30), origin=[-58.0, -78.0, -38.0], spacing=[4.0, 4.0, 4.0])
    hu = np.full(g.shape, -1000.0, np.float32)
    hu[:, 10:, :] = 0.0  # water from y = -40 mm (anterior surface) downwards
    info = SeriesInfo(PatientInfo("DOSE1", "Test^Dose"), new_uid(), new_uid(), new_uid())
    info = write_ct_series(Volume(hu, g, "HU"), info, tmp_path / "ct",
                           study=info.study)
    cps = [ControlPoint(0, 0.0, (-30.0, 30.0), (-30.0, 30.0)),
           ControlPoint(1, 1.0, (-30.0, 30.0), (-30.0, 30.0))]
    beam = Beam(1, "AP", 0.0, 0.0, 0.0, np.zeros(3), cps, 200.0)
    plan = Plan("DOSE", [beam], info.frame_of_reference_uid, patient_id="DOSE1",
                study_instance_uid=info.study_instance_uid)
    write_rtplan(plan, tmp_path / "rp.dcm", study=info.study)
    out = tmp_path / "rd.dcm"
    assert main(["dose", str(tmp_path / "ct"), str(tmp_path / "rp.dcm"), "-o", str(out),
                 "--grid-mm", "4"]) == 0
    dose, _meta = read_rtdose(out)
    assert dose.grid.same_as(g, tol_mm=1e-2)
    # 200 MU, 6 x 6 cm field at SSD 96 cm: the maximum is about 200 x 0.01 x S_cp x (1000/975)^2
    assert 1.6 < float(dose.array.max()) < 2.3
    # entrance (anterior) side gets more than the exit side on the axis
    col = dose.array[10, :, 15]
    assert col[12] > col[35] > 0
    errors, text = dciodvfy(out)
    assert not errors, text
