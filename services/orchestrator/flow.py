"""The stage flow of a session, part of :class:`services.orchestrator.core.Orchestrator`:
the daily image found -> registration task -> its verdict (the safety gate) -> planning task
-> plans offered, with budgets, fallbacks and stage outcomes from the broker (results checked
by :mod:`services.orchestrator.results`). A mixin: it uses the orchestrator's broker,
registry, store, budgets and its ``publish``/``_transition``.
"""

from __future__ import annotations

import time
from pathlib import Path

from adaptive.errors import ClinicalProtocolError, ResultRefusedError
from adaptive.pipeline.records import sha256_file
from services.messaging import TaskOutcome
from services.orchestrator import state as S
from services.orchestrator.protocol import protocol_from_plan
from services.orchestrator.results import verify_result
from services.orchestrator.session import Session


class StageFlow:
    def _maybe_start(self, s: Session) -> None:
        if s.state != S.WAITING:
            return
        plan = self.resolve_planning(s.patient_id)
        earliest = s.created - self.cfg.orchestrator.accept_cbct_before_start_s
        cands = self.registry.cbct_candidates(s.patient_id, plan.get("ct"), self.used_cbcts,
                                              earliest)
        if not cands:
            return
        cbct = max(cands, key=lambda x: x["completed_at"])
        if plan["missing"]:
            note = f"CBCT received but planning data missing: {', '.join(plan['missing'])}"
            if note not in s.notes:
                s.notes.append(note)
                self.publish(s, "waiting_for_planning_data", missing=plan["missing"])
            return
        if s.protocol is None:
            try:
                s.protocol = protocol_from_plan(plan["rtplan"], self.protocols)
            except ClinicalProtocolError as e:  # the CBCT stays free for a session with one
                s.error = str(e)
                self._transition(s, S.FAILED, s.error)
                self.publish(s, "protocol_missing", error=str(e))
                return
            self.publish(s, "protocol", **s.protocol)
        self.used_cbcts.add(cbct["series_uid"])
        self.store.use_cbct(cbct["series_uid"], s.session_id)
        s.cbct = cbct
        s.cbct_complete_at = cbct["completed_at"]
        rp = plan["rtplan"]
        s.planning = {"rtplan": rp["path"], "rtplan_uid": rp["sop"],
                      "rtplan_sha256": sha256_file(rp["path"]), "rtplan_study": rp.get("study"),
                      "rtstruct": plan["rtstruct"]["path"],
                      "rtstruct_uid": plan["rtstruct"]["sop"],
                      "ct_dir": plan["ct"]["path"], "ct_series_uid": plan["ct"]["series_uid"]}
        s.stages["end_to_end"] = {"start": s.cbct_complete_at,
                                  "budget_s": self.budgets.end_to_end_s}
        self._dispatch_registration(s)

    # -- stages -----------------------------------------------------------------------
    def session_dir(self, s: Session, stage: str | None = None) -> Path:
        d = self.cfg.paths.sessions / s.session_id
        return d / stage if stage else d

    def _stage_dir(self, s: Session, stage: str) -> str:
        d = self.session_dir(s, stage)
        d.mkdir(parents=True, exist_ok=True)
        return str(d.resolve())

    def _dispatch(self, s: Session, stage: str, payload: dict) -> None:
        b = getattr(self.budgets, stage)
        t = self.broker.submit(stage, payload, deadline_s=b.budget_s,
                               meta={"session_id": s.session_id, "stage": stage})
        s.task_id = t.task_id
        s.stage_deadline = time.monotonic() + b.budget_s + b.grace_s
        self._stage_start(s, stage)
        s.stages[stage].update(budget_s=b.budget_s, task_id=t.task_id)
        self.store.save_session(s)
        if not self.broker.services().get(stage):
            self.publish(s, "no_worker", stage=stage,
                         message=f"no {stage} worker connected; task queued")

    def _dispatch_registration(self, s: Session, transition: bool = True) -> None:
        if transition:
            self._transition(s, S.REGISTERING, f"CBCT series {s.cbct['series_uid']}")
        self._dispatch(s, "registration", {
            "session_id": s.session_id, "patient_id": s.patient_id,
            "planning_ct_dir": s.planning["ct_dir"], "rtstruct_path": s.planning["rtstruct"],
            "rtplan_path": s.planning["rtplan"], "cbct_dir": s.cbct["path"],
            "spatial_registration": self._spatial_registration_for(s),
            "out_dir": self._stage_dir(s, "registration")})

    def _dispatch_planning(self, s: Session, transition: bool = True) -> None:
        if transition:
            self._transition(s, S.PLANNING, "registration done")
        self._dispatch(s, "planning", {
            "session_id": s.session_id, "patient_id": s.patient_id,
            "planning_ct_dir": s.planning["ct_dir"], "rtstruct_path": s.planning["rtstruct"],
            "rtplan_path": s.planning["rtplan"], "cbct_dir": s.cbct["path"],
            "registration": s.registration, "protocol": s.protocol,
            "out_dir": self._stage_dir(s, "planning")})

    def _spatial_registration_for(self, s: Session) -> str | None:
        """A rigid Spatial Registration received for this patient that relates the CBCT's
        Frame of Reference to the planning CT's (the imaging system's match), if any."""
        if s.cbct is None:
            return None
        return self.registry.spatial_registration_for(
            s.patient_id, s.cbct.get("frame_of_reference_uid"),
            self.registry.planning_ct_frame(s.patient_id, s.planning.get("ct_series_uid", "")))

    def _session_of(self, o: TaskOutcome) -> Session | None:
        if o.task is None:
            return None
        s = self.sessions.get(o.task.meta.get("session_id", ""))
        if s is None or s.task_id != o.task.task_id:
            return None
        return s

    def _on_task_outcome(self, o: TaskOutcome) -> None:
        if o.kind == "worker_lost":
            for s in self.sessions.values():
                if s.task_id and s.task_id == o.info.get("task_id"):
                    self.publish(s, "worker_lost", **o.info)
            return
        if o.kind == "refused":
            s = self._session_of(o)
            self.log.warning("result_refused", **{k: str(v) for k, v in o.info.items()})
            if s is not None:
                item = {"stage": o.task.meta.get("stage"), "reason": o.info.get("why", ""),
                        "worker": o.info.get("worker"), "task_id": o.info.get("task_id")}
                s.refused_results.append(item)
                self.publish(s, "result_refused", **item)
            else:
                self.publish(None, "result_refused", reason=o.info.get("why", ""),
                             worker=o.info.get("worker"))
            return
        s = self._session_of(o)
        if s is None:
            return
        stage = o.task.meta["stage"]
        if o.kind == "progress":
            self.publish(s, "progress", stage=stage, **o.info)
            return
        if o.kind == "reissued":
            self.publish(s, "task_reissued", stage=stage, **o.info)
            return
        s.task_id = None
        s.stage_deadline = None
        if o.kind == "failed":
            self._stage_failed(s, stage, o.error_type, o.error, o.timings)
            return
        try:
            rec = verify_result(s, stage, o.result, self.cfg.paths.sessions)
        except ResultRefusedError as e:
            item = {"stage": stage, "reason": str(e), "worker": o.timings.get("worker"),
                    "task_id": o.task.task_id}
            s.refused_results.append(item)
            self.publish(s, "result_refused", **item)
            self._stage_failed(s, stage, "ResultRefusedError", f"result refused: {e}",
                               o.timings)
            return
        result = rec.model_dump(mode="json")
        self._stage_end(s, stage, ok=True, worker_timings=o.timings)
        b = getattr(self.budgets, stage)
        fb = result.get("fallback")
        if fb or s.stages[stage]["duration_s"] > b.budget_s:
            ex = {"stage": stage, "budget_s": b.budget_s,
                  "elapsed_s": s.stages[stage]["duration_s"],
                  "action": fb or "result arrived within the grace period; used"}
            s.budgets_exceeded.append(ex)
            self.publish(s, "budget_exceeded", **ex)
        if stage == "registration":
            s.registration = result
            self._on_registration(s, result)
        else:
            self._on_plans(s, result)

    def _stage_failed(self, s: Session, stage: str, error_type: str, error: str,
                      timings: dict) -> None:
        self._stage_end(s, stage, ok=False, error=error, worker_timings=timings)
        if stage == "registration":
            self._no_valid_registration(s, [{
                "name": "registration_failed", "level": "rigid",
                "message": f"{error_type}: {error}", "values": {}}])
            return
        self._to_fallback(s, f"{stage} failed: {error_type}: {error}")

    def _on_plans(self, s: Session, r: dict) -> None:
        s.plans = r
        s.metrics = r.get("metrics", {})
        adapted = r.get("adapted") or {}
        if adapted.get("checks_passed") and adapted.get("rtplan"):
            s.offered = ["scheduled", "adapted"]
            self._transition(s, S.AWAITING, "adapted plan passed its checks")
        else:
            failed = [c for c in adapted.get("checks", []) if not c.get("passed", False)
                      and c.get("blocking", True)]
            self._publish_failed_checks(s, "planning", failed)
            if adapted.get("blocked_by") == "registration":
                why = adapted.get("reason") or "the deformable registration failed its checks"
            else:
                why = ("adapted plan failed its checks: " + "; ".join(
                    c.get("name", "?") + ": " + c.get("message", "") for c in failed)
                    if adapted else "no adapted plan")
            self._to_fallback(s, why)
            return
        self.publish(s, "plans_ready", offered=s.offered, metrics=s.metrics,
                     reviews=[c["name"] for c in s.reviews])

    # -- the registration safety gate (adaptive.pipeline.safety) ------------------------
    def _on_registration(self, s: Session, r: dict) -> None:
        """Act on the registration's verdict: failed checks and reviews are console events;
        no valid registration ends in the scheduled plan without metrics; otherwise the
        planning stage runs (an adapted plan only when the deformable result passed)."""
        checks = r.get("registration_checks") or []
        self._publish_failed_checks(s, "registration", [
            c for c in checks if c.get("blocking", True) and not c.get("passed", False)])
        for c in checks:
            if c.get("review"):
                s.reviews.append({"name": c["name"], "message": c["message"],
                                  "values": c.get("values", {})})
                self.publish(s, "review_required", check=c["name"], message=c["message"],
                             values=c.get("values", {}))
        validity = r.get("validity", "deformable")
        if validity == "none":
            self._no_valid_registration(s, [])
            return
        if validity == "rigid":
            s.notes.append("deformable registration failed its checks; the scheduled plan's "
                           "metrics rest on the rigid match: " + r.get("registration_summary", ""))
        self._dispatch_planning(s)

    def _publish_failed_checks(self, s: Session, stage: str, failed: list[dict]) -> None:
        for c in failed:
            item = {"check": c.get("name", "?"), "stage": stage, "level": c.get("level"),
                    "message": c.get("message", ""), "values": c.get("values", {})}
            s.checks_failed.append(item)
            self.publish(s, "check_failed", **item)

    def _no_valid_registration(self, s: Session, failed: list[dict]) -> None:
        """The scheduled plan as delivered with the linac's own image guidance; no metrics
        (none may be computed on an invalid registration)."""
        self._publish_failed_checks(s, "registration", failed)
        names = [c["check"] for c in s.checks_failed if c["stage"] == "registration"]
        s.metrics = {}
        s.reviews = []
        self._to_fallback(s, "no valid registration (" + ", ".join(names) + "): the scheduled "
                          "plan is offered as delivered with the linac's own image guidance; "
                          "no metrics are shown")

    def _to_fallback(self, s: Session, why: str) -> None:
        s.offered = ["scheduled"]
        s.notes.append(why)
        self._transition(s, S.FALLBACK, why)
        self.publish(s, "fallback", reason=why, offered=s.offered)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for s in self.sessions.values():
            if s.stage_deadline is not None and now > s.stage_deadline and \
                    s.state in (S.REGISTERING, S.PLANNING):
                stage = "registration" if s.state == S.REGISTERING else "planning"
                b = getattr(self.budgets, stage)
                if s.task_id:
                    self.broker.cancel(s.task_id, f"{stage} over its budget + grace")
                s.task_id, s.stage_deadline = None, None
                self._stage_end(s, stage, ok=False, error="budget exceeded, no result")
                ex = {"stage": stage, "budget_s": b.budget_s,
                      "elapsed_s": s.stages[stage]["duration_s"],
                      "action": "no result by budget + grace: stage cancelled, scheduled "
                                "plan only"}
                s.budgets_exceeded.append(ex)
                self.publish(s, "budget_exceeded", **ex)
                self._to_fallback(s, f"{stage} exceeded its {b.budget_s:g} s budget")
