"""The reports' figures (matplotlib, Agg backend), returned as PNG ``data:`` URIs so a page
embeds them and stays one self-contained file.

Slices are displayed as the registration review images show them
(:func:`adaptive.registration.review.plane`: radiological views, pixels at their physical
size); doses in total-course Gy.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from adaptive.geometry.volume import Volume
from adaptive.registration.review import PLANES, plane

#: doses below this share of the prescription are not coloured on the overlays
OVERLAY_THRESHOLD = 0.1
#: dose differences below this share of the prescription are not coloured
DIFF_THRESHOLD = 0.02
#: minimum half-range (Gy) of the y axis of the D95-per-fraction plot
D95_SPAN_GY = 1.0
_STYLE = {"scheduled": "--", "adapted": "-"}
_COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf", "#bcbd22", "#7f7f7f"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def data_uri(fig) -> str:
    """``data:image/png;base64,...`` of a matplotlib figure (closed afterwards)."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def png_file_uri(path) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _orient(ax, labels: tuple) -> None:
    """(left, right, top, bottom) orientation letters of a displayed plane."""
    for txt, xy in zip(labels, ((0.01, 0.5), (0.99, 0.5), (0.5, 0.99), (0.5, 0.01))):
        ax.text(*xy, txt, transform=ax.transAxes, color="yellow", fontsize=8,
                ha="center" if xy[0] == 0.5 else ("left" if xy[0] < 0.5 else "right"),
                va="center" if xy[1] == 0.5 else ("top" if xy[1] > 0.5 else "bottom"))
    ax.set_xticks([])
    ax.set_yticks([])


def _window(a: np.ndarray) -> tuple[float, float]:
    """Grey window around the image's soft-tissue peak (CBCT grey values are offset)."""
    v = a[::2, ::2, ::2].ravel()
    v = v[v > -900.0]
    m = float(np.median(v)) if v.size else 0.0
    return m - 400.0, m + 400.0


def centre_ijk(mask: np.ndarray | None, grid) -> np.ndarray:
    """(i, j, k) of a mask's centroid, or of the grid's centre without one."""
    if mask is not None and mask.any():
        return np.argwhere(mask).mean(axis=0)[::-1]
    return (np.asarray(grid.size_ijk) - 1) / 2.0


def dvh_figure(dvh_today: dict, dvh_truth: dict, prescription_gy: float) -> str:
    """DVHs of the scheduled (dashed) and adapted (solid) plans: on today's structures, and
    on the true structures when given. ``dvh_*``: plan → ROI → :class:`Dvh`."""
    plt = _pyplot()
    panels = [("on today's anatomy (synthetic CT, propagated structures)", dvh_today)]
    if dvh_truth:
        panels.append(("on the true anatomy (ground-truth structures)", dvh_truth))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), dpi=90,
                             squeeze=False)
    names = sorted({n for p in dvh_today.values() for n in p} |
                   {n for p in dvh_truth.values() for n in p})
    color = {n: _COLORS[k % len(_COLORS)] for k, n in enumerate(names)}
    top = max([prescription_gy * 1.15] + [float(d.dose_gy.max()) * 1.05
                                          for _, dv in panels for p in dv.values()
                                          for d in p.values() if not d.empty])
    for ax, (title, dv) in zip(axes[0], panels):
        for plan in ("scheduled", "adapted"):
            for name, d in sorted((dv.get(plan) or {}).items()):
                if d.empty:
                    continue
                ax.step(np.r_[0.0, d.dose_gy], np.r_[100.0, d.volume_pct], where="post",
                        ls=_STYLE[plan], color=color[name], lw=1.4,
                        label=name if plan == "adapted" or "adapted" not in dv else None)
        ax.axvline(prescription_gy, color="grey", lw=0.8, ls=":")
        ax.set_xlim(0, top)
        ax.set_ylim(0, 102)
        ax.set_xlabel("dose (Gy, whole course)")
        ax.set_ylabel("volume (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.text(0.01, 0.01, "solid: adapted   dashed: scheduled   dotted line: prescription",
             fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 0.84, 1))
    return data_uri(fig)


def dose_slices_figure(cbct: Volume, doses: dict, target_mask, target: str,
                       fractions: int, prescription_gy: float) -> str:
    """CBCT with each plan's dose (colour wash above :data:`OVERLAY_THRESHOLD` of the
    prescription) and the difference adapted − scheduled, in the three planes through the
    target's centre; today's target outlined. ``doses``: plan → per-fraction dose Volume
    (CBCT frame)."""
    plt = _pyplot()
    g = cbct.grid
    on_cbct = {p: d.resample_to(g, order=1, fill=0.0).array * fractions
               for p, d in doses.items()}
    cols = [p for p in ("scheduled", "adapted") if p in on_cbct]
    if len(cols) == 2:
        cols.append("difference")
    fig, axes = plt.subplots(3, max(1, len(cols)), figsize=(4.0 * max(1, len(cols)), 10.5),
                             dpi=80, squeeze=False)
    c = centre_ijk(target_mask, g)
    lo, hi = _window(cbct.array)
    diff = on_cbct["adapted"] - on_cbct["scheduled"] if "difference" in cols else None
    dmax = max(1e-6, float(np.percentile(np.abs(diff), 99.9))) if diff is not None else 1.0
    for r, name in enumerate(PLANES):
        img, ext, labels = plane(cbct.array, g, name, c)
        tm = plane(target_mask.astype(np.float32), g, name, c)[0] if target_mask is not None \
            else None
        for col, what in enumerate(cols):
            ax = axes[r][col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=ext, interpolation="nearest")
            if what == "difference":
                d = plane(diff, g, name, c)[0]
                im = ax.imshow(np.ma.masked_where(np.abs(d) < DIFF_THRESHOLD * prescription_gy,
                                                  d), cmap="RdBu_r",
                               vmin=-dmax, vmax=dmax, alpha=0.8, extent=ext,
                               interpolation="nearest")
                label = "adapted − scheduled (Gy)"
            else:
                d = plane(on_cbct[what], g, name, c)[0]
                im = ax.imshow(np.ma.masked_where(d < OVERLAY_THRESHOLD * prescription_gy, d),
                               cmap="turbo", vmin=0, vmax=1.1 * prescription_gy, alpha=0.45,
                               extent=ext, interpolation="nearest")
                label = f"{what} (Gy)"
            if tm is not None and tm.any():
                ax.contour(tm, levels=[0.5], colors="white", linewidths=1.0, extent=ext,
                           origin="upper")
            _orient(ax, labels)
            if r == 0:
                ax.set_title(label, fontsize=9)
            if r == 2:
                fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.05, pad=0.02)
    fig.suptitle(f"Dose on today's CBCT through the {target} centre (white: {target} today)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return data_uri(fig)


def d95_figure(rows: list[dict], target: str = "PTV") -> str:
    """Target D95 (whole course, Gy) scheduled vs adapted per fraction, one panel per
    patient (rows: the summary rows of finished fractions)."""
    plt = _pyplot()
    patients = sorted({r["patient_id"] for r in rows})
    n = max(1, len(patients))
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), dpi=85,
                             squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for ax, pid in zip(axes.ravel(), patients):
        mine = sorted((r for r in rows if r["patient_id"] == pid), key=lambda r: r["fraction"])
        x = np.arange(len(mine))
        for key, style, lab in (("target_d95_scheduled_gy", "o--", "scheduled"),
                                ("target_d95_adapted_gy", "s-", "adapted")):
            y = [r.get(key) if r.get(key) is not None else np.nan for r in mine]
            ax.plot(x, y, style, label=lab, ms=5)
        goal = next((r.get("target_d95_goal_gy") for r in mine
                     if r.get("target_d95_goal_gy") is not None), None)
        if goal is not None:
            ax.axhline(goal, color="grey", ls=":", lw=1, label="goal")
        # at least ±D95_SPAN_GY around the values: tiny differences must not look large
        vals = [v for r in mine for v in (r.get("target_d95_scheduled_gy"),
                                          r.get("target_d95_adapted_gy"), goal)
                if v is not None]
        if vals:
            ax.set_ylim(min(vals) - D95_SPAN_GY, max(vals) + D95_SPAN_GY)
        ax.set_xticks(x, [r["fraction"] for r in mine], fontsize=7, rotation=45)
        ax.set_title(pid, fontsize=9)
        ax.set_ylabel(f"{target} D95 (Gy, course)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return data_uri(fig)


def goals_met_figure(rows: list[dict]) -> str:
    """Goals met by the scheduled and the adapted plan, per fraction."""
    plt = _pyplot()
    labels = [f"{r['patient_id']} {r['fraction']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(rows) + 2), 3.4), dpi=85)
    s = [r.get("goals_met_scheduled") or 0 for r in rows]
    a = [r.get("goals_met_adapted") or 0 for r in rows]
    ax.bar(x - 0.2, s, 0.4, label="scheduled")
    ax.bar(x + 0.2, a, 0.4, label="adapted")
    ax.plot(x, [r.get("n_goals") or 0 for r in rows], "k_", ms=14, label="goals")
    ax.set_xticks(x, labels, fontsize=7, rotation=60, ha="right")
    ax.set_ylabel("goals met")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return data_uri(fig)
