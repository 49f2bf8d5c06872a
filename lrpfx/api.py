"""The public entry points: orchestration only, no math.

``compile(model, rules) = emit(match(canonicalize(trace(model)), RuleSet.ensure(rules)))``
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from lrpfx.canonicalize import canonicalize
from lrpfx.emit import emit
from lrpfx.errors import RuleSetError, UnmatchedNodeError
from lrpfx.match import Plan, plan
from lrpfx.patterns import describe
from lrpfx.rules import Rule
from lrpfx.ruleset import Binding, RuleSet
from lrpfx.trace import LeafSpec, OutputSpec, trace

RulesArg = RuleSet | str | Path


def _ruleset(rules: RulesArg, bindings: Mapping[str, Rule] | None, top: str | None) -> RuleSet:
    rs = RuleSet.ensure(rules)
    if bindings:
        rs = rs.with_bindings([Binding(p, r) for p, r in bindings.items()])
    if top is not None:
        rs = dataclasses.replace(rs, top=top)
    return rs


def inspect(model: torch.nn.Module, rules: RulesArg = "epsilon_plus_flat", *,
            bindings: Mapping[str, Rule] | None = None, leaf_modules: Iterable[LeafSpec] = (),
            output: OutputSpec = None) -> Plan:
    """The plan for ``model`` under ``rules``, without building the explainer.

    ``print(lrpfx.inspect(model, "c3_lrp"))`` shows, per node of the canonical graph, its op,
    the pattern that matched and the rule it got; nodes nothing matched are listed too.
    """
    rs = _ruleset(rules, bindings, None)
    gm = canonicalize(trace(model, leaf_modules, output),
                      fold_batchnorm_=rs.options.get("batchnorm", "fold") == "fold")
    return plan(gm, rs)


def compile(model: torch.nn.Module, rules: RulesArg = "epsilon_plus_flat", *,
            top: str | None = None, bindings: Mapping[str, Rule] | None = None,
            leaf_modules: Iterable[LeafSpec] = (), output: OutputSpec = None,
            c3: bool | Mapping[str, Any] = False) -> fx.GraphModule:
    """Compile ``model`` into a relevance network.

    Args:
        model: an ``nn.Module`` in eval mode with one tensor input and (N, classes) output.
            It is deep-copied and never modified.
        rules: a built-in rule-set name (see ``lrpfx.builtin_rulesets()``), a TOML path or a RuleSet.
        top: ``"logit"`` (default of most rule sets) or ``"softmax"``: what the output relevance is.
        bindings: extra ``{pattern: rule}`` bindings that win over the rule set's own.
        leaf_modules: module types or qualified names that fx should not trace into.
        output: for a model that returns a tuple/list or a dict, the index or key of the
            class-score tensor (e.g. ``output=0`` or ``output="logits"``).
        c3: append the C3 stage (tensor-native, exportable): ``True`` with the rule set's
            ``[c3]`` options (or the defaults of :class:`lrpfx.postprocess.C3Config`), or a
            mapping of options that override them.

    Returns:
        An ``fx.GraphModule`` whose ``forward(x, target=None)`` returns ``(relevance, logits)``,
        or ``(relevance, logits, c3_map, c3_mask)`` with ``c3``; ``relevance`` has ``x``'s
        shape, the C3 map and mask are (N, H, W). ``print(explainer.code)`` shows the forward.

    Raises:
        TrainModeError, TraceError, RuleSetError, UnmatchedNodeError: with the node and a hint.
    """
    p = inspect(model, rules, bindings=bindings, leaf_modules=leaf_modules, output=output)
    if top is not None:
        p.ruleset = dataclasses.replace(p.ruleset, top=top)
    if p.unmatched:
        raise unmatched_error(p)
    return emit(p, _c3_stage(p.ruleset, c3))


def _c3_stage(rs: RuleSet, c3: bool | Mapping[str, Any]) -> list[tuple[Any, dict[str, Any], tuple[str, ...]]]:
    """The post-processing stages: the tensor-native C3 with validated options, or none."""
    if c3 is False or c3 is None:
        return []
    from lrpfx.postprocess import C3Config, c3_tensor
    options = {**rs.c3, **(dict(c3) if isinstance(c3, Mapping) else {})}
    try:
        C3Config(**options)  # validate now, with a clear message, not at the first call
    except TypeError as e:
        raise RuleSetError(f"C3 options {sorted(options)}: {e}. Hint: see lrpfx.postprocess.C3Config.") from None
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items()}
    return [(c3_tensor, kwargs, ("c3_map", "c3_mask"))]


def unmatched_error(p: Plan) -> UnmatchedNodeError:
    """One error listing every node nothing matched, with its op and a hint."""
    lines = [f"  {n.format_node()}   [{describe(n, p.gm)}]" for n in p.unmatched]
    ops = sorted({describe(n, p.gm) for n in p.unmatched})
    return UnmatchedNodeError(
        f"{len(p.unmatched)} node(s) have no rule in rule set {p.ruleset.name!r} (unsupported op(s): "
        f"{', '.join(ops)}):\n" + "\n".join(lines)
        + "\nHint: register a rule and a pattern for these ops (lrpfx.register_rule / register_pattern), "
          "or mark the module that contains them as a leaf (leaf_modules=[...]) and bind a rule to it.",
        [n.name for n in p.unmatched])


def builtin_rulesets() -> list[str]:
    """Names of the built-in rule sets."""
    from lrpfx.ruleset import builtin_names
    return builtin_names()


__all__: list[str] = ["compile", "inspect", "builtin_rulesets", "unmatched_error"]
