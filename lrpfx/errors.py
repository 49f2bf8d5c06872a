"""Exceptions raised by lrpfx. Every message names what failed and ends with a hint."""
from __future__ import annotations


class LrpfxError(Exception):
    """Base class of every error lrpfx raises on purpose."""


class TraceError(LrpfxError):
    """The model could not be traced by torch.fx."""


class TrainModeError(LrpfxError):
    """The model is in training mode; LRP explains the eval-mode function."""


class UnmatchedNodeError(LrpfxError):
    """Some graph nodes have no rule in the rule set."""

    def __init__(self, message: str, nodes: list[str] | None = None) -> None:
        super().__init__(message)
        self.nodes = list(nodes or [])


class RuleSetError(LrpfxError):
    """A rule set (name, TOML file or object) is invalid."""


class RegistryError(LrpfxError):
    """A rule or pattern name is registered twice or is unknown."""


class InputError(LrpfxError, ValueError):
    """The input or the target given to a compiled explainer is invalid."""
