"""Analytic shapes as approximate signed distance functions (SDF), for rendering phantoms.

Every function takes points ``p`` of shape (..., 3) (float32 or float64; the result has
the same precision) in a phantom's own frame (mm; axes
x = patient Left, y = Posterior, z = Superior, i.e. LPS directions) and returns the
*approximate* signed distance in mm to the surface: negative inside, positive outside.
For ellipsoids and superquadrics the first-order estimate ``f / |grad f|`` is used (exact on
the surface, a smooth monotone estimate elsewhere), which is what partial-volume
rendering and thin shells (cortical bone, organ walls) need.

CSG: union = ``np.minimum``, intersection = ``np.maximum``, difference a − b =
``np.maximum(a, -b)``; a shell of thickness t inside a surface = ``np.maximum(sd, -sd - t)``.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-9


def rotation_matrix(rx_deg: float = 0.0, ry_deg: float = 0.0, rz_deg: float = 0.0) -> np.ndarray:
    """Rotation R = Rz @ Ry @ Rx (degrees, right-handed about the LPS x, y, z axes)."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotvec_matrix(rotvec_rad) -> np.ndarray:
    """Rotation matrix of a rotation vector (axis × angle, radians), Rodrigues' formula."""
    r = np.asarray(rotvec_rad, dtype=np.float64)
    th = float(np.linalg.norm(r))
    if th < 1e-15:
        return np.eye(3)
    k = r / th
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(th) * kx + (1 - np.cos(th)) * (kx @ kx)


def _local(p: np.ndarray, center, rotation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Components (x, y, z) of R^T (p - c), the point in the shape's own axes."""
    cx, cy, cz = (float(v) for v in np.asarray(center, dtype=np.float64).reshape(3))
    x, y, z = p[..., 0] - cx, p[..., 1] - cy, p[..., 2] - cz
    if rotation is None:
        return x, y, z
    r = np.asarray(rotation, dtype=np.float64).tolist()  # shape axes are the columns of r
    return (x * r[0][0] + y * r[1][0] + z * r[2][0],
            x * r[0][1] + y * r[1][1] + z * r[2][1],
            x * r[0][2] + y * r[1][2] + z * r[2][2])


def ellipsoid(p: np.ndarray, center, semi_axes, rotation=None) -> np.ndarray:
    """Ellipsoid with semi-axes (a, b, c) mm along its local axes (columns of ``rotation``)."""
    x, y, z = _local(p, center, rotation)
    a, b, c = (float(v) for v in semi_axes)
    nx, ny, nz = x / a, y / b, z / c
    rho = np.sqrt(nx * nx + ny * ny + nz * nz)
    gx, gy, gz = nx / a, ny / b, nz / c
    g = np.sqrt(gx * gx + gy * gy + gz * gz)  # |grad rho| * rho
    # f = rho - 1, |grad f| = g / rho
    return (rho - 1.0) * rho / np.maximum(g, _EPS)


def normalised_radius(p: np.ndarray, center, semi_axes, rotation=None) -> np.ndarray:
    """Ellipsoidal radius rho = |R^T (p - c) / semi_axes| (1 on the surface, 0 at the centre)."""
    x, y, z = _local(p, center, rotation)
    a, b, c = (float(v) for v in semi_axes)
    return np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)


def sphere(p: np.ndarray, center, radius: float) -> np.ndarray:
    x, y, z = _local(p, center, None)
    return np.sqrt(x * x + y * y + z * z) - radius


def capsule(p: np.ndarray, a, b, radius: float) -> np.ndarray:
    """Capsule (cylinder with hemispherical caps) around the segment a–b (mm)."""
    a = np.asarray(a, dtype=np.float64)
    abv = np.asarray(b, dtype=np.float64) - a
    ab = abv.tolist()
    x, y, z = _local(p, a, None)
    t = np.clip((x * ab[0] + y * ab[1] + z * ab[2]) * (1.0 / float(abv @ abv)), 0.0, 1.0)
    dx, dy, dz = x - t * ab[0], y - t * ab[1], z - t * ab[2]
    return np.sqrt(dx * dx + dy * dy + dz * dz) - radius


def cylinder_z(p: np.ndarray, center_xy, radius: float, z_lo: float, z_hi: float) -> np.ndarray:
    """Right circular cylinder along z (exact SDF up to the edges)."""
    d_r = np.hypot(p[..., 0] - float(center_xy[0]), p[..., 1] - float(center_xy[1])) - radius
    d_z = np.maximum(z_lo - p[..., 2], p[..., 2] - z_hi)
    return np.maximum(d_r, d_z)


def superellipse_z(p: np.ndarray, center_xy, a, b, exponent: float) -> np.ndarray:
    """Infinite cylinder along z with superellipse cross-section |x/a|^n + |y/b|^n = 1.

    ``a``, ``b`` may be arrays broadcastable to ``p[..., 0]`` (cross-section varying with z).
    """
    x = np.abs(p[..., 0] - float(center_xy[0])) / a
    y = np.abs(p[..., 1] - float(center_xy[1])) / b
    n = exponent
    s = x ** n + y ** n
    r = s ** (1.0 / n)  # "superquadric radius", 1 on the surface
    # grad r = s^(1/n - 1) * (x^(n-1)/a, y^(n-1)/b)
    gx = x ** (n - 1) / a
    gy = y ** (n - 1) / b
    g = np.maximum(s, _EPS) ** (1.0 / n - 1.0) * np.sqrt(gx * gx + gy * gy)
    return (r - 1.0) / np.maximum(g, _EPS)


def slab(p: np.ndarray, axis: int, lo: float, hi: float) -> np.ndarray:
    """Region lo <= p[axis] <= hi (exact SDF)."""
    v = p[..., axis]
    return np.maximum(lo - v, v - hi)


def half_space(p: np.ndarray, axis: int, value: float, keep_above: bool) -> np.ndarray:
    v = p[..., axis]
    return (value - v) if keep_above else (v - value)


def shell(sd: np.ndarray, thickness: float) -> np.ndarray:
    """The inner shell of thickness ``thickness`` (mm) of a solid with SDF ``sd``."""
    return np.maximum(sd, -sd - thickness)


def coverage(sd: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Approximate partial-volume fraction of a voxel of size ``voxel_mm`` (0..1) from the SDF."""
    return np.clip(0.5 - sd / voxel_mm, 0.0, 1.0)


def smooth_window(x: np.ndarray, inner: float, outer: float) -> np.ndarray:
    """1 for x <= inner, 0 for x >= outer, C1-smooth cosine² ramp in between."""
    t = np.clip((x - inner) / (outer - inner), 0.0, 1.0)
    return np.cos(0.5 * np.pi * t) ** 2
