"""lrpfx: compile PyTorch CNNs into relevance networks (Layer-wise Relevance Propagation).

    explainer = lrpfx.compile(model, rules="epsilon_plus_flat")
    relevance, logits = explainer(x, target)
"""
from __future__ import annotations

from lrpfx.api import builtin_rulesets, compile, inspect
from lrpfx.errors import (
    InputError,
    LrpfxError,
    RegistryError,
    RuleSetError,
    TraceError,
    TrainModeError,
    UnmatchedNodeError,
)
from lrpfx.diagnostics import block_leaks
from lrpfx.export import export_onnx, export_program
from lrpfx.match import Plan
from lrpfx.patterns import Pattern, register_pattern, registered_patterns
from lrpfx.rules import (
    AlphaBeta,
    AvgMatched,
    Epsilon,
    Flat,
    Gamma,
    Norm,
    Pass,
    Rule,
    WinnerTakesAll,
    WSquare,
    Zero,
    ZBox,
    ZPlus,
    register_rule,
    registered_rules,
)
from lrpfx.ruleset import Binding, RuleSet

__version__ = "0.1.0"

__all__ = [
    "AlphaBeta", "AvgMatched", "Binding", "Epsilon", "Flat", "Gamma", "InputError", "LrpfxError", "Norm",
    "Pass", "Pattern", "Plan", "RegistryError", "Rule", "RuleSet", "RuleSetError", "TraceError",
    "TrainModeError", "UnmatchedNodeError", "WSquare", "WinnerTakesAll", "ZBox", "ZPlus", "Zero",
    "block_leaks", "builtin_rulesets", "compile", "export_onnx", "export_program", "inspect", "register_pattern", "register_rule", "registered_patterns",
    "registered_rules",
]
