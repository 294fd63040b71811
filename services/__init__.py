"""ZeroMQ processes (DICOM gateway, orchestrator, stage workers, console) and their wiring.

Services are thin: they move messages and files and call the pure compute in
:mod:`adaptive`.
"""
