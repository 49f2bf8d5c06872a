"""Stage 1: trace a deep copy of the user's model with torch.fx."""
from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Hashable, Iterable

import torch
import torch.fx as fx

from lrpfx.compiler.optable import wrapped_functions
from lrpfx.compiler.patterns import describe
from lrpfx.errors import TraceError, TrainModeError

LeafSpec = type | str
#: which output is the class-score tensor, for a model that returns a tuple/list (index) or dict (key)
OutputSpec = int | str | Hashable | None


class _LeafTracer(fx.Tracer):
    """fx's tracer, with user-given leaf modules (by type or by qualified name)."""

    def __init__(self, leaves: Iterable[LeafSpec]) -> None:
        super().__init__(autowrap_functions=wrapped_functions())
        leaves = tuple(leaves)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_names = {x for x in leaves if isinstance(x, str)}

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or qualname in self._leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: torch.nn.Module, leaf_modules: Iterable[LeafSpec] = (), output: OutputSpec = None) -> fx.GraphModule:
    """Trace a deep copy of ``model``; the model itself is never touched.

    Args:
        model: an ``nn.Module`` in eval mode.
        leaf_modules: module types or qualified names to keep as single calls.
        output: for a model that returns a tuple/list or a dict, the index or key of the
            class-score tensor; the traced graph then returns that tensor only.

    Raises:
        TrainModeError: the model (or a submodule) is in training mode.
        TraceError: torch.fx cannot trace the model (e.g. data-dependent control flow), or
            ``output`` does not select a tensor of the model's output.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"lrpfx.compile needs an nn.Module, got {type(model).__name__}. "
                         "Hint: wrap a function in an nn.Module whose forward calls it.")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise TrainModeError(
            f"the model is in training mode (e.g. {training[0]!r}); LRP explains the eval-mode "
            "function (BatchNorm running statistics, no dropout). Hint: call model.eval() before lrpfx.compile.")
    model = copy.deepcopy(model)
    tracer = _LeafTracer(leaf_modules)
    optional = _optional_arguments(model)
    try:
        graph = tracer.trace(model, concrete_args=optional or None)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ...
        inside = _failing_module(tracer)
        where = f" (inside {inside[0]!r}, a {inside[1]})" if inside else ""
        leaf = inside[1] if inside else "TheModule"
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}{where}: {type(e).__name__}: {e}. Hint: data-dependent "
            "control flow cannot be traced; mark the submodule that contains it as a leaf "
            f"(lrpfx.compile(model, leaf_modules=[{leaf}])) and register a rule for it.") from e
    _drop_specialized(graph, len(optional))
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    if output is not None:
        select_output(gm, output)
    return gm


def _optional_arguments(model: torch.nn.Module) -> dict[str, object]:
    """The forward's arguments after the first that have a default (timm's ViT: ``attn_mask=None``,
    ``is_causal=False``): traced at their defaults, so that the explainer takes the image alone."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1:] if p.kind in plain and p.default is not inspect.Parameter.empty}


_ASSERTS = {fx._symbolic_trace._assert_is_none, torch._assert, operator.eq}


def _drop_specialized(graph: fx.Graph, count: int) -> None:
    """Remove the placeholders of arguments traced at their defaults and fx's checks of them."""
    if not count:
        return
    for ph in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        checks, stack = [], list(ph.users)
        while stack:
            n = stack.pop()
            checks.append(n)
            stack.extend(n.users)
        if all(n.op == "call_function" and n.target in _ASSERTS for n in checks):
            for n in reversed(sorted(set(checks), key=lambda n: list(graph.nodes).index(n))):
                graph.erase_node(n)
            graph.erase_node(ph)


def _failing_module(tracer: fx.Tracer) -> tuple[str, str] | None:
    """(qualified name, type name) of the innermost submodule fx was tracing when it failed, if any.

    fx pushes each module it traces into onto ``module_stack`` and pops it on return, so after
    an exception the last entry is where tracing stopped.
    """
    stack = getattr(tracer, "module_stack", None)
    if not stack:
        return None
    name, module_type = next(reversed(stack.values()))
    if not name:
        return None
    return name, getattr(module_type, "__name__", str(module_type))


def select_output(gm: fx.GraphModule, output: OutputSpec) -> None:
    """Make ``gm`` return only ``output`` (an index or key) of its tuple/list/dict output, in place."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    result = out_node.args[0]
    if isinstance(result, fx.Node) or not isinstance(result, (tuple, list, dict)):
        raise TraceError(f"output={output!r} selects from a tuple, list or dict, but the model returns one value "
                         f"({describe_output(result, gm)}). Hint: leave output=None for a model that returns "
                         "its class scores.")
    keys = list(result) if isinstance(result, dict) else list(range(len(result)))
    if isinstance(result, (tuple, list)) and isinstance(output, int) and -len(result) <= output < 0:
        output += len(result)
    if isinstance(output, bool) or output not in keys:
        raise TraceError(f"output={output!r} is not among the model's outputs ({describe_output(result, gm)}). "
                         f"Hint: pass one of {keys}.")
    chosen = result[output]
    if not isinstance(chosen, fx.Node):
        raise TraceError(f"output={output!r} selects {type(chosen).__name__}, not a tensor "
                         f"({describe_output(result, gm)}). Hint: select the class-score tensor.")
    out_node.args = (chosen,)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def describe_output(result: object, gm: fx.GraphModule) -> str:
    """A short description of a model's (traced) output structure: ``tuple of 2: [0] fc (Linear), [1] x``."""
    def one(v: object) -> str:
        if isinstance(v, fx.Node):
            return f"{v.name} ({describe(v, gm)})" if v.op not in ("placeholder", "get_attr") else v.name
        return type(v).__name__
    if isinstance(result, dict):
        items = ", ".join(f"{k!r}: {one(v)}" for k, v in result.items())
        return f"dict with keys {list(result)} ({items})"
    if isinstance(result, (tuple, list)):
        items = ", ".join(f"[{i}] {one(v)}" for i, v in enumerate(result))
        return f"{output_structure(result)} of {len(result)}: {items}"
    return one(result)


def output_structure(result: object) -> str:
    """``tuple``, ``list`` or ``dict`` (fx stores outputs as its immutable subclasses), or a namedtuple's name."""
    for base in (dict, list):
        if isinstance(result, base):
            return base.__name__
    return type(result).__name__
