"""Relevance: LRP rules as frozen dataclasses (:mod:`~lrpfx.relevance.rules`), their tensor math
(:mod:`~lrpfx.relevance.kernels`, no fx), and rule sets loaded from TOML (:mod:`~lrpfx.relevance.ruleset`)."""
