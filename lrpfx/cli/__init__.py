"""The command line (``lrpfx explain | export | inspect | demo | eval | bench``): application code, outside
the compiler's import path. ``import lrpfx`` does not load it."""
from lrpfx.cli.commands import main

__all__ = ["main"]
