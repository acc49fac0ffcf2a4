"""The README's "Use it from PyTorch" examples (```python torch blocks) run as written.

They are fenced ``python torch`` so that the in-order run of the plain ``python`` blocks
(tests/test_readme.py) does not need torch; here they run in order in one namespace, and
are skipped when torch is absent.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _torch_blocks() -> list[str]:
    return re.findall(r"```python torch\n(.*?)```", README, flags=re.S)


def test_the_torch_section_has_its_examples():
    section = README.split("## Use it from PyTorch", 1)[1].split("\n## ", 1)[0]
    assert len(_torch_blocks()) == 3
    assert all(b in section for b in _torch_blocks())


def test_torch_readme_blocks_run_in_order(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, block in enumerate(_torch_blocks()):
        exec(compile(block, f"README torch block {i}", "exec"), ns)  # noqa: S102
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
