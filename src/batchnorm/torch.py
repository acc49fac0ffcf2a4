"""This library's batch norm as PyTorch modules (the user guide's "PyTorch" page).

Imports torch (the ``[torch]`` extra); ``import batchnorm`` alone never does. Everything here
is re-exported from :mod:`batchnorm.adapters.torch`.
"""

from __future__ import annotations

from .adapters.torch import *  # noqa: F403
from .adapters.torch import __all__  # noqa: F401
