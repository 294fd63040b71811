"""DICOM gateway: Storage SCP (receive, validate, store atomically, track series
completion, publish events) and Storage SCU (hand-off to the TMS)."""
