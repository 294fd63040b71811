"""The offline planning/replay chain: one pure function per stage, used by the CLI, the archive
replay and the services' workers (:mod:`adaptive.pipeline.planning` — planning stages and
``plan_case``; :mod:`adaptive.pipeline.fraction` — registration and planning stages of one
fraction and the offline chain ``run_fraction``; the workers call the latter two directly,
:mod:`services.workers.stages`)."""
