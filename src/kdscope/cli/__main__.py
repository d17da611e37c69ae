"""`python -m kdscope.cli` (torchrun and accelerate launch it this way)."""

import sys

from . import run

sys.exit(run())
