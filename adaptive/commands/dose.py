"""``adaptive dose CT_DIR RTPLAN.dcm -o RD.dcm``: compute an RT Plan's dose on a CT series."""

from __future__ import annotations

import time

from adaptive.errors import DoseError
from adaptive.log import get_logger


def register(subparsers) -> None:
    p = subparsers.add_parser("dose", help="compute the dose of an RT Plan on a CT series "
                                           "(numba pencil beam) and write RT Dose")
    p.add_argument("ct_dir", help="folder holding the CT series")
    p.add_argument("rtplan", help="RT Plan file")
    p.add_argument("-o", "--output", required=True, help="RT Dose file to write")
    p.add_argument("--grid-mm", type=float, default=3.0, help="dose grid spacing (mm, default 3)")
    p.add_argument("--beam-model", default=None, help="beam model TOML "
                                                      "(default config/beam_model_6mv.toml)")
    p.add_argument("--hu-calibration", default=None, help="HU->density TOML "
                                                          "(default config/hu_to_density.toml)")
    p.set_defaults(func=run)


def _patient_position(path) -> str:
    import pydicom  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    seq = ds.get("PatientSetupSequence") or []
    return str(seq[0].get("PatientPosition", "HFS")) if len(seq) else "HFS"


def run(args) -> int:

    from adaptive.dicom.ct_series import read_ct_series  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from adaptive.dicom.enums import DoseSummationType  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from adaptive.dicom.provenance import Provenance  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from adaptive.dicom.rtdose import write_rtdose  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from adaptive.dicom.rtplan import read_rtplan  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from adaptive.dose.beam_model import load_beam_model  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from adaptive.dose.density import hu_to_density, load_density_calibration  # noqa: PLC0415 - deferred: loaded when the subcommand runs
    from adaptive.dose.plan_dose import plan_dose  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    log = get_logger("adaptive.commands.dose")
    t = {}
    t0 = time.perf_counter()
    ct, series = read_ct_series(args.ct_dir)
    plan = read_rtplan(args.rtplan)
    position = _patient_position(args.rtplan)
    t["read_s"] = time.perf_counter() - t0
    if plan.frame_of_reference_uid and series.frame_of_reference_uid and \
            plan.frame_of_reference_uid != series.frame_of_reference_uid:
        raise DoseError(f"RT Plan frame of reference {plan.frame_of_reference_uid} differs from "
                        f"the CT's {series.frame_of_reference_uid} [{args.rtplan}]")
    bm = load_beam_model(args.beam_model)
    t0 = time.perf_counter()
    rho = hu_to_density(ct, load_density_calibration(args.hu_calibration))
    dose = plan_dose(rho, plan, beam_model=bm, dose_grid_spacing_mm=args.grid_mm,
                     patient_position=position)
    t["dose_s"] = time.perf_counter() - t0
    prov = Provenance(
        input_uids={"ct_series": series.series_instance_uid, "rtplan": plan.sop_instance_uid},
        parameters={"beam_model": bm.name, "dose_grid_mm": args.grid_mm,
                    "plan_cutoff_mm": bm.plan_cutoff_mm,
                    "fluence_resolution_mm": bm.fluence_resolution_mm,
                    "calibration_gy_per_mu": bm.calibration_gy_per_mu},
        timings_s=t, description="adaptive pencil-beam dose")
    # the plan's beam metersets are per fraction: the dose is one session of its fraction group
    uid = write_rtdose(dose, args.output, summation=DoseSummationType.FRACTION_SESSION, plan=plan,
                       series=series, image_grid=ct.grid, study=series.study, provenance=prov)
    log.info("rtdose_written", path=args.output, sop_instance_uid=uid,
             max_gy=float(dose.array.max()), **{k: round(v, 3) for k, v in t.items()})
    print(f"wrote {args.output} (max {float(dose.array.max()):.3f} Gy, {t['dose_s']:.1f} s)")
    return 0
