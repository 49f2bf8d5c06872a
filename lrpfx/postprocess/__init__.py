"""Post-processing of relevance maps: C3 region selection, heat quantization, rendering.

``c3_opencv`` is the OpenCV reference of the C3 stage and ``c3_tensor`` its pure-torch twin
(batched, exportable); both take the options of :class:`C3Config` and give identical masks.
Rendering (:mod:`lrpfx.postprocess.render`) is imported on demand: it needs matplotlib only
for :func:`~lrpfx.postprocess.render.comparison_grid`.
"""
from lrpfx.postprocess.c3 import C3Config, Threshold, parse_threshold
from lrpfx.postprocess.heat import heat_quantize
from lrpfx.postprocess.labeling import connected_components, outside_background
from lrpfx.postprocess.opencv_backend import C3Result, c3_opencv
from lrpfx.postprocess.tensor_backend import c3_tensor

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
