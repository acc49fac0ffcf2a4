"""The compiled CPU kernels (numba), for NumPy arrays only: see :mod:`.kernels`."""

from ..compile_notice import install as _install_compile_notice

_install_compile_notice()  # one line on stderr before the first compilation (see there)
