"""Photon dose engine (numba): beam model, density, ray tracing, pencil-beam kernel,
dose-influence matrix and plan dose."""
