"""``python -m lrpfx.cli`` (and ``torchrun -m lrpfx.cli``): the ``lrpfx`` command."""
import sys

from lrpfx.cli.commands import main

sys.exit(main())
