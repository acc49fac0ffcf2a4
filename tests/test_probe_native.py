"""Reproducers of defects of the native torch autograd node (batchnorm.adapters.torch.native),
found by a hostile probe. Each runs in a subprocess with the node built and turned on (the
suite's conftest turns it off in this process), so a crash is seen as a return code.

Every test checks that the native node served the call (its C++ node, ``CppFunction``), and
compares with the Python route (``native.disable()``), the oracle, where one applies."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")

SRC = Path(__file__).resolve().parents[1] / "src"

PRELUDE = """
import torch
import batchnorm.torch as bt
from batchnorm.adapters.torch import native
try:
    native.build()
except Exception as exc:
    print("NOBUILD", exc)
    raise SystemExit(0)
"""


def _run(body: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("BATCHNORM_TORCH_NATIVE", None)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    code = PRELUDE + textwrap.dedent(body)
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
    )
    if "NOBUILD" in res.stdout:
        pytest.skip(f"the native node cannot be built here: {res.stdout[:200]}")
    return res


def test_compiled_autograd_backward_through_the_native_node():
    """A backward under compiled autograd: the Python route (and torch.nn) run it; the
    native node fails torch's internal assert ``ctx_.non_differentiable_.empty()``
    (custom_function.h), because its forward marks the statistics output
    non-differentiable, which compiled autograd's C++-function path does not accept. The
    documented switch (``torch._dynamo.config.compiled_autograd = True`` and the backward
    inside a ``torch.compile``d function) fails the same way."""
    res = _run(
        """
        import torch._dynamo.compiled_autograd as ca

        def step():
            torch.manual_seed(0)
            m = bt.BatchNorm1d(8)
            x = torch.randn(4, 8, requires_grad=True)
            y = m(x)
            with ca._enable(torch.compile(backend="eager")):
                y.pow(2).sum().backward()
            return type(y.grad_fn).__name__, x.grad, m.weight.grad, m.bias.grad

        node, *got = step()
        assert node == "CppFunction", node  # the native node served the forward
        native.disable()
        node_py, *want = step()
        assert node_py != "CppFunction", node_py
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        print("DONE")
        """
    )
    assert res.returncode == 0 and "DONE" in res.stdout, res.stderr[-2000:]


def test_empty_spatial_dims_fail_as_on_the_python_route():
    """An input with a zero-size spatial dimension and N > 0, e.g. (4, 8, 0, 5): the
    Python route raises ValueError ("cannot normalize an empty batch"; torch.nn returns
    an empty output); with the native node built the same call raises a RuntimeError
    from the extension's argument check ("view (4, 8, 0) of kind 2 does not fit"), so
    the exception a user sees depends on whether the node is in the cache. (The layout's
    kind is WIDE for a zero inner size: _cpu._kind checks only vs[0] and vs[1].)"""
    res = _run(
        """
        def outcome(shape, cls):
            torch.manual_seed(0)
            m = cls(8)
            x = torch.randn(*shape, requires_grad=True)
            try:
                y = m(x)
            except Exception as exc:
                return type(exc).__name__
            return ("ok", tuple(y.shape))

        cases = [((4, 8, 0), bt.BatchNorm1d), ((4, 8, 0, 5), bt.BatchNorm2d),
                 ((2, 8, 0, 0, 0), bt.BatchNorm3d)]
        on = [outcome(s, c) for s, c in cases]
        native.disable()
        off = [outcome(s, c) for s, c in cases]
        print("native", on, "python", off)
        assert on == off, (on, off)
        print("DONE")
        """
    )
    assert res.returncode == 0 and "DONE" in res.stdout, res.stdout[-1000:] + res.stderr[-2000:]
