"""Stage 1: trace a deep copy of the user's model with torch.fx."""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.fx as fx

from lrpfx.errors import TraceError, TrainModeError

LeafSpec = type | str


class _LeafTracer(fx.Tracer):
    """fx's tracer, with user-given leaf modules (by type or by qualified name)."""

    def __init__(self, leaves: Iterable[LeafSpec]) -> None:
        super().__init__()
        leaves = tuple(leaves)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_names = {x for x in leaves if isinstance(x, str)}

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or qualname in self._leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: torch.nn.Module, leaf_modules: Iterable[LeafSpec] = ()) -> fx.GraphModule:
    """Trace a deep copy of ``model``; the model itself is never touched.

    Args:
        model: an ``nn.Module`` in eval mode.
        leaf_modules: module types or qualified names to keep as single calls.

    Raises:
        TrainModeError: the model (or a submodule) is in training mode.
        TraceError: torch.fx cannot trace the model (e.g. data-dependent control flow).
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"lrpfx.compile needs an nn.Module, got {type(model).__name__}.")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise TrainModeError(
            f"the model is in training mode (e.g. {training[0]!r}); LRP explains the eval-mode "
            "function (BatchNorm running statistics, no dropout). Hint: call model.eval() before lrpfx.compile.")
    model = copy.deepcopy(model)
    tracer = _LeafTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ...
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}. Hint: data-dependent "
            "control flow cannot be traced; mark the submodule that contains it as a leaf "
            "(lrpfx.compile(model, leaf_modules=[TheModule])) and register a rule for it.") from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)
