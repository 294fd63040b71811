"""Deformable registration of the daily CBCT to the planning CT (itk-elastix), synthetic CT,
contour propagation and the DICOM Deformable Spatial Registration object.

DVF convention everywhere: (nz, ny, nx, 3) float32 on the CBCT grid, LPS mm; the CBCT point
x corresponds to the planning-CT point x + u(x).
"""

from adaptive.registration.core import RegistrationResult, register, warm_up
from adaptive.registration.propagate import propagate_mask, propagate_structures
from adaptive.registration.settings import RegistrationSettings, load_registration_settings
from adaptive.registration.synthetic_ct import synthetic_ct, write_synthetic_ct

__all__ = [
           "RegistrationResult",
           "RegistrationSettings",
           "load_registration_settings",
           "propagate_mask",
           "propagate_structures",
           "register",
           "synthetic_ct",
           "warm_up",
           "write_synthetic_ct",
]
