"""Reproducible fit of the 6 MV pencil-beam kernel to published water data.

Run ``python -m adaptive.dose.fit_beam_model`` to print the fitted ``[kernel]`` table for
``config/beam_model_6mv.toml`` and the achieved figures.

Procedure
---------
The model (see :mod:`adaptive.dose.beam_model`) is evaluated analytically for open square
fields in water at SSD 100 cm (:func:`adaptive.dose.beam_model.water_dose_rect`: exact erf
integration of the three Gaussian components over the field, inverse square, beam divergence).
From it we compute, for a parameter vector, the figures published for 6 MV (BJR Supplement 25
class data, as listed in the project's shared notes):

=================================  ======  ==========  ==================================
figure                             target  tolerance   source
=================================  ======  ==========  ==================================
depth of maximum, 10x10             15 mm   0.25 mm    BJR Suppl. 25 class 6 MV
PDD(10 cm), 10x10, SSD 100          67 %    0.3 %      BJR Suppl. 25 class 6 MV
PDD(20 cm), 10x10, SSD 100          38.5 %  0.3 %      BJR Suppl. 25 class 6 MV
80-20 % penumbra at 10 cm, 10x10    6.0 mm  0.2 mm     middle of the published 5-7 mm
S_cp(5x5) at d_max                  0.945   0.005      representative 6 MV output factor
S_cp(20x20) at d_max                1.050   0.005      representative 6 MV output factor
=================================  ======  ==========  ==================================

``scipy.optimize.least_squares`` minimises the sum of squared (figure - target) / tolerance
over the nine kernel parameters within physical bounds, from a fixed start (below). The
calibration constant C then follows from 1 cGy/MU at d_max (done on load). Nothing is fitted
to any of our own phantoms.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq, least_squares

from adaptive.dose.beam_model import KERNEL_KEYS, KernelParams, water_dose_rect

SAD_MM = 1000.0
TARGETS = {"dmax_mm": 15.0, "pdd10": 67.0, "pdd20": 38.5, "penumbra10_mm": 6.0,
           "scp5": 0.945, "scp20": 1.05}
TOLERANCES = {"dmax_mm": 0.25, "pdd10": 0.3, "pdd20": 0.3, "penumbra10_mm": 0.2,
              "scp5": 0.005, "scp20": 0.005}
# start and physical bounds, in KERNEL_KEYS order
START = [0.005, 0.3, 0.003, 1.5, 0.03, 0.05, 20.0, 30.0, 0.05]
LOWER = [0.001, 0.05, 0.0, 0.5, 0.0, 0.0, 3.0, 3.0, 0.0]
UPPER = [0.02, 2.0, 0.05, 5.0, 0.2, 0.3, 100.0, 150.0, 0.5]

_DEPTHS = np.arange(0.0, 300.0, 0.25)


def penumbra_80_20(k: KernelParams, depth_mm: float, field_mm: float = 100.0,
                   ssd_mm: float = 1000.0) -> float:
    """80-20 % penumbra (mm, in the plane at ``depth_mm``) of a square field, relative to the
    central-axis dose at that depth."""
    c = water_dose_rect(depth_mm, 0.0, 0.0, field_mm, field_mm, k, SAD_MM, ssd_mm)

    def where(frac):
        return brentq(lambda x: water_dose_rect(depth_mm, x, 0.0, field_mm, field_mm, k, SAD_MM,
                                                ssd_mm) / c - frac, 0.0, 2 * field_mm)
    return where(0.2) - where(0.8)


def figures(k: KernelParams) -> dict[str, float]:
    """Water figures of the model (10x10 cm^2 at SSD 100 cm unless stated)."""
    c = water_dose_rect(_DEPTHS, 0.0, 0.0, 100.0, 100.0, k, SAD_MM, 1000.0)
    i = int(np.argmax(c))
    dmax = float(_DEPTHS[i])

    def pdd(z):
        return float(np.interp(z, _DEPTHS, c) / c[i] * 100.0)

    def scp(s):
        return float(water_dose_rect(dmax, 0.0, 0.0, s, s, k, SAD_MM, 1000.0) / c[i])

    return {"dmax_mm": dmax, "pdd10": pdd(100.0), "pdd20": pdd(200.0),
            "penumbra10_mm": penumbra_80_20(k, 100.0), "scp5": scp(50.0), "scp20": scp(200.0),
            "pdd5": pdd(50.0), "pdd30": pdd(300.0 - 0.25), "scp3": scp(30.0),
            "scp30": scp(300.0), "penumbra_dmax_mm": penumbra_80_20(k, max(dmax, 1.0))}


def fit() -> tuple[KernelParams, dict[str, float]]:
    def residuals(p):
        f = figures(KernelParams.from_array(p))
        return [(f[key] - TARGETS[key]) / TOLERANCES[key] for key in TARGETS]

    r = least_squares(residuals, START, bounds=(LOWER, UPPER), diff_step=1e-3)
    k = KernelParams.from_array(r.x)
    return k, figures(k)


def main() -> int:
    k, f = fit()
    print("[kernel]  # python -m adaptive.dose.fit_beam_model")
    for key in KERNEL_KEYS:
        print(f"{key} = {getattr(k, key):.6g}")
    print("\n# achieved:", ", ".join(f"{a}={b:.4g}" for a, b in f.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
