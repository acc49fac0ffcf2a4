"""This library's batch norm as PyTorch modules (the user guide's "PyTorch" page).

Imports torch (the ``[torch]`` extra); ``import batchnorm`` alone never does. Everything here
is re-exported from :mod:`batchnorm.adapters.torch`.
"""

from __future__ import annotations

try:  # a missing framework gets the install line, not a bare ModuleNotFoundError
    import torch as _torch  # noqa: F401
except ModuleNotFoundError as exc:
    if exc.name != "torch":
        raise
    raise ModuleNotFoundError(
        "batchnorm.torch needs PyTorch: pip install 'batchnorm[torch]' (CPU-only build: pip "
        "install torch --index-url https://download.pytorch.org/whl/cpu)",
        name="torch",
    ) from exc
from .adapters.torch import *  # noqa: F403
from .adapters.torch import __all__  # noqa: F401
