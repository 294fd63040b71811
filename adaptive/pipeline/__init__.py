"""The offline planning/replay chain: one pure function per stage, used by the CLI and by the
services' workers (:mod:`adaptive.pipeline.session` — planning stages and ``plan_case``;
:mod:`adaptive.pipeline.fraction` — registration and planning stages of one fraction and the
offline chain ``run_fraction``; :mod:`adaptive.pipeline.service_stages` — the workers' entry
points)."""

from adaptive.pipeline.service_stages import service_planning_stage, service_registration_stage

__all__ = ["service_planning_stage", "service_registration_stage"]
