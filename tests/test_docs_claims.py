"""What the guide pages' examples compute is right, not only that they run.

tests/test_docs.py runs every page's ```python blocks in order; here the pages whose examples
state a result (folding equals the layer, the data-parallel loop gives a loss, the JAX and
PyTorch examples give what the text says) are run again and their namespaces checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def run_page(page: str, tmp_path, monkeypatch) -> dict:
    """Run a page's ```python blocks in order in one namespace; return the namespace."""
    text = (DOCS / page).read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks, page
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page} python block {i}", "exec"), ns)  # noqa: S102
    return ns


def test_the_variants_page(tmp_path, monkeypatch):
    ns = run_page("guide/variants.md", tmp_path, monkeypatch)
    x, model = ns["x"], ns["model"]
    assert ns["y"].shape == x.shape
    assert ns["report"][0]["batches"] == 10
    z = np.random.default_rng(1).standard_normal((4, 20))
    expected = model.modules[1].eval()(z @ model.modules[0].W)
    np.testing.assert_allclose(
        z @ ns["W_folded"] + ns["b_folded"], expected, rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(ns["same"].running_var, ns["layer"].running_var, rtol=1e-12)


def test_the_data_parallel_loop_of_the_distributed_page(tmp_path, monkeypatch):
    pytest.importorskip("mpi4py")
    ns = run_page("guide/distributed.md", tmp_path, monkeypatch)
    metrics = ns["metrics"]  # the data-parallel loop, here on a single rank
    assert len(metrics) == 1 and np.isfinite(metrics[0]["loss"])


@pytest.mark.slow  # jit compilations
def test_the_jax_page_gives_what_it_says(tmp_path, monkeypatch):
    """The results against the library's own single-device call."""
    jax = pytest.importorskip("jax")
    ns = run_page("guide/jax.md", tmp_path, monkeypatch)
    jnp, bnj = jax.numpy, ns["bnj"]
    assert ns["yj"].shape == ns["yr"].shape == ns["yg"].shape == (256, 16)
    mean = np.asarray(ns["xj"], np.float64).mean(0)
    np.testing.assert_allclose(np.asarray(ns["stats"][0]), 0.01 * mean, rtol=1e-6)
    # d/dgamma_c of mean(y^2 c) = 2 c gamma var/(var + eps) / 16 = c/8 (unit variance data)
    np.testing.assert_allclose(np.asarray(ns["grads"][0]), np.arange(16) / 8, rtol=2e-3)
    stats = ns["stats"]

    def single(g, b):
        y, _ = bnj.batch_norm(ns["xs"], g, b, *stats, training=True)
        return jnp.sum(y * ns["xs"])

    for a, e in zip(
        (ns["dg"], ns["db"]), jax.grad(single, argnums=(0, 1))(ns["gj"], ns["bj"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-3)


def test_the_torch_page_gives_what_it_says(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    ns = run_page("guide/torch.md", tmp_path, monkeypatch)
    import batchnorm.torch as bnt

    assert ns["x"].grad is not None and torch.isfinite(ns["x"].grad).all()
    assert type(ns["back"][1]) is torch.nn.BatchNorm2d
    assert ns["out"].shape == ns["h"].shape
    (layer,) = ns["layers"]
    assert type(layer) is bnt.BatchNorm2d
    assert int(layer.num_batches_tracked) == 1  # recalibrate kept 0; the DDP step added 1
    sync = ns["net"][1]  # converted in place, sharing the recalibrated state
    assert type(sync) is bnt.SyncBatchNorm and sync.weight is layer.weight
    assert sync.weight.grad is not None  # the DDP step ran
    assert not torch.distributed.is_initialized()
