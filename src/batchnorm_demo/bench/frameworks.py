"""``batchnorm bench --torch`` / ``--jax``: the framework comparisons of the repository's
``benchmarks/`` folder, run through their ``main(argv)``.

The scripts (``benchmarks/torch_speed.py``: :mod:`batchnorm.torch` against ``torch.nn``;
``benchmarks/jax_flax.py``: :mod:`batchnorm.jax` against ``flax.linen``) are files of the
source repository, not of the installed package: from a source checkout (an editable
install, or ``PYTHONPATH=src``) the command loads the script from its file and calls its
``main``; from a wheel it refuses with a message that says where the script is and how to run
it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["SCRIPTS", "run_script", "script_path"]

#: the flag, the script in ``benchmarks/`` and the framework it needs
SCRIPTS = {"torch": ("torch_speed.py", "torch"), "jax": ("jax_flax.py", "jax and flax")}

_REPO = Path(__file__).resolve().parents[3]  # src/batchnorm_demo/bench/ -> the repository


def script_path(name: str, root: Path | None = None) -> Path:
    """The path of ``benchmarks/<name>`` in the source repository.

    Parameters
    ----------
    name : str
        A file name in ``benchmarks/``.
    root : pathlib.Path, optional
        The repository (default: the one this package was loaded from, if it was).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    ValueError
        The file is not there (an installed package has no ``benchmarks/``): the message says
        how to run it from a checkout of the repository.
    """
    path = (_REPO if root is None else root) / "benchmarks" / name
    if not path.is_file():
        raise ValueError(
            f"benchmarks/{name} is part of the source repository, not of the installed "
            f"package (looked for {path}); from a checkout of the repository run "
            f"`python benchmarks/{name}`, or `batchnorm bench` there with PYTHONPATH=src"
        )
    return path


def run_script(flag: str, argv: list[str], root: Path | None = None):
    """Load the ``--<flag>`` comparison's script from its file and return ``main(argv)``.

    Parameters
    ----------
    flag : {"torch", "jax"}
        Which comparison.
    argv : list of str
        The script's arguments (``["--repeats", "N"]`` or nothing).
    root : pathlib.Path, optional
        The repository (see :func:`script_path`).

    Returns
    -------
    object
        What the script's ``main`` returns (it prints its own table).
    """
    name, _ = SCRIPTS[flag]
    path = script_path(name, root)
    spec = importlib.util.spec_from_file_location(f"batchnorm_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would (dataclasses look the module up)
    try:
        spec.loader.exec_module(module)  # imports the framework: missing, an ImportError
        return module.main(argv)
    finally:
        sys.modules.pop(spec.name, None)
