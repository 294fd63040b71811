"""The session state machine (explicit allowed transitions; illegal ones raise).

::

    waiting_for_image -> registering -> planning -> awaiting_decision -> handing_off -> handed_off
                              |             |                               |   ^
                              +-> fallback -+  (scheduled plan only)        v   | retry-handoff
                                                                         handoff_failed
    any non-terminal state -> cancelled | failed   (except handing_off: a transfer in flight)

``fallback``: only the scheduled plan is offered (no adapted plan passing its checks,
or a stage overran its budget with no usable result). ``awaiting_decision``: both
plans are offered. ``handing_off``: the chosen plan's objects are being C-STORE'd.
``handoff_failed``: not every object was confirmed stored at the TMS; the session's
``handoff.outcome`` says whether the missing ones are certainly ``not_stored`` (refused,
no association) or ``unknown`` (sent, no answer: the TMS may hold them); the therapist
retries (the same files and SOP Instance UIDs) or cancels.
"""

from __future__ import annotations

from adaptive.errors import IllegalTransitionError

WAITING = "waiting_for_image"
REGISTERING = "registering"
PLANNING = "planning"
AWAITING = "awaiting_decision"
FALLBACK = "fallback"
HANDING_OFF = "handing_off"
HANDED_OFF = "handed_off"
HANDOFF_FAILED = "handoff_failed"
FAILED = "failed"
CANCELLED = "cancelled"

STATES = (WAITING, REGISTERING, PLANNING, AWAITING, FALLBACK, HANDING_OFF, HANDED_OFF,
          HANDOFF_FAILED, FAILED, CANCELLED)
TERMINAL = frozenset({HANDED_OFF, FAILED, CANCELLED})
#: where a chosen plan's hand-off ends (for clients waiting on it)
HANDOFF_ENDS = frozenset({HANDED_OFF, HANDOFF_FAILED, FAILED})

ALLOWED: dict[str, frozenset[str]] = {
    WAITING: frozenset({REGISTERING, FAILED, CANCELLED}),
    REGISTERING: frozenset({PLANNING, FALLBACK, FAILED, CANCELLED}),
    PLANNING: frozenset({AWAITING, FALLBACK, FAILED, CANCELLED}),
    AWAITING: frozenset({HANDING_OFF, FAILED, CANCELLED}),
    FALLBACK: frozenset({HANDING_OFF, FAILED, CANCELLED}),
    HANDING_OFF: frozenset({HANDED_OFF, HANDOFF_FAILED, FAILED}),  # no cancel mid-transfer
    HANDOFF_FAILED: frozenset({HANDING_OFF, FAILED, CANCELLED}),
    HANDED_OFF: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


def check_transition(current: str, new: str) -> None:
    if new not in ALLOWED.get(current, ()):
        raise IllegalTransitionError(
            f"illegal session transition {current} -> {new} "
            f"(allowed from {current}: {sorted(ALLOWED.get(current, ())) or 'none'})")
