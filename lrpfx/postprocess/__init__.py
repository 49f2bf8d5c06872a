"""Post-processing of relevance maps: C3 region selection, heat quantization, rendering.

``c3_opencv`` is the OpenCV reference of the C3 stage and ``c3_tensor`` its pure-torch twin
(batched, exportable); both take the options of :class:`C3Config` and give identical masks.
OpenCV is loaded only by the OpenCV backend and by rendering: ``c3_opencv`` and ``C3Result``
are imported on first use (PEP 562), so ``compile(model, c3=True)`` never loads cv2.
"""
from __future__ import annotations

import importlib
from typing import Any

from lrpfx.postprocess.c3 import C3Config, Threshold, parse_threshold
from lrpfx.postprocess.heat import heat_quantize
from lrpfx.postprocess.labeling import connected_components, outside_background
from lrpfx.postprocess.tensor_backend import c3_tensor

#: names served on demand, by the module that defines them (these import cv2)
_LAZY = {"c3_opencv": "lrpfx.postprocess.opencv_backend", "C3Result": "lrpfx.postprocess.opencv_backend"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lrpfx.postprocess' has no attribute {name!r}")


__all__ = [
    "C3Config",
    "C3Result",
    "Threshold",
    "c3_opencv",
    "c3_tensor",
    "connected_components",
    "heat_quantize",
    "outside_background",
    "parse_threshold",
]
