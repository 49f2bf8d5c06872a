"""Ship an explainer: ONNX (for onnxruntime) and torch.export programs, with a dynamic batch."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.fx as fx


class _Explain(torch.nn.Module):
    """``forward(x)`` of an explainer, explaining the predicted class (the exported signature)."""

    def __init__(self, explainer: fx.GraphModule) -> None:
        super().__init__()
        self.explainer = explainer
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.explainer(x)


def _dynamic(dynamic_batch: bool, max_batch: int) -> dict[str, dict[int, torch.export.Dim]] | None:
    return {"x": {0: torch.export.Dim("batch", min=1, max=max_batch)}} if dynamic_batch else None


def export_program(explainer: fx.GraphModule, example_input: torch.Tensor, *, dynamic_batch: bool = True,
                   max_batch: int = 4096) -> torch.export.ExportedProgram:
    """``torch.export`` the explainer; the program's ``forward(x)`` explains the predicted class.

    Only the batch dimension is dynamic; the spatial size is that of ``example_input``.
    """
    return torch.export.export(_Explain(explainer), (example_input,),
                               dynamic_shapes=_dynamic(dynamic_batch, max_batch))


def export_onnx(explainer: fx.GraphModule, path: str | Path, example_input: torch.Tensor, *,
                dynamic_batch: bool = True, max_batch: int = 4096, opset_version: int | None = None) -> Path:
    """Write the explainer as an ONNX model (torch's dynamo exporter) and return its path.

    Inputs: ``x`` (N, C, H, W). Outputs: relevance, logits (and the C3 map and mask when the
    explainer has a C3 stage), explaining each sample's predicted class. Run it with
    ``onnxruntime.InferenceSession(path).run(None, {"x": array})``.
    """
    path = Path(path)
    kwargs = {} if opset_version is None else {"opset_version": opset_version}
    program = torch.onnx.export(_Explain(explainer), (example_input,), dynamo=True, input_names=["x"],
                                dynamic_shapes=_dynamic(dynamic_batch, max_batch), verbose=False, **kwargs)
    assert program is not None
    program.save(str(path))
    return path
