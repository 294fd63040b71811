"""The numba pull-back (adaptive.geometry.warp) against scipy's map_coordinates, and the
column-wise affine against a plain matrix product."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from adaptive.geometry.volume import Grid, Volume, apply_affine
from adaptive.geometry.warp import field_bounds, mapped_inside, pull_back


def _scipy_pull_back(moving: Volume, grid: Grid, m: np.ndarray, u, fill: float) -> np.ndarray:
    """Reference: LPS centres of ``grid`` through p = M x + u(x), into moving indices, then
    map_coordinates(order=1, mode='constant', cval=fill)."""
    x = grid.voxel_centers_lps().reshape(-1, 3)
    p = x @ m[:3, :3].T + m[:3, 3]
    if u is not None:
        p = p + u.reshape(-1, 3)
    ijk = moving.grid.lps_to_ijk(p)
    out = ndimage.map_coordinates(np.asarray(moving.array, dtype=np.float64),
                                  ijk[:, ::-1].T, order=1, mode="constant", cval=fill)
    return out.reshape(grid.shape)


def _case(seed: int):
    rng = np.random.default_rng(seed)
    rot = Rotation.from_euler("xyz", rng.uniform(-8, 8, 3), degrees=True).as_matrix()
    mg = Grid(shape=(14, 17, 19), origin=(-30.0, -25.0, -12.0), spacing=(3.1, 2.9, 2.5),
              direction=Rotation.from_euler("z", 4, degrees=True).as_matrix())
    grid = Grid(shape=(12, 15, 16), origin=(-26.0, -22.0, -10.0), spacing=(3.3, 3.0, 2.4))
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = rng.uniform(-4, 4, 3)
    u = rng.normal(0, 2.0, grid.shape + (3,)).astype(np.float32)
    return rng, mg, grid, m, u


def test_apply_affine_matches_matrix_product():
    rng = np.random.default_rng(0)
    p = rng.normal(0, 100, (4, 5, 3))
    m = rng.normal(0, 1, (3, 3))
    b = rng.normal(0, 10, 3)
    np.testing.assert_allclose(apply_affine(p, m, b), p @ m.T + b, rtol=0, atol=1e-9)


def test_pull_back_matches_map_coordinates_with_matrix_and_field():
    rng, mg, grid, m, u = _case(1)
    moving = Volume(rng.normal(0, 100, mg.shape).astype(np.float32), mg)
    for matrix, field in ((None, None), (m, None), (None, u), (m, u)):
        mm = np.eye(4) if matrix is None else matrix
        got = pull_back(moving, grid, matrix=matrix, dvf_lps_mm=field, fill=-1000.0)
        ref = _scipy_pull_back(moving, grid, mm, field, -1000.0)
        # some voxels inside, some outside the moving image (fill), to check both paths
        assert (ref == -1000.0).any() and (ref != -1000.0).any()
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3)


def test_pull_back_of_a_mask_restricted_to_its_box_is_exact():
    """A boolean mask is computed only where its bounding box can be reached: the result
    equals the interpolated occupancy computed everywhere."""
    _rng, mg, grid, m, u = _case(2)
    mask = np.zeros(mg.shape, bool)
    mask[4:9, 6:11, 5:12] = True
    ref = _scipy_pull_back(Volume(mask.astype(np.float32), mg), grid, m, u, 0.0)
    got = pull_back(Volume(mask, mg), grid, matrix=m, dvf_lps_mm=u)
    assert ref.max() > 0.5 and (ref == 0).mean() > 0.3
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # explicit bounds give the same; an empty mask is all fill
    got2 = pull_back(Volume(mask, mg), grid, matrix=m, dvf_lps_mm=u, dvf_bounds=field_bounds(u))
    np.testing.assert_array_equal(got, got2)
    assert not pull_back(Volume(np.zeros(mg.shape, bool), mg), grid).any()


_FORK_CHECK = """
import numpy as np
from adaptive.forked import call_in_child
from adaptive.geometry.volume import Grid, Volume
from adaptive.geometry.warp import pull_back
from adaptive.registration.core import warm_up

warm_up()  # as a registration worker does before its stages run in forked children
g = Grid(shape=(40, 120, 120), origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0))
m = Volume(np.random.default_rng(0).normal(0, 100, g.shape).astype(np.float32), g)

def child():
    return float(np.abs(pull_back(m, g, fill=-1000.0) - m.array).max())

import signal
import threading

signal.signal(signal.SIGTERM, lambda *a: None)  # a worker handles SIGTERM (graceful stop)
out = []
t = threading.Thread(target=lambda: out.append(call_in_child(child, timeout_s=120)))
t.start()  # stages are started from the worker's task thread
t.join(150)
print("MAXDIFF", out[0])
"""


def test_parallel_kernel_works_in_a_child_of_a_warmed_up_worker(tmp_path):
    """The registration warm-up must leave no OpenMP pool behind: in a forked child of a
    process that used it, numba refuses every parallel region (GNU OpenMP is not fork-safe)
    and the stage's images come out unwritten (seen as a 0.63 body Dice in the services).
    Run in a fresh interpreter: this test process may have used the pool already."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _FORK_CHECK], capture_output=True, text=True,
                       timeout=600, check=False, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Terminating" not in r.stderr
    line = [x for x in r.stdout.splitlines() if x.startswith("MAXDIFF")][-1]
    assert float(line.split()[1]) == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_field_bounds_equal_numpy_min_and_max_per_axis(dtype):
    u = np.random.default_rng(5).normal(scale=4.0, size=(7, 9, 11, 3)).astype(dtype)
    flat = u.reshape(-1, 3).astype(np.float64)
    assert np.array_equal(field_bounds(u), np.stack([flat.min(axis=0), flat.max(axis=0)]))
    u[2, 3, 4, 1] = np.nan
    assert np.isnan(field_bounds(u)).all()


def test_mapped_inside_equals_contains_lps_of_the_mapped_centres():
    """The kernel's coverage is Grid.contains_lps of the mapped voxel centres (points formed
    in numpy), for a matrix, a field, and inside a region only."""
    rng, mg, grid, m, u = _case(3)
    u = u * 4.0                                    # so that some voxels map outside
    region = rng.random(grid.shape) > 0.3
    x = grid.voxel_centers_lps().reshape(-1, 3)
    for matrix, field in ((m, None), (None, u)):
        p = x @ m[:3, :3].T + m[:3, 3] if field is None else x + field.reshape(-1, 3)
        ref = mg.contains_lps(p).reshape(grid.shape) & region
        got = mapped_inside(mg, grid, region, matrix=matrix, dvf_lps_mm=field)
        assert ref.any() and (region & ~ref).any()
        assert (got != ref).sum() == 0
