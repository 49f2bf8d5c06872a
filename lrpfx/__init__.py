"""lrpfx: compile PyTorch CNNs into relevance networks (Layer-wise Relevance Propagation)."""
from __future__ import annotations

from lrpfx.errors import (
    InputError,
    LrpfxError,
    RegistryError,
    RuleSetError,
    TraceError,
    TrainModeError,
    UnmatchedNodeError,
)

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "LrpfxError",
    "RegistryError",
    "RuleSetError",
    "TraceError",
    "TrainModeError",
    "UnmatchedNodeError",
]
