"""lrpfx: compile PyTorch networks into relevance networks (Layer-wise Relevance Propagation).

    explainer = lrpfx.compile(model, rules="epsilon_plus_flat")
    relevance, logits = explainer(x, target)

The compiler lives in :mod:`lrpfx.compiler` (trace -> canonicalize -> match -> emit), the rules
and their tensor math in :mod:`lrpfx.relevance`, the C3 stage in :mod:`lrpfx.postprocess`;
application code (CLI, evaluation, benchmark) in :mod:`lrpfx.cli` and :mod:`lrpfx.eval`, which
``import lrpfx`` does not load.
"""
from __future__ import annotations

from lrpfx.api import builtin_rulesets, compile, inspect
from lrpfx.compiler.diagnostics import block_leaks
from lrpfx.compiler.match import Plan
from lrpfx.compiler.optable import OP_CLASSES, register_op, unregister_op
from lrpfx.compiler.patterns import Pattern, register_pattern, registered_patterns
from lrpfx.errors import (
    InputError,
    LrpfxError,
    RegistryError,
    RuleSetError,
    TraceError,
    TrainModeError,
    UnmatchedNodeError,
)
from lrpfx.export import export_onnx, export_program
from lrpfx.relevance.rules import (
    AlphaBeta,
    AvgMatched,
    AvgSubstitute,
    DenseEpsilon,
    DenseZPlus,
    EccvSplit,
    Epsilon,
    Flat,
    FlatPositive,
    Gamma,
    Identity,
    Norm,
    Pass,
    Renormalize,
    Route,
    Rule,
    SignalTakesAll,
    Slice,
    WinnerTakesAll,
    WSquare,
    Zero,
    ZBox,
    ZPlus,
    register_rule,
    registered_rules,
)
from lrpfx.relevance.base import unregister_rule
from lrpfx.relevance.ruleset import Binding, RuleSet
from lrpfx.runtime import keep_freed_memory

__version__ = "0.1.0"

__all__ = [
    "AlphaBeta", "AvgMatched", "AvgSubstitute", "Binding", "DenseEpsilon", "DenseZPlus", "EccvSplit", "Epsilon",
    "Flat", "FlatPositive", "Gamma", "Identity", "InputError", "LrpfxError", "Norm", "OP_CLASSES", "Pass",
    "Pattern", "Plan", "RegistryError", "Renormalize", "Route", "Rule", "RuleSet", "RuleSetError",
    "SignalTakesAll", "Slice", "TraceError", "TrainModeError", "UnmatchedNodeError", "WSquare", "WinnerTakesAll",
    "ZBox", "ZPlus", "Zero", "block_leaks", "builtin_rulesets", "compile", "export_onnx", "export_program",
    "inspect", "keep_freed_memory", "register_op", "register_pattern", "register_rule", "registered_patterns",
    "registered_rules", "unregister_op", "unregister_rule",
]
