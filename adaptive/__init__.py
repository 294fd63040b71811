"""adaptive: a real-time pipeline for online adaptive radiotherapy.

RESEARCH USE ONLY. NOT FOR CLINICAL USE.

Coordinates: DICOM patient coordinates (LPS, mm) for everything in the patient;
IEC 61217 for beam geometry (gantry, collimator, couch angles in degrees).
Doses in Gy, meterset in MU, lengths in mm unless a name says otherwise.
"""

__version__ = "0.1.0"
SOFTWARE_NAME = "adaptive"
RESEARCH_USE_STATEMENT = "RESEARCH USE ONLY - NOT FOR CLINICAL USE"
