"""IEC 61217 beam geometry -> DICOM patient coordinates (LPS, mm).

Coordinate systems (all right-handed, rotations positive by the right-hand rule about the
named axis, i.e. clockwise when looking from the origin along the positive axis):

* F (fixed): origin at isocenter; X_f to the right for an observer at the foot of the couch
  facing the gantry, Y_f horizontal towards the gantry, Z_f up.
* G (gantry): rotated by the gantry angle about Y_f. The source is at (0, 0, +SAD) in G, so at
  gantry 0 the source is above the isocenter and gantry 90 (clockwise seen from the foot of
  the couch) puts it at +X_f.
* B (beam limiting device): rotated by the collimator angle about Z_g. X_b is the MLC leaf
  travel direction, Y_b is across the leaves (along the leaf-pair stack).
* S (patient support): rotated by the couch angle about Z_f (vertical through the isocenter);
  positive = counter-clockwise seen from above.
* Patient: head first supine (HFS) on the support: patient left = +X_s, superior = +Y_s (towards
  the gantry), anterior = +Z_s (up). So LPS (x, y, z) = (X_s, -Z_s, Y_s).

Thus for gantry = collimator = couch = 0: IEC X_b = +x LPS (patient left), Y_b = +z LPS
(superior), and the source sits at isocenter - SAD * y_hat (anterior).

Only HFS is supported; other patient positions raise :class:`DoseError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adaptive.errors import DoseError

# S (IEC patient support) -> LPS for a head-first-supine patient.
_S_TO_LPS = {"HFS": np.array([[1.0, 0.0, 0.0],
                              [0.0, 0.0, -1.0],
                              [0.0, 1.0, 0.0]])}


def _rot_y(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class BeamGeometry:
    """Beam frame of one beam direction.

    ``rotation``: 3x3 matrix whose columns are the IEC B unit vectors X_b, Y_b, Z_b expressed in
    LPS (Z_b points from the isocenter towards the source). ``isocenter_lps_mm``, ``sad_mm``.
    """

    rotation: np.ndarray
    isocenter_lps_mm: np.ndarray
    sad_mm: float

    @property
    def source_lps_mm(self) -> np.ndarray:
        """LPS position (mm) of the radiation source."""
        return self.isocenter_lps_mm + self.sad_mm * self.rotation[:, 2]

    @property
    def beam_direction_lps(self) -> np.ndarray:
        """Unit LPS vector of the beam's central axis (source -> isocenter)."""
        return -self.rotation[:, 2]

    def lps_to_beam(self, p_lps) -> np.ndarray:
        """LPS points (..., 3) mm -> IEC B coordinates (..., 3) mm (origin at isocenter)."""
        return (np.asarray(p_lps, dtype=np.float64) - self.isocenter_lps_mm) @ self.rotation

    def beam_to_lps(self, p_b) -> np.ndarray:
        return np.asarray(p_b, dtype=np.float64) @ self.rotation.T + self.isocenter_lps_mm

    def project_to_isoplane(self, p_lps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x_iso, y_iso, z_source): IEC B X/Y of the point projected along its ray onto the
        isocenter plane (mm) and its distance from the source along the axis (mm)."""
        b = self.lps_to_beam(p_lps)
        z = self.sad_mm - b[..., 2]
        f = self.sad_mm / z
        return b[..., 0] * f, b[..., 1] * f, z


def beam_geometry(gantry_deg: float, collimator_deg: float, couch_deg: float,
                  isocenter_lps_mm, sad_mm: float = 1000.0,
                  patient_position: str = "HFS") -> BeamGeometry:
    """IEC 61217 angles (degrees) + isocenter (LPS mm) -> :class:`BeamGeometry` (HFS only)."""
    pos = (patient_position or "HFS").upper()
    if pos not in _S_TO_LPS:
        raise DoseError(f"patient position {patient_position!r} is not supported by the dose "
                        f"engine (only HFS: head first supine)")
    # v_f = Ry(gantry) Rz(collimator) v_b ; v_f = Rz(couch) v_s  =>  v_s = Rz(couch)^T v_f
    r = _S_TO_LPS[pos] @ _rot_z(couch_deg).T @ _rot_y(gantry_deg) @ _rot_z(collimator_deg)
    iso = np.asarray(isocenter_lps_mm, dtype=np.float64).reshape(3)
    if not np.all(np.isfinite(iso)) or not np.all(np.isfinite(r)):
        raise DoseError(f"non-finite beam geometry (angles {gantry_deg}, {collimator_deg}, "
                        f"{couch_deg}; isocenter {iso})")
    return BeamGeometry(r, iso, float(sad_mm))


def geometry_of_beam(beam, patient_position: str = "HFS") -> BeamGeometry:
    """:class:`BeamGeometry` of an :class:`adaptive.model.Beam` (its beam-level angles)."""
    return beam_geometry(beam.gantry_deg, beam.collimator_deg, beam.couch_deg,
                         beam.isocenter_lps_mm, beam.sad_mm, patient_position)
