"""The decision and the hand-off of a session, part of
:class:`services.orchestrator.core.Orchestrator`: ``choose`` (offered plans only, reviews
acknowledged), the hand-off's last checks and sending (:mod:`services.orchestrator.handoff`),
its outcome (``handed_off`` or ``handoff_failed`` with ``not_stored``/``unknown``),
``retry-handoff`` and ``cancel``. A mixin, like :mod:`services.orchestrator.flow`.
"""

from __future__ import annotations

import time

from adaptive.errors import AdaptiveError, HandOffError, IllegalTransitionError, ServiceError
from services.orchestrator import state as S
from services.orchestrator.handoff import outcome_of
from services.orchestrator.session import Session


class Decision:
    # -- decision and hand-off ---------------------------------------------------------
    def choose(self, s: Session, plan: str, acknowledge=None) -> None:
        if plan not in ("scheduled", "adapted"):
            raise ServiceError(f"unknown plan choice {plan!r} (scheduled | adapted)")
        if s.state not in (S.AWAITING, S.FALLBACK):
            raise IllegalTransitionError(f"session {s.session_id} is {s.state}; a plan can be "
                                         f"chosen only when awaiting a decision")
        if plan not in s.offered:
            raise ServiceError(f"plan {plan!r} is not offered (offered: {s.offered}); a plan "
                               f"that failed its checks is never handed off")
        pending = sorted({r["name"] for r in s.reviews} - set(acknowledge or ()))
        if plan == "adapted" and pending:
            raise ServiceError(f"the adapted plan needs the review of {', '.join(pending)} "
                               f"first: " + "; ".join(r["message"] for r in s.reviews
                                                     if r["name"] in pending)
                               + " (choose again with acknowledge=[...])")
        items = self._prepare_handoff(s, plan)
        s.chosen = plan
        self._transition(s, S.HANDING_OFF, f"{plan} plan chosen")
        self._start_handoff(s, items, None)

    def retry_handoff(self, s: Session) -> None:
        """Send the chosen plan's objects again (the same files and SOP Instance UIDs, from
        the same outbox batch), skipping those the TMS confirmed; checks run again first."""
        if s.state != S.HANDOFF_FAILED:
            raise IllegalTransitionError(f"session {s.session_id} is {s.state}; only a failed "
                                         f"hand-off ({S.HANDOFF_FAILED}) can be retried")
        items = self._prepare_handoff(s, s.chosen)
        self._transition(s, S.HANDING_OFF, f"hand-off retried ({s.chosen} plan)")
        self._start_handoff(s, items, (s.handoff or {}).get("outbox"))

    def _prepare_handoff(self, s: Session, plan: str) -> list[tuple[str, str, str]]:
        try:
            return self.handoff.prepare(s, plan)
        except HandOffError as e:
            self.publish(s, "handoff_refused", plan=plan, error=str(e))
            raise

    def _start_handoff(self, s: Session, items, batch) -> None:
        self._stage_start(s, "handoff")
        try:
            batch = self.handoff.start(s, items, batch=batch)
        except (OSError, AdaptiveError) as e:    # e.g. the outbox cannot be written
            self._on_handoff_done(s.session_id, False, {
                "error": f"hand-off could not start: {e}", "outbox": batch})
            return
        s.handoff = dict(s.handoff or {}, plan=s.chosen, outbox=batch, outcome="sending")
        self.store.save_session(s)

    def _on_handoff_done(self, sid: str, ok: bool, info: dict) -> None:
        s = self.sessions[sid]
        tms = self.cfg.tms
        recorded = self.store.handoff_instances(sid)
        outcome = outcome_of(recorded) if recorded else ("stored" if ok else "not_stored")
        info = dict(info, tms=f"{tms.ae_title}@{tms.host}:{tms.port}", plan=s.chosen,
                    outcome=outcome, recorded=recorded)
        s.handoff = info
        self._stage_end(s, "handoff", ok=ok)
        if not ok:
            s.error = f"hand-off failed ({outcome}): {info.get('error')}"
            self._transition(s, S.HANDOFF_FAILED, s.error)
            self.publish(s, "handoff_failed", **{k: v for k, v in info.items()
                                                 if k != "recorded"})
            return
        e2e = s.stages.get("end_to_end", {})
        if e2e:
            e2e["end"] = time.time()
            total = e2e["end"] - e2e["start"]
            e2e["decision_wait_s"] = round(s.decision_wait_s, 3)
            e2e["duration_s"] = round(total - (s.decision_wait_s if
                                                self.budgets.exclude_decision_time else 0), 3)
            e2e["within_budget"] = e2e["duration_s"] <= self.budgets.end_to_end_s
            if not e2e["within_budget"]:
                ex = {"stage": "end_to_end", "budget_s": self.budgets.end_to_end_s,
                      "elapsed_s": e2e["duration_s"], "action": "reported"}
                s.budgets_exceeded.append(ex)
                self.publish(s, "budget_exceeded", **ex)
        s.error = ""
        self._transition(s, S.HANDED_OFF, f"{s.chosen} plan stored at {info['tms']}")
        self.publish(s, "handed_off", **{k: v for k, v in info.items() if k != "recorded"})

    def cancel(self, s: Session, reason: str) -> None:
        if s.state in S.TERMINAL:
            raise IllegalTransitionError(f"session {s.session_id} is already {s.state}")
        if s.task_id:
            self.broker.cancel(s.task_id, f"session cancelled: {reason}")
            s.task_id, s.stage_deadline = None, None
        self._transition(s, S.CANCELLED, reason)
