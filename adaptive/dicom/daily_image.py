"""Which CT series of a patient is a daily (treatment-day) image: the one rule shared by the
services' orchestrator (a series received during a session) and the archive replay (a series
found in an exported archive), so that a replay picks the images a live session would have.

A series is a daily image of a patient whose planning CT is ``planning_ct`` when

1. its modality is CT, it is not the planning CT itself, and its Series Description does not
   call it synthetic (:data:`SYNTHETIC_MARKERS`: a synthetic CT - ours, or a vendor's sent
   back by a TMS - lives in the daily image's frame but is derived from it, not acquired);
2. its Series Description or Image Type contains one of the markers (default
   :data:`DEFAULT_CBCT_MARKERS`, case-insensitive; the services read theirs from
   ``config/services.toml`` ``[orchestrator] cbct_markers``), or
3. its Frame of Reference differs from the planning CT's (a daily image is reconstructed in
   the imager's own frame; a second CT in the planning frame without a marker is taken for
   another planning image, not a daily one).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from adaptive.config import config_path, load_toml
from adaptive.errors import ConfigError

DEFAULT_CBCT_MARKERS = ("CBCT", "CONE BEAM", "CONEBEAM")
SYNTHETIC_MARKERS = ("SYNTHETIC",)


def is_daily_image(modality: str, series_uid: str, description: str,
                   image_type: Iterable[str], frame_of_reference_uid: str,
                   planning_ct_series_uid: str | None, planning_frame_of_reference_uid: str | None,
                   markers: Iterable[str] = DEFAULT_CBCT_MARKERS) -> bool:
    """The rule of the module docstring. ``planning_*`` None: the planning CT is not known
    (then only the markers can tell)."""
    if modality != "CT":
        return False
    if planning_ct_series_uid is not None and series_uid == planning_ct_series_uid:
        return False
    if any(m in (description or "").upper() for m in SYNTHETIC_MARKERS):
        return False
    text = " ".join([description or "", *[str(v) for v in image_type or []]]).upper()
    if any(m.upper() in text for m in markers):
        return True
    return (planning_ct_series_uid is not None
            and frame_of_reference_uid != planning_frame_of_reference_uid)


def services_cbct_markers(path=None) -> tuple[str, ...]:
    """The markers the services use (``[orchestrator] cbct_markers`` of
    ``config/services.toml``, default :data:`DEFAULT_CBCT_MARKERS`), upper case."""
    path = Path(path) if path else config_path("services.toml")
    if not path.is_file():
        return DEFAULT_CBCT_MARKERS
    cfg = load_toml(path)
    markers = (cfg.get("orchestrator") or {}).get("cbct_markers", list(DEFAULT_CBCT_MARKERS))
    if not isinstance(markers, list) or not all(isinstance(m, str) and m.strip()
                                                for m in markers):
        raise ConfigError(f"{path} [orchestrator].cbct_markers: expected a list of non-empty "
                          f"strings, got {markers!r}")
    return tuple(m.upper() for m in markers)
