"""Review images of a registration for the person who decides: today's CBCT against the
synthetic CT (the planning CT deformed onto today's anatomy), as a checkerboard and as a
colour fusion, with today's (propagated) target outlined, at the target's centre in the
three planes. PNG files written with matplotlib (Agg backend, no display needed).

Display conventions: axial slices seen from the feet (patient left on the viewer's right,
anterior up), coronal seen from the front (patient left on the right, superior up),
sagittal seen from the patient's left (anterior on the left, superior up); pixels are shown
at their physical size (mm). Each image's grey window is centred on its own soft-tissue
mode, because CBCT grey values are offset and cupped relative to the CT's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adaptive import RESEARCH_USE_STATEMENT
from adaptive.atomic import atomic_path
from adaptive.geometry.volume import Volume
from adaptive.registration.masks import soft_tissue_mode

#: checkerboard square size (mm)
CHECKER_MM = 24.0
PLANES = ("axial", "coronal", "sagittal")


def _window(a: np.ndarray) -> tuple[float, float]:
    v = a[::2, ::2, ::2].ravel()
    m = soft_tissue_mode(v[v > -900.0]) if np.count_nonzero(v > -900.0) > 100 else 0.0
    return m - 350.0, m + 450.0


def _norm(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def plane(a: np.ndarray, grid, name: str, centre_ijk) -> tuple[np.ndarray, list[float], tuple]:
    """2-D slice of a (z, y, x) array through ``centre_ijk`` oriented for display (row 0 at
    the top), its extent (mm, for imshow) and the (left, right, top, bottom) labels."""
    i, j, k = (round(float(c)) for c in centre_ijk)
    sx, sy, sz = grid.spacing
    nz, ny, nx = a.shape
    if name == "axial":
        img = a[k]
        return img, [0, nx * sx, ny * sy, 0], ("R", "L", "A", "P")
    if name == "coronal":
        img = a[::-1, j, :]
        return img, [0, nx * sx, nz * sz, 0], ("R", "L", "S", "I")
    img = a[::-1, :, i]
    return img, [0, ny * sy, nz * sz, 0], ("A", "P", "S", "I")


def checkerboard(shape: tuple[int, int], extent, square_mm: float = CHECKER_MM) -> np.ndarray:
    """Boolean checkerboard of ``square_mm`` squares on an image of ``shape`` spanning
    ``extent`` (imshow extent, mm)."""
    h, w = shape
    px_w = abs(extent[1] - extent[0]) / w
    px_h = abs(extent[2] - extent[3]) / h
    r = (np.arange(h) * px_h // square_mm).astype(int)
    c = (np.arange(w) * px_w // square_mm).astype(int)
    return ((r[:, None] + c[None, :]) % 2).astype(bool)


def preload_plotting() -> None:
    """Import matplotlib with the Agg backend now (a long-lived worker pays it once)."""
    import matplotlib  # noqa: PLC0415 - deferred: matplotlib (3 s) only when a review is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: PLC0415 - deferred: after matplotlib.use("Agg")


def write_review_images(out_dir: str | Path, cbct: Volume, synthetic_ct: Volume,
                        today=None, target: str | None = None, *, title: str = "",
                        verdict: str = "") -> list[Path]:
    """One PNG per plane (``review_axial.png``, ``review_coronal.png``,
    ``review_sagittal.png``) in ``out_dir``; returns their paths. ``today``: today's
    structures (the target is outlined); both volumes on the CBCT grid."""
    preload_plotting()
    import matplotlib.pyplot as plt  # noqa: PLC0415 - deferred: matplotlib (3 s), Agg set above

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = cbct.grid
    if not g.same_as(synthetic_ct.grid):
        synthetic_ct = synthetic_ct.resample_to(g, order=1, fill=-1000.0)
    cb = np.asarray(cbct.array, np.float32)
    sc = np.asarray(synthetic_ct.array, np.float32)
    tmask = None
    if today is not None and target is not None and target in today:
        tmask = today.mask(target, g)
        if not tmask.any():
            tmask = None
    centre = (np.argwhere(tmask).mean(axis=0)[::-1] if tmask is not None
              else (np.asarray(g.size_ijk) - 1) / 2.0)
    wc, ws = _window(cb), _window(sc)
    paths = []
    for name in PLANES:
        a, extent, lab = plane(cb, g, name, centre)
        b, _, _ = plane(sc, g, name, centre)
        na, nb = _norm(a, *wc), _norm(b, *ws)
        chk = np.where(checkerboard(a.shape, extent), na, nb)
        fusion = np.stack([nb, na, nb], axis=-1)  # synthetic CT magenta, CBCT green
        fig, axes = plt.subplots(1, 2, figsize=(11, 5.6), dpi=90)
        for ax, img, sub in ((axes[0], chk, "checkerboard: CBCT / synthetic CT"),
                             (axes[1], fusion, "fusion: CBCT green, synthetic CT magenta")):
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1,
                      extent=extent, interpolation="nearest")
            if tmask is not None:
                m, _, _ = plane(tmask.astype(np.float32), g, name, centre)
                if m.any():
                    ax.contour(m, levels=[0.5], colors="red", linewidths=1.2, extent=extent,
                               origin="upper")
            ax.set_title(sub, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            for txt, xy in zip(lab, ((0.01, 0.5), (0.99, 0.5), (0.5, 0.99), (0.5, 0.01))):
                ax.text(*xy, txt, transform=ax.transAxes, color="yellow", fontsize=10,
                        bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0},
                        ha="center" if xy[0] == 0.5 else ("left" if xy[0] < 0.5 else "right"),
                        va="center" if xy[1] == 0.5 else ("top" if xy[1] > 0.5 else "bottom"))
        ctr = g.ijk_to_lps(centre)
        head = f"{title} - {name} through " + (f"{target} centre" if tmask is not None
                                                else "the CBCT centre")
        fig.suptitle(f"{head} (CBCT LPS {ctr[0]:.0f}, {ctr[1]:.0f}, {ctr[2]:.0f} mm); "
                     f"red: {target or 'target'} today", fontsize=10)
        fig.text(0.5, 0.02, (verdict[:160] + " | " if verdict else "") + RESEARCH_USE_STATEMENT,
                 ha="center", fontsize=7)
        fig.tight_layout(rect=(0, 0.04, 1, 0.95))
        p = out / f"review_{name}.png"
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths.append(p)
    return paths
