"""``python -m batchnorm`` runs the command line (see :mod:`batchnorm.cli`)."""

import sys

from .cli import main

sys.exit(main())
