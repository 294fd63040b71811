"""``adaptive register``: deformable registration of a CBCT to the planning CT (+ synthetic CT,
propagated structures, REG object, registration.json)."""

from __future__ import annotations

from adaptive.errors import ConfigError


def _iso(text: str):
    try:
        v = [float(x) for x in text.split(",")]
    except ValueError:
        v = []
    if len(v) != 3:
        raise ConfigError(f"--isocenter must be x,y,z in LPS mm, got {text!r}")
    return v


def run(args) -> int:
    from adaptive.registration.register_and_write import register_fraction  # noqa: PLC0415 - deferred: loaded when the subcommand runs

    iso = _iso(args.isocenter) if args.isocenter else None
    r = register_fraction(args.cbct_dir, args.planning_ct_dir, structures=args.structures,
                          isocenter_lps_mm=iso, plan=args.plan,
                          spatial_registration=args.reg, budget_s=args.budget,
                          out_dir=args.output, config=args.config)
    q = r.result.quality
    print(f"registration {'FALLBACK ' + r.result.fallback if r.result.fallback else 'deformable'}"
          f" in {r.result.timings_s['total']:.2f} s; Jacobian min {q['jacobian_min']:.3f}; "
          f"deformation beyond rigid mean {q['deformation_mean_mm']:.2f} mm; "
          f"outputs in {r.out_dir}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("register", help="register a CBCT to the planning CT",
                              description=__doc__)
    p.add_argument("cbct_dir", help="CBCT DICOM series folder (fixed image)")
    p.add_argument("planning_ct_dir", help="planning CT DICOM series folder (moving image)")
    p.add_argument("--structures", help="planning RT Structure Set to propagate")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--isocenter", help="planning isocenter x,y,z (LPS mm): CBCT origin = it")
    g.add_argument("--plan", help="planning RT Plan (isocenter of its first beam)")
    p.add_argument("--reg", help="rigid Spatial Registration (REG) relating CBCT and planning "
                                 "frames: initial alignment (preferred over the isocenter)")
    p.add_argument("--budget", type=float, default=None, help="time budget in s (rigid fallback)")
    p.add_argument("--config", default=None, help="registration TOML (default config/registration.toml)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.set_defaults(func=run)
