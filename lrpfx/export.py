"""Ship an explainer: ONNX (for onnxruntime) and torch.export programs.

The exported forward is ``forward(x, target)`` by default: ``target`` is an int64 tensor (N,),
one class per sample, where -1 means "the predicted class"; ``target_input=False`` gives the
one-input form ``forward(x)``, which explains the predicted class. The batch dimension is
dynamic, and so are the height and the width wherever every op of the explainer allows it:
``dynamic_size=None`` (the default) exports a dynamic size when it can and otherwise the
example's size, with a warning that names the op; ``True`` raises :class:`ExportError` naming
the op instead; ``False`` exports the example's size.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from lrpfx.compiler.diagnostics import minimum_input_size, smallest_side
from lrpfx.errors import LrpfxError
from lrpfx.postprocess.c3 import parse_resize
from lrpfx.postprocess.tensor_backend import c3_tensor


__all__ = ["ExportError", "c3_sizes", "export_onnx", "export_program", "minimum_input_size", "output_names"]


class ExportError(LrpfxError):
    """The explainer cannot be exported as asked (e.g. with a dynamic height and width)."""


class _ExplainPredicted(torch.nn.Module):
    """``forward(x)``: explains each sample's predicted class (the one-input form)."""

    def __init__(self, explainer: fx.GraphModule) -> None:
        super().__init__()
        self.explainer = explainer
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.explainer(x)


class _ExplainTarget(_ExplainPredicted):
    """``forward(x, target)``: target (N,) int64, one class per sample, -1 for the predicted class."""

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return self.explainer(x, target)


def c3_sizes(explainer: fx.GraphModule) -> list[tuple[int, int] | None]:
    """The ``resize_to`` of every C3 stage in the explainer's graph (empty without a C3 stage)."""
    return [parse_resize(n.kwargs.get("resize_to", (28, 28))) for n in explainer.graph.nodes
            if n.op == "call_function" and n.target is c3_tensor]


def output_names(explainer: fx.GraphModule) -> list[str]:
    """The names of the explainer's outputs: ``relevance``, ``logits``, then its post-processing
    stages' (``c3_map``, ``c3_mask`` for the C3 stage). Exports use them as the outputs' names."""
    out = next(n for n in reversed(explainer.graph.nodes) if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    return ["relevance", "logits"] + [getattr(v, "name", f"output_{i}") for i, v in enumerate(values)][2:]


def _example_target(example_input: torch.Tensor) -> torch.Tensor:
    return torch.full((example_input.shape[0],), -1, dtype=torch.long, device=example_input.device)


def _dynamic_shapes(explainer: fx.GraphModule, example_input: torch.Tensor, *, target_input: bool,
                    dynamic_batch: bool, max_batch: int, dynamic_size: bool, min_size: int | None,
                    max_size: int) -> dict[str, Any] | None:
    x: dict[int, Any] = {}
    if dynamic_batch:
        x[0] = torch.export.Dim("batch", min=1, max=max_batch)
    if dynamic_size:
        # the C3 selection runs at resize_to: the input must be at least that large for its
        # size to stay fixed (a smaller input would select at its own, dynamic, size)
        sizes = [s for s in c3_sizes(explainer) if s is not None]
        if min_size is None:  # the network's own minimum: below it the program must not promise to run
            min_size = minimum_input_size(explainer, example_input)
        lo_h = max([min_size] + [s[0] for s in sizes])
        lo_w = max([min_size] + [s[1] for s in sizes])
        h, w = example_input.shape[-2:]
        if h < lo_h or w < lo_w:
            raise ExportError(f"the example input is {h} x {w}, below the smallest size of the dynamic export "
                              f"({lo_h} x {lo_w}: the network's minimum, the C3 stage's resize_to, or min_size). "
                              f"Hint: pass an example of at least {lo_h} x {lo_w}, or export with "
                              "dynamic_size=False.")
        # Dim.DYNAMIC, not a named Dim: shape checks that hold for every size but that the
        # symbolic solver cannot prove (e.g. output_padding >= 0) become runtime checks
        x[2] = torch.export.Dim.DYNAMIC(min=lo_h, max=max_size)
        x[3] = torch.export.Dim.DYNAMIC(min=lo_w, max=max_size)
    if not x:
        return None
    shapes: dict[str, Any] = {"x": x}
    if target_input:
        shapes["target"] = {0: x[0]} if dynamic_batch else None
    return shapes


def _spatial_specializations(program: torch.export.ExportedProgram) -> list[str]:
    """Where export fixed the height or width to particular values: ``"<guard> (file:line in fn)"``.

    Reads the shape guards torch.export recorded (each with the source line that added it); an
    equality on the spatial sizes means the program only runs at those sizes.
    """
    try:
        import sympy
        x = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "x")
        spatial = [s for s in x.meta["val"].shape[2:] if isinstance(s, torch.SymInt)]
        if len(spatial) < 2:
            return ["the height or width (made static)"]
        symbols = set().union(*(s.node.expr.free_symbols for s in spatial))
        guards = spatial[0].node.shape_env.guards
        return [f"{g.expr} {g.sloc}" for g in guards
                if isinstance(g.expr, sympy.Eq) and g.expr.free_symbols & symbols]
    except Exception:  # private torch internals: if they change, no check rather than a crash
        return []


def export_program(explainer: fx.GraphModule, example_input: torch.Tensor, *, target_input: bool = True,
                   dynamic_batch: bool = True, max_batch: int = 4096, dynamic_size: bool | None = None,
                   min_size: int | None = None, max_size: int = 4096) -> torch.export.ExportedProgram:
    """``torch.export`` the explainer.

    The program's ``forward(x, target)`` takes ``target`` (N,) int64, -1 for the predicted
    class (``target_input=False``: ``forward(x)``, the predicted class). The batch is dynamic
    (``dynamic_batch``; an example of batch 1 is traced at batch 2, since torch.export would make a
    dimension of size 1 a constant), and so are the height and width between ``min_size`` (default: 1,
    raised to a C3 stage's ``resize_to``) and ``max_size``: ``dynamic_size=None`` when every op
    allows it (else the example's size and a warning naming the op), ``True`` always (else
    :class:`ExportError` naming the op), ``False`` never.

    Raises:
        ExportError: with ``dynamic_size=True``, an op that only works at particular sizes.
    """
    if dynamic_batch and example_input.shape[0] == 1:
        # torch.export specializes a dimension of size 1 to a constant: trace the batch dimension at 2
        example_input = torch.cat([example_input, example_input])
    _check_example(explainer, example_input)
    if dynamic_size is None:
        try:
            return export_program(explainer, example_input, target_input=target_input, dynamic_batch=dynamic_batch,
                                  max_batch=max_batch, dynamic_size=True, min_size=min_size, max_size=max_size)
        except ExportError as e:
            _warn_fixed(e, example_input)
            dynamic_size = False
    module = _ExplainTarget(explainer) if target_input else _ExplainPredicted(explainer)
    args = (example_input, _example_target(example_input)) if target_input else (example_input,)
    shapes = _dynamic_shapes(explainer, example_input, target_input=target_input, dynamic_batch=dynamic_batch,
                             max_batch=max_batch, dynamic_size=dynamic_size, min_size=min_size, max_size=max_size)
    try:
        program = torch.export.export(module, args, dynamic_shapes=shapes)
    except Exception as e:
        if not dynamic_size:
            raise
        raise ExportError(f"cannot export with a dynamic height and width: {_first_lines(e)} "
                          "Hint: export with dynamic_size=False (`lrpfx export --fixed-size`) for the example's "
                          "size.") from e
    if dynamic_size:
        fixed = _spatial_specializations(program)
        if fixed:
            raise ExportError(f"cannot export with a dynamic height and width: an op only works at the example's "
                              f"size {tuple(example_input.shape[-2:])}: {'; '.join(fixed)}. Hint: export with "
                              "dynamic_size=False (`lrpfx export --fixed-size`) for that size.")
    return program


def _check_example(explainer: torch.nn.Module, example_input: torch.Tensor) -> None:
    """An example too small for the network: an error naming the network's minimum size."""
    try:
        with torch.inference_mode():
            explainer.forward(example_input[:1])  # the bare forward: the shape error, not the eager InputError
    except (RuntimeError, IndexError) as e:
        h, w = example_input.shape[-2:]
        side = smallest_side(explainer, example_input)
        if side is not None and side > min(h, w):
            raise ExportError(f"the example input is {h} x {w}, smaller than the smallest input this network takes "
                              f"({side} x {side}). Hint: export with an example of at least {side} x {side}."
                              ) from e
        raise


def _warn_fixed(e: ExportError, example_input: torch.Tensor) -> None:
    size = tuple(example_input.shape[-2:])
    warnings.warn(f"{str(e).split(' Hint:')[0]} -> exported for the example's size {size} only "
                  "(dynamic_size=False, or `lrpfx export --fixed-size`, asks for that and silences this warning).",
                  stacklevel=3)


def _onnx_blockers(program: torch.export.ExportedProgram) -> list[str]:
    """Ops of a dynamic-size program that ONNX cannot express with a dynamic size."""
    found = []
    for n in program.graph.nodes:
        name = str(n.target)
        if "conv_transpose" in name:
            pad = n.args[5] if len(n.args) > 5 else n.kwargs.get("output_padding", ())
        elif "convolution" in name and len(n.args) > 7 and n.args[6]:
            pad = n.args[7]
        else:
            continue
        if any(isinstance(v, fx.Node) for v in pad):
            # the last line of the trace is the explainer's own line that called the kernel
            lines = [line.strip() for line in n.meta.get("stack_trace", "").splitlines() if line.strip()]
            called = re.search(r"^(\w+) = ([\w.]+)\(", lines[-1]) if lines else None
            where = f" in {called.group(2)} (the explainer's node {called.group(1)})" if called else ""
            found.append(f"ConvTranspose ({n.target}){where}")
    return found[:1]


def _onnx_failure(e: BaseException, program: torch.export.ExportedProgram) -> str:
    """One sentence for an ONNX conversion that failed: the op ONNX has no function for, and where."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(x)) for x in chain)
    op = re.search(r"op='([\w.]+)', overload='(\w+)'", text)
    node = re.search(r"Error when translating node %(\w+)", text)
    what = f"{op.group(1)}.{op.group(2)}" if op else "an op"
    where = ""
    if node is not None:
        n = next((n for n in program.graph.nodes if n.name == node.group(1)), None)
        lines = [line.strip() for line in (n.meta.get("stack_trace", "") if n is not None else "").splitlines()
                 if line.strip()]
        called = re.search(r"^(\w+) = ([\w.]+)\(", lines[-1]) if lines else None
        where = (f" in {called.group(2)} (the explainer's node {called.group(1)})" if called
                 else f" (program node {node.group(1)})")
    first = next((line for x in chain for line in str(x).splitlines() if "No ONNX function" in line), "")
    reason = re.sub(r"\x1b\[[0-9;]*m|<class '[\w.]+'>: ", "", first).strip() or _first_lines(chain[-1], 1)
    return (f"cannot convert the explainer to ONNX: ONNX has no function for {what}{where} ({reason}). Hint: "
            "use export_program (torch.export) for this explainer, or another example size or opset_version; "
            "an op PyTorch decomposes only at some sizes appears at tiny inputs.")


def _first_lines(e: BaseException, n: int = 3) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: " + " ".join(lines[:n])


def export_onnx(explainer: fx.GraphModule, path: str | Path, example_input: torch.Tensor, *,
                target_input: bool = True, dynamic_batch: bool = True, max_batch: int = 4096,
                dynamic_size: bool | None = None, min_size: int | None = None, max_size: int = 4096,
                opset_version: int | None = None) -> Path:
    """Write the explainer as an ONNX model (torch's dynamo exporter) and return its path.

    Inputs: ``x`` (N, C, H, W) and ``target`` (N,) int64, -1 for the predicted class
    (``target_input=False``: ``x`` only, the predicted class). Outputs: relevance, logits (and
    the C3 map and mask with a C3 stage), named ``relevance``, ``logits``, ``c3_map`` and
    ``c3_mask`` (:func:`output_names`). Batch, height and width are dynamic as in
    :func:`export_program`. Run it with
    ``onnxruntime.InferenceSession(path).run(None, {"x": images, "target": classes})``.
    ONNX checks no values: a target outside [-1, classes) gives an undefined relevance
    (typically all zeros) instead of an error; the eager explainer raises.
    """
    path = Path(path)
    options = dict(target_input=target_input, dynamic_batch=dynamic_batch, max_batch=max_batch, min_size=min_size,
                   max_size=max_size)
    program = export_program(explainer, example_input, dynamic_size=dynamic_size, **options)  # type: ignore[arg-type]
    blockers = _onnx_blockers(program) if dynamic_size is not False else []
    if blockers:
        error = ExportError(
            f"cannot export to ONNX with a dynamic height and width: {blockers[0]}: the transposed convolution's "
            "output_padding depends on the input size, and ONNX's ConvTranspose takes it only as a constant. "
            "Hint: export with dynamic_size=False (`lrpfx export --fixed-size`) for the example's size, or use "
            "export_program (torch.export), which keeps the size dynamic.")
        if dynamic_size:
            raise error
        _warn_fixed(error, example_input)
        program = export_program(explainer, example_input, dynamic_size=False, **options)  # type: ignore[arg-type]
    kwargs = {} if opset_version is None else {"opset_version": opset_version}
    names = ["x", "target"] if target_input else ["x"]
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=names,
                                         output_names=output_names(explainer), verbose=False, **kwargs)
    except Exception as e:  # torch's exporter: a long message with advice to file an issue; name the op instead
        raise ExportError(_onnx_failure(e, program)) from e
    assert onnx_program is not None
    onnx_program.save(str(path))
    return path
