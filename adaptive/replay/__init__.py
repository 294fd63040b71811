"""Replay cases with ground truth: building them (phantoms → DICOM + truth), their manifest,
and the ground-truth displacement field I/O. Coordinates: LPS mm."""

from adaptive.replay.manifest import Case, Fraction, Manifest, load_manifest
from adaptive.replay.truth import read_dvf, write_dvf

__all__ = ["Case", "Fraction", "Manifest", "load_manifest", "read_dvf", "write_dvf"]
