"""Working resolution (block means) and the mapping evaluated on another grid."""

import numpy as np
from scipy.spatial.transform import Rotation

from adaptive.geometry.volume import Grid, Volume
from adaptive.registration import elastix_backend as eb
from adaptive.registration.field import mapping_field
from adaptive.registration.working import block_factors, block_grid, block_mean, working_volume


def test_block_factors_per_axis():
    # spacing (i, j, k) = (0.9, 0.9, 2.5) -> numpy (z, y, x) factors for 2 mm
    assert block_factors((0.9, 0.9, 2.5), 2.0) == (1, 2, 2)
    assert block_factors((0.5, 1.0, 0.66), 2.0) == (3, 2, 4)
    assert block_factors((3.0, 3.0, 3.0), 2.0) == (1, 1, 1)
    assert block_factors((0.5, 0.5, 0.5), 0.0) == (1, 1, 1)


def test_block_mean_and_grid_against_the_native_voxels():
    rng = np.random.default_rng(0)
    g = Grid(shape=(7, 9, 11), origin=(-10.0, 5.0, 3.0), spacing=(0.8, 0.7, 1.1),
             direction=Rotation.from_euler("y", 10, degrees=True).as_matrix())
    a = rng.normal(0, 50, g.shape).astype(np.float32)
    f = (2, 3, 2)
    b = block_mean(a, f)
    bg = block_grid(g, f)
    assert b.shape == bg.shape == (3, 3, 5)
    # one block by hand: values and the centre of its voxels
    k, j, i = 1, 2, 4
    blk = a[2 * k:2 * k + 2, 3 * j:3 * j + 3, 2 * i:2 * i + 2]
    assert abs(float(b[k, j, i]) - float(blk.mean())) < 1e-4
    centres = g.voxel_centers_lps()[2 * k:2 * k + 2, 3 * j:3 * j + 3, 2 * i:2 * i + 2]
    np.testing.assert_allclose(bg.ijk_to_lps([i, j, k]), centres.reshape(-1, 3).mean(0),
                               atol=1e-9)
    valid = np.ones(g.shape, bool)
    valid[0, 0, 0] = False  # one invalid native voxel makes its block invalid
    v, vm, fac = working_volume(Volume(a, g), 1.65, valid, outside=-1000.0)
    assert fac == (1, 2, 2)
    assert not vm[0, 0, 0] and vm.sum() == vm.size - 1 and v.array[0, 0, 0] == -1000.0


def _bspline_map(size, origin, spacing, coef):
    return {"Transform": ["BSplineTransform"], "BSplineTransformSplineOrder": ["3"],
            "UseCyclicTransform": ["false"], "GridSize": [str(v) for v in size],
            "GridIndex": ["0", "0", "0"], "GridSpacing": [str(v) for v in spacing],
            "GridOrigin": [str(v) for v in origin],
            "GridDirection": ["1", "0", "0", "0", "1", "0", "0", "0", "1"],
            "NumberOfParameters": [str(coef.size)],
            "TransformParameters": [repr(float(v)) for v in coef],
            "InitialTransformParameterFileName": ["NoInitialTransform"],
            "HowToCombineTransforms": ["Compose"], "FixedImageDimension": ["3"],
            "MovingImageDimension": ["3"], "FixedInternalImagePixelType": ["float"],
            "MovingInternalImagePixelType": ["float"], "UseDirectionCosines": ["true"],
            "ResampleInterpolator": ["FinalLinearInterpolator"],
            "Resampler": ["DefaultResampler"], "DefaultPixelValue": ["0"],
            "ResultImagePixelType": ["float"], "ResultImageFormat": ["mhd"],
            "CompressResultImage": ["false"]}


def test_mapping_field_is_rigid_after_bspline_on_a_finer_grid():
    """u(x) = M (x + b(x)) - x on a grid finer than the one the B-spline was found on,
    against transformix's b on that grid (independent evaluation) composed by hand."""
    rng = np.random.default_rng(5)
    size = (7, 6, 5)
    tmap = _bspline_map(size, (-70, -60, -50), (20, 20, 20),
                        rng.normal(0, 3, 3 * int(np.prod(size))))
    fine = Grid(shape=(21, 30, 33), origin=(-40.3, -31.1, -20.7), spacing=(2.2, 2.05, 2.65))
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", (2.0, -3.0, 4.0), degrees=True).as_matrix()
    m[:3, 3] = (3.0, -2.0, 5.0)
    b = eb.transform_field([tmap], fine).astype(np.float64)
    x = fine.voxel_centers_lps()
    ref = (x + b) @ m[:3, :3].T + m[:3, 3] - x
    assert np.abs(b).max() > 1.0
    np.testing.assert_allclose(mapping_field(m, fine, [tmap]), ref, rtol=0, atol=2e-3)
    # the rigid map alone
    np.testing.assert_allclose(mapping_field(m, fine, None),
                               x @ m[:3, :3].T + m[:3, 3] - x, rtol=0, atol=2e-3)
