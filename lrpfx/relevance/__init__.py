"""Relevance: LRP rules as frozen dataclasses (:mod:`~lrpfx.relevance.rules`), the AttnLRP rules
(:mod:`~lrpfx.relevance.attention`), their tensor math (:mod:`~lrpfx.relevance.kernels`, no fx), and
rule sets loaded from TOML (:mod:`~lrpfx.relevance.ruleset`)."""
from lrpfx.relevance import attention as attention  # registers the AttnLRP rules
