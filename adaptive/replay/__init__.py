"""Replay cases with ground truth: building them (phantoms → DICOM + truth) and their
manifest (the displacement-field files: :mod:`adaptive.geometry.dvf_io`). Coordinates: LPS mm."""

from adaptive.replay.manifest import Case, Fraction, Manifest, load_manifest

__all__ = ["Case", "Fraction", "Manifest", "load_manifest"]
