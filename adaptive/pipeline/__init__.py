"""The offline planning/replay chain: one pure function per stage, used by the CLI and by the
services' workers (:mod:`adaptive.pipeline.session`)."""
