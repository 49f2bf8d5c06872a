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

from lrpfx.compiler.canonicalize import canonicalize
from lrpfx.compiler.emit import emit
from lrpfx.compiler.match import Plan, plan
from lrpfx.compiler.optable import user_module_types
from lrpfx.compiler.patterns import Pattern, describe, get_pattern, register_pattern
from lrpfx.compiler.trace import LeafSpec, OutputSpec, trace
from lrpfx.errors import RuleSetError, UnmatchedNodeError
from lrpfx.postprocess.c3 import C3Config
from lrpfx.postprocess.tensor_backend import c3_tensor
from lrpfx.relevance.rules import Rule
from lrpfx.relevance.ruleset import Binding, RuleSet, builtin_names

RulesArg = RuleSet | str | Path


BindingsArg = Mapping[str | type, Rule]


def _ruleset(rules: RulesArg, bindings: BindingsArg | None, top: str | None) -> RuleSet:
    rs = RuleSet.ensure(rules)
    if bindings:
        rs = rs.with_bindings([Binding(_pattern_name(p), r) for p, r in bindings.items()])
    if top is not None:
        rs = dataclasses.replace(rs, top=top)
    return rs


def _pattern_name(key: str | type) -> str:
    """A binding's pattern: a pattern name, or a module type (bound by type, subclasses included).

    A module type gets a pattern of its own, ``module:<qualified name>``; a call of a module of that
    type keeps its op-table kind (``conv``, ``norm``, ...) or, for a type the table does not know
    (which fx then keeps as one call, a leaf), has kind ``module``: its rule lists ``"module"`` in
    its ``kinds`` and finds the module in ``op.attrs["module"]``.
    """
    if isinstance(key, str):
        return key
    if not (isinstance(key, type) and issubclass(key, torch.nn.Module)):
        raise RuleSetError(f"bindings: key {key!r} is neither a pattern name nor an nn.Module type. "
                           "Hint: see lrpfx.registered_patterns(), or bind by type, e.g. {MyLayer: rule}.")
    name = f"module:{key.__module__}.{key.__qualname__}"
    if get_pattern(name) is None:
        register_pattern(Pattern(name, module_types=(key,), doc=f"calls of {key.__qualname__} modules", kind="module"))
    return name


def _type_leaves(bindings: BindingsArg | None) -> tuple[type, ...]:
    """Module types bound by type that the op table does not know: fx keeps them as leaves."""
    return tuple(k for k in (bindings or {}) if isinstance(k, type)) + user_module_types()


def inspect(model: torch.nn.Module, rules: RulesArg = "epsilon_plus_flat", *,
            bindings: BindingsArg | None = None, leaf_modules: Iterable[LeafSpec] = (),
            output: OutputSpec = None) -> Plan:
    """The plan for ``model`` under ``rules``, without building the explainer.

    ``print(lrpfx.inspect(model, "c3_lrp"))`` shows, per node of the canonical graph, its op,
    the pattern that matched and the rule it got; nodes nothing matched are listed too.
    """
    rs = _ruleset(rules, bindings, None)
    gm = canonicalize(trace(model, (*leaf_modules, *_type_leaves(bindings)), output),
                      fold_batchnorm_=rs.options.get("batchnorm", "fold") == "fold")
    return plan(gm, rs)


def compile(model: torch.nn.Module, rules: RulesArg = "epsilon_plus_flat", *,
            top: str | None = None, bindings: BindingsArg | None = None,
            leaf_modules: Iterable[LeafSpec] = (), output: OutputSpec = None,
            c3: bool | Mapping[str, Any] = False) -> fx.GraphModule:
    """Compile ``model`` into a relevance network.

    Args:
        model: an ``nn.Module`` in eval mode with one tensor input and (N, classes) output.
            It is deep-copied and never modified.
        rules: a built-in rule-set name (see ``lrpfx.builtin_rulesets()``), a TOML path or a RuleSet.
        top: ``"logit"`` (default of most rule sets) or ``"softmax"``: what the output relevance is.
        bindings: extra ``{pattern: rule}`` bindings that win over the rule set's own; a key may be a
            module type (``{MyLayer: rule}``), which binds every call of a module of that type.
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
    options = {**rs.c3, **(dict(c3) if isinstance(c3, Mapping) else {})}
    try:
        C3Config(**options)  # validate now, with a clear message, not at the first call
    except TypeError as e:
        raise RuleSetError(f"C3 options {sorted(options)}: {e}. Hint: see lrpfx.postprocess.C3Config.") from None
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items()}
    return [(c3_tensor, kwargs, ("c3_map", "c3_mask"))]


def unmatched_error(p: Plan) -> UnmatchedNodeError:
    """One error listing every node nothing matched, with its op and a hint that names a fitting declaration."""
    lines = [f"  {n.format_node()}   [{describe(n, p.gm)}{_why(n, p)}]" for n in p.unmatched]
    ops = sorted({describe(n, p.gm) for n in p.unmatched})
    hints = []
    if any(p.kinds.get(n) == "product" for n in p.unmatched):
        hints.append("products of two input-dependent values (x * y, q @ k without a softmax between) have no "
                     "rule in this rule set (the `attnlrp` rule sets take AttnLRP's uniform rule for them: "
                     "lrpfx.compile(model, \"attnlrp\")): only products with a constant or held factor (a gate, "
                     "softmax probabilities) do")
    unknown = [n for n in p.unmatched if p.kinds.get(n) is None]
    if unknown:
        n = unknown[0]
        hints.append(f"if {describe(n, p.gm)!r} is an elementwise activation, declare it in one line: "
                     f"{_declaration(n, p)}; if it only moves, copies or drops elements, use kind=\"routing\"")
    hints.append("or mark the module that contains them as a leaf (leaf_modules=[...]) and bind a rule to it "
                 "(bindings={MyLayer: rule})")
    return UnmatchedNodeError(
        f"{len(p.unmatched)} node(s) have no rule in rule set {p.ruleset.name!r} (unsupported op(s): "
        f"{', '.join(ops)}):\n" + "\n".join(lines) + "\nHint: " + "; ".join(hints) + ".",
        [n.name for n in p.unmatched])


def _why(n: fx.Node, p: Plan) -> str:
    kind = p.kinds.get(n)
    if kind == "product":
        return ": a product of two input-dependent values"
    return f": kind {kind!r}, no binding in the rule set" if kind is not None else ": not in the op table"


def _declaration(n: fx.Node, p: Plan) -> str:
    if n.op == "call_module":
        return f"lrpfx.register_op({type(p.gm.get_submodule(n.target)).__name__}, kind=\"elementwise\")"
    if n.op == "call_method":
        return f"lrpfx.register_op({n.target!r}, kind=\"elementwise\")"
    mod = getattr(n.target, "__module__", None) or ""
    name = getattr(n.target, "__name__", str(n.target))
    qual = f"{'torch' if mod.startswith('torch') and hasattr(torch, name) else mod}.{name}" if mod else name
    return f"lrpfx.register_op({qual}, kind=\"elementwise\")"


def builtin_rulesets() -> list[str]:
    """Names of the built-in rule sets."""
    return builtin_names()


__all__: list[str] = ["compile", "inspect", "builtin_rulesets", "unmatched_error"]
