"""Analytic phantoms (male pelvis, TG-119 C-shape and prostate), daily deformations and CBCT
simulation, for replay cases with known ground truth. Coordinates: LPS mm."""
