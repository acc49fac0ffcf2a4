"""The compiled CPU kernels (numba), for NumPy arrays only: see :mod:`.kernels`."""
