"""The contour rasterisation rule against contours written by other tools from known masks:
rt-utils (contours through the centres of boundary voxels), plastimatch (marching squares on
voxel edges) and polygons traced along voxel edges in this test. Each must come back as its
source mask (Dice >= 0.98), small structures included; the rule's boundary term is what
makes the centre-traced ones exact (the strict centre-inside rule loses their ring)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from adaptive.dicom import read_rtstruct, write_ct_series
from adaptive.dicom.study import new_study
from adaptive.geometry import Grid, Volume
from adaptive.geometry.rasterize import rasterize_contours
from adaptive.model import PatientInfo, SeriesInfo
from adaptive.registration.evaluate import dice as _dice
from tests.conftest import require_peer_python, require_tool

# square pixels (rt-utils uses Pixel Spacing[0] for the row direction: it misplaces contours
# on non-square pixels), a non-integer origin and thick slices
GRID = Grid((12, 40, 48), origin=[-31.3, -20.7, 12.5], spacing=[0.977, 0.977, 2.5])


def _source_masks(g: Grid) -> dict[str, np.ndarray]:
    k, j, i = np.meshgrid(*[np.arange(n) for n in g.shape], indexing="ij")
    x, y, z = (i - 20) * 0.977, (j - 18) * 0.977, (k - 6) * 2.5
    r = np.hypot((i - 33) * 0.977, (j - 12) * 0.977)
    c_shape = (np.hypot((i - 12) * 0.977, (j - 29) * 0.977) < 8) & ~(
        (np.abs((j - 29)) <= 2) & (i >= 12)) & (k >= 2) & (k <= 9)
    return {
        "SPHERE": x ** 2 + y ** 2 + z ** 2 < 7.5 ** 2,
        "SMALL": (i - 40) ** 2 + (j - 32) ** 2 + (k - 8) ** 2 <= 2,  # 7-voxel cross, 3 slices
        "TINY": (np.abs(i - 6) <= 1) & (np.abs(j - 6) <= 1) & (k == 4),  # 3 x 3, one slice
        "RING": (r < 6.5) & (r > 3.0) & (k >= 3) & (k <= 8),  # a hole on each slice
        "C_SHAPE": c_shape,  # concave
    }




@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    d = tmp_path_factory.mktemp("rasterize_sources")
    pat = PatientInfo("RAST1", "Contour^Sources")
    info = write_ct_series(Volume(np.zeros(GRID.shape, np.float32), GRID, "HU"),
                           SeriesInfo(pat, "", "", ""), d / "ct", study=new_study(pat))
    return d, info, _source_masks(GRID)


def _check(rs_path, masks, *, strict_must_fail: bool):
    ss = read_rtstruct(rs_path, grid=GRID)
    lost = []
    for name, m in masks.items():
        back = ss.get(name).mask.array
        assert _dice(back, m) >= 0.98, (name, m.sum(), back.sum(), _dice(back, m))
        strict = rasterize_contours(ss.get(name).contours, GRID, edge_tol_mm=0.0)
        lost.append(_dice(strict, m) < 0.98)
    # the test can fail: without the boundary term the centre-traced contours lose voxels
    assert any(lost) == strict_must_fail


RT_UTILS_SCRIPT = """
import sys, numpy as np
from rt_utils import RTStructBuilder
ct, masks, out = sys.argv[1:4]
rs = RTStructBuilder.create_new(dicom_series_path=ct)
with np.load(masks) as z:
    for name in z.files:
        rs.add_roi(mask=np.transpose(z[name], (1, 2, 0)), name=name)  # rows, columns, slices
rs.save(out)
"""


def test_rt_utils_contours_through_voxel_centres(ct):
    py = require_peer_python("rt_utils")  # rt-utils lives in its own venv (see Makefile)
    d, _info, masks = ct
    np.savez(d / "masks.npz", **masks)
    r = subprocess.run([py, "-c", RT_UTILS_SCRIPT, str(d / "ct"), str(d / "masks.npz"),
                        str(d / "RS_rt_utils.dcm")], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    _check(d / "RS_rt_utils.dcm", masks, strict_must_fail=True)


def test_plastimatch_contours(ct):
    import SimpleITK as sitk

    exe = require_tool("plastimatch", "plastimatch")
    d, _info, masks = ct
    pre = d / "plm_masks"
    pre.mkdir(exist_ok=True)
    for name, m in masks.items():
        im = sitk.GetImageFromArray(m.astype(np.uint8))
        im.SetOrigin(tuple(GRID.origin))
        im.SetSpacing(tuple(GRID.spacing))
        im.SetDirection(tuple(GRID.direction.ravel()))
        sitk.WriteImage(im, str(pre / f"{name}.mha"))
    r = subprocess.run([exe, "convert", "--input-prefix", str(pre), "--output-dicom",
                        str(d / "plm"), "--referenced-ct", str(d / "ct")],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rs = sorted((d / "plm").glob("rtss*.dcm"))
    assert len(rs) == 1
    _check(rs[0], masks, strict_must_fail=False)


def _edge_loops(sl: np.ndarray) -> list[np.ndarray]:
    """Closed polygons (index (i, j)) along the voxel edges around the True pixels of a slice:
    every edge between an inside and an outside pixel, chained into loops."""
    ny, nx = sl.shape
    p = np.pad(sl, 1)
    nxt: dict[tuple, list] = {}
    for j in range(ny):
        for i in range(nx):
            if not sl[j, i]:
                continue
            a, b, c, e = (i - .5, j - .5), (i + .5, j - .5), (i + .5, j + .5), (i - .5, j + .5)
            for outside, (u, v) in ((not p[j, i + 1], (a, b)), (not p[j + 1, i + 2], (b, c)),
                                    (not p[j + 2, i + 1], (c, e)), (not p[j + 1, i], (e, a))):
                if outside:
                    nxt.setdefault(u, []).append(v)
    loops = []
    while nxt:
        start = next(iter(nxt))
        loop, cur = [start], start
        while True:
            v = nxt[cur].pop()
            if not nxt[cur]:
                del nxt[cur]
            if v == start:
                break
            loop.append(v)
            cur = v
        loops.append(np.asarray(loop, dtype=np.float64))
    return loops


def test_contours_traced_along_voxel_edges(ct):
    from adaptive.dicom import write_rtstruct
    from adaptive.model import Roi, StructureSet

    d, info, masks = ct
    rois = []
    for n, (name, m) in enumerate(masks.items(), start=1):
        contours = []
        for k in np.nonzero(m.any(axis=(1, 2)))[0]:
            for loop in _edge_loops(m[k]):
                contours.append(GRID.ijk_to_lps(np.column_stack([loop, np.full(len(loop), k)])))
        rois.append(Roi(n, name, contours=contours))
    write_rtstruct(StructureSet(rois, info), d / "RS_edges.dcm", study=info.study, grid=GRID)
    _check(d / "RS_edges.dcm", masks, strict_must_fail=False)
