"""``python -m batchnorm_demo`` runs the command line (see :mod:`batchnorm_demo.cli`)."""

import sys

from .cli import entry

sys.exit(entry())
