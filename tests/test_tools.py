"""Recalibration, folding, framework conversion, safetensors checkpoints and diagnostics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import snapshot

import batchnorm as bn
from batchnorm import checkpoint
from batchnorm.diagnostics import averaging_window, layer_from_checkpoint, train_eval_gap
from batchnorm.nn import Linear, Sequential, Sigmoid
from batchnorm.recalibrate import Moments
from batchnorm.variants import GhostBatchNorm
from batchnorm_demo.cli import main


# ----------------------------------------------------------------------------- recalibration
def test_moments_merge_is_exact(rng):
    data = [rng.standard_normal((n, 3)) * 2 + 7 for n in (5, 11, 3, 8)]
    acc = Moments()
    for d in data:
        acc = acc.merge(Moments.from_batch(len(d), d.mean(0), d.var(0)))
    allx = np.concatenate(data)
    np.testing.assert_allclose(acc.mean, allx.mean(0), rtol=1e-14)
    np.testing.assert_allclose(acc.var, allx.var(0), rtol=1e-13)
    # grouping does not matter
    left = Moments.from_batch(5, data[0].mean(0), data[0].var(0)).merge(
        Moments.from_batch(11, data[1].mean(0), data[1].var(0))
    )
    right = Moments.from_batch(3, data[2].mean(0), data[2].var(0)).merge(
        Moments.from_batch(8, data[3].mean(0), data[3].var(0))
    )
    np.testing.assert_allclose(left.merge(right).var, acc.var, rtol=1e-13)


def _net(rng):
    return Sequential(
        Linear(5, 4, rng=rng, bias=False),
        bn.BatchNorm(4),
        Sigmoid(),
        Linear(4, 3, rng=rng, bias=False),
        bn.BatchNorm(3),
    )


def test_recalibrate_population_and_ioffe(rng):
    net = _net(rng)
    batches = [rng.standard_normal((20, 5)) * 3 + 1 for _ in range(6)]
    weights = {k: v.copy() for k, v in net.parameters().items()}
    report = bn.recalibrate(net, iter(batches))  # streams from an iterator
    # reference: the first BN layer sees x @ W; population stats over all batches
    z = np.concatenate(batches) @ net.modules[0].W
    np.testing.assert_allclose(net.modules[1].running_mean, z.mean(0), rtol=1e-12)
    np.testing.assert_allclose(net.modules[1].running_var, z.var(0), rtol=1e-12)
    assert report[0]["batches"] == 6 and report[0]["values_per_feature"] == 120
    assert report[0]["max_mean_shift_in_std"] > 0  # init stats (0, 1) were far off
    assert all(np.array_equal(weights[k], v) for k, v in net.parameters().items())
    assert net.modules[1].num_batches_tracked == 0
    # Algorithm 2: E[mu_B], m/(m-1) E[var_B]
    bn.recalibrate(net, batches, method="ioffe")
    zb = [b @ net.modules[0].W for b in batches]
    np.testing.assert_allclose(
        net.modules[1].running_mean, np.mean([v.mean(0) for v in zb], 0), rtol=1e-12
    )
    np.testing.assert_allclose(
        net.modules[1].running_var, np.mean([v.var(0, ddof=1) for v in zb], 0), rtol=1e-12
    )


def test_recalibrate_failure_changes_nothing(rng):
    net = _net(rng)
    net.forward(rng.standard_normal((8, 5)), training=True)
    before = [snapshot(m) for m in net.modules if isinstance(m, bn.BatchNorm)]
    bad = [rng.standard_normal((8, 5)), np.full((8, 5), np.nan)]
    with pytest.raises(ValueError, match="not finite"):
        bn.recalibrate(net, bad)
    with pytest.raises(ValueError, match="no batches"):
        bn.recalibrate(net, [])
    after = [snapshot(m) for m in net.modules if isinstance(m, bn.BatchNorm)]
    for a, b in zip(after, before, strict=True):
        assert a == b  # the cached forward (for backward) too
    with pytest.raises(ValueError, match="no norm layer"):
        bn.recalibrate(Sequential(Sigmoid()), [np.ones((2, 2))])


def test_recalibrate_ghost_layer(rng):
    layer = GhostBatchNorm(3, virtual_batch_size=4)
    x = rng.standard_normal((12, 3)) + 2
    bn.recalibrate(layer, [x])
    np.testing.assert_allclose(layer.running_mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, x.var(0), rtol=1e-13)


# ----------------------------------------------------------------------------- folding
def _trained_bn(rng, c):
    layer = bn.BatchNorm(c)
    layer.gamma[:] = rng.standard_normal(c)
    layer.beta[:] = rng.standard_normal(c)
    layer.running_mean[:] = rng.standard_normal(c)
    layer.running_var[:] = rng.uniform(0.2, 3, c)
    return layer.eval()


def test_fold_linear_both_layouts(rng):
    layer = _trained_bn(rng, 4)
    x = rng.standard_normal((7, 6))
    w, b = rng.standard_normal((6, 4)), rng.standard_normal(4)
    ref = layer(x @ w + b)
    wf, bf = bn.fold_linear(w, b, layer)
    np.testing.assert_allclose(x @ wf + bf, ref, rtol=1e-13, atol=1e-13)
    wf2, bf2 = bn.fold_linear(w.T, None, layer, layout="out_in")
    np.testing.assert_allclose(x @ wf2.T + bf2, layer(x @ w), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="4 outputs"):
        bn.fold_linear(w, b, _trained_bn(rng, 3))


def _conv2d(x, w, b):
    """Reference valid cross-correlation: x (N, Cin, H, W), w (Cout, Cin, kh, kw)."""
    n, _, h, wd = x.shape
    co, _, kh, kw = w.shape
    out = np.zeros((n, co, h - kh + 1, wd - kw + 1))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum(
                "nchw,oc->nohw", x[:, :, i : i + out.shape[2], j : j + out.shape[3]], w[:, :, i, j]
            )
    return out + b[None, :, None, None]


def test_fold_conv(rng):
    layer = _trained_bn(rng, 5)
    x = rng.standard_normal((2, 3, 6, 7))
    w, b = rng.standard_normal((5, 3, 3, 2)), rng.standard_normal(5)
    wf, bf = bn.fold_conv(w, b, layer)
    np.testing.assert_allclose(_conv2d(x, wf, bf), layer(_conv2d(x, w, b)), rtol=1e-12, atol=1e-12)


def test_fold_conv_matches_torch(rng):
    torch = pytest.importorskip("torch")
    conv = torch.nn.Conv2d(3, 4, 3).double()
    tbn = torch.nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        tbn.running_mean.copy_(torch.randn(4, dtype=torch.float64))
        tbn.running_var.copy_(torch.rand(4, dtype=torch.float64) + 0.5)
        tbn.weight.copy_(torch.randn(4, dtype=torch.float64))
    layer = bn.import_state(tbn.state_dict(), "torch")
    wf, bf = bn.fold_conv(conv.weight.detach().numpy(), conv.bias.detach().numpy(), layer)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = tbn(conv(x)).numpy()
        got = torch.nn.functional.conv2d(x, torch.from_numpy(wf), torch.from_numpy(bf)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-12)


# ----------------------------------------------------------------------------- conversion
def test_translate_momentum():
    assert bn.translate_momentum(0.1, "torch", "keras") == pytest.approx(0.9)
    assert bn.translate_momentum(0.99, "keras", "torch") == pytest.approx(0.01)
    assert bn.translate_momentum(0.9, "seed", "flax") == pytest.approx(0.9)
    assert bn.translate_momentum(None, "torch", "keras") is None


def test_torch_round_trip_with_eps_absorbed(rng):
    torch = pytest.importorskip("torch")
    tbn = torch.nn.BatchNorm2d(3, eps=1e-3, momentum=0.2).double()
    for _ in range(3):
        tbn(torch.randn(4, 3, 5, 5, dtype=torch.float64) * 2 + 1)
    tbn.eval()
    layer = bn.BatchNorm(3, convention="seed", eps=1e-5)
    bn.import_state(tbn.state_dict(), "torch", layer=layer, eps=1e-3, momentum=0.2)
    assert layer.momentum == pytest.approx(0.8)  # old-value weight in the seed convention
    assert layer.num_batches_tracked == 3
    x = rng.standard_normal((2, 3, 5, 5))
    with torch.no_grad():
        ref = tbn(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(layer.eval()(x), ref, atol=1e-13)
    state, cfg = bn.export_state(layer, "torch", eps=1e-3)
    assert cfg == {"momentum": pytest.approx(0.2), "eps": 1e-3}
    tbn2 = torch.nn.BatchNorm2d(3, eps=1e-3).double().eval()
    tbn2.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    with torch.no_grad():
        np.testing.assert_allclose(tbn2(torch.from_numpy(x)).numpy(), ref, atol=1e-13)


def test_keras_and_flax_hand_values():
    state = {
        "gamma": np.array([2.0, 1.0]),
        "beta": np.array([0.5, 0.0]),
        "moving_mean": np.array([1.0, -1.0]),
        "moving_variance": np.array([4.0, 0.25]),
    }
    layer = bn.import_state(state, "keras")  # keras eps 1e-3 into a keras-convention layer
    assert layer.axis == -1 and layer.eps == 1e-3
    y = layer.eval()(np.array([[3.0, 0.0]]))
    np.testing.assert_allclose(
        y, [[2.0 * 2 / np.sqrt(4.001) + 0.5, 1 / np.sqrt(0.251)]], rtol=1e-14
    )
    # into a layer with eps 1e-5: variance absorbs the difference, outputs unchanged
    other = bn.import_state(state, "keras", layer=bn.BatchNorm(2, axis=-1, eps=1e-5))
    np.testing.assert_allclose(other.running_var, [4.00099, 0.25099], rtol=1e-14)
    np.testing.assert_allclose(other.eval()(np.array([[3.0, 0.0]])), y, rtol=1e-14)
    nested, cfg = bn.export_state(other, "flax")
    assert set(nested) == {"params", "batch_stats"} and cfg["eps"] == 1e-5
    np.testing.assert_allclose(nested["batch_stats"]["var"], other.running_var)
    back = bn.import_state(nested, "flax")
    np.testing.assert_allclose(back.running_mean, [1.0, -1.0])


def test_conversion_errors_change_nothing():
    layer = bn.BatchNorm(2)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"unknown keras batch-norm keys \['moving_var'\]"):
        bn.import_state(
            {"moving_mean": np.zeros(2), "moving_var": np.ones(2)}, "keras", layer=layer
        )
    with pytest.raises(ValueError, match=r"missing torch batch-norm keys \['running_var'\]"):
        bn.import_state({"running_mean": np.zeros(2)}, "torch", layer=layer)
    with pytest.raises(ValueError, match="would become negative"):
        bn.import_state(
            {"running_mean": np.zeros(2), "running_var": np.array([0.0, 1.0])},
            "torch",
            eps=0.0,
            layer=bn.BatchNorm(2, affine=False, eps=1e-3),
        )
    with pytest.raises(ValueError, match="framework must be one of"):
        bn.export_state(layer, "jax")
    assert snapshot(layer) == before


# ----------------------------------------------------------------------------- checkpoints
def test_safetensors_round_trip_and_rejections(rng, tmp_path):
    pytest.importorskip("safetensors")
    layer = bn.BatchNorm(3, convention="torch")
    layer(rng.standard_normal((6, 3)))
    path = tmp_path / "bn.safetensors"
    layer.save(path)
    other = bn.BatchNorm(3, convention="torch").load(path)
    assert snapshot(other)["running_var"] == snapshot(layer)["running_var"]
    assert other.num_batches_tracked == 1
    state, meta = checkpoint.load_safetensors(path)
    assert meta["batchnorm"]["convention"] == "torch"
    target = bn.BatchNorm(3)
    before = snapshot(target)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-7])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        target.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        target.load(tmp_path / "junk.safetensors")
    bad = dict(state, running_var=np.array([1.0, -2.0, 1.0]))
    meta = {"batchnorm": target.config()}  # a file without one is refused before its arrays
    checkpoint.save_safetensors(tmp_path / "neg.safetensors", bad, meta=meta)
    with pytest.raises(ValueError, match="negative"):
        target.load(tmp_path / "neg.safetensors")
    bn.BatchNorm(4).save(tmp_path / "four.safetensors")
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        target.load(tmp_path / "four.safetensors")
    assert snapshot(target) == before


# ----------------------------------------------------------------------------- diagnostics
def test_averaging_window():
    layer = bn.BatchNorm(2)  # seed: momentum 0.9 = old-value weight -> w = 0.1
    layer.num_batches_tracked = 10
    win = averaging_window(layer)
    assert win["new_value_weight"] == pytest.approx(0.1)
    assert win["effective_batches"] == pytest.approx(19.0)
    assert win["half_life_batches"] == pytest.approx(math.log(2) / -math.log(0.9))
    assert win["initial_value_weight"] == pytest.approx(0.9**10)
    torch_layer = bn.BatchNorm(2, convention="torch")  # momentum 0.1 = new-value weight
    assert averaging_window(torch_layer)["new_value_weight"] == pytest.approx(0.1)
    cum = bn.BatchNorm(2, momentum=None)
    cum.num_batches_tracked = 7
    assert averaging_window(cum)["effective_batches"] == 7


def test_train_eval_gap(rng):
    layer = bn.BatchNorm(2)
    layer.running_mean[:] = [0.0, 1.0]
    layer.running_var[:] = [4.0, 1.0]
    x = np.array([[1.0, 1.0], [3.0, 3.0]])  # mean (2, 2), var (1, 1)
    before = snapshot(layer)
    gap = train_eval_gap(layer, x)
    np.testing.assert_allclose(
        gap["mean_shift_in_std"], [2 / np.sqrt(4 + 1e-5), 1 / np.sqrt(1 + 1e-5)]
    )
    np.testing.assert_allclose(gap["var_ratio"], [0.25, 1.0])
    assert gap["max_log_var_ratio"] == pytest.approx(math.log(4))
    assert snapshot(layer) == before


def test_cli_inspect(rng, tmp_path, capsys):
    layer = bn.BatchNorm(3, convention="torch", momentum=None)
    for _ in range(4):
        layer(rng.standard_normal((10, 3)) + 1)
    layer.save(tmp_path / "bn.npz")
    np.save(tmp_path / "batch.npy", rng.standard_normal((10, 3)) + 5)
    assert layer_from_checkpoint(tmp_path / "bn.npz").num_batches_tracked == 4
    assert main(["inspect", str(tmp_path / "bn.npz"), "--batch", str(tmp_path / "batch.npy")]) == 0
    out = capsys.readouterr().out
    assert "convention='torch'" in out and "cumulative over 4 batches" in out
    assert "train/eval gap" in out
    assert main(["inspect", str(tmp_path / "bn.npz"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_batches_tracked"] == 4
    (tmp_path / "bad.npz").write_bytes(b"nope")
    assert main(["inspect", str(tmp_path / "bad.npz")]) == 2
    assert "not a readable npz" in capsys.readouterr().err


def test_import_refuses_a_fractional_batch_count():
    state = {
        "running_mean": np.zeros(2),
        "running_var": np.ones(2),
        "num_batches_tracked": np.array(2.5),
    }
    with pytest.raises(ValueError, match="non-negative integer"):
        bn.import_state(state, "torch", layer=bn.BatchNorm(2, affine=False))


def test_recalibrate_leaves_a_pending_backward_of_the_whole_model_intact(rng):
    model = Sequential(Linear(4, 3, rng=np.random.default_rng(0)), bn.BatchNorm(3), Sigmoid())
    x = rng.normal(size=(16, 4))
    dy = rng.normal(size=(16, 3))
    model.forward(x)
    twin_state = [m.save_forward_state() for m in model.modules]
    expected = model.backward(dy)
    dW = model.modules[0].gradients()["W"].copy()
    for m, st in zip(model.modules, twin_state, strict=True):
        m.restore_forward_state(st)
    bad = rng.normal(size=(16, 4))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError):
        bn.recalibrate(model, [bad])  # refused: nothing in the model changes
    np.testing.assert_array_equal(model.backward(dy), expected)
    np.testing.assert_array_equal(model.modules[0].gradients()["W"], dW)
    for m, st in zip(model.modules, twin_state, strict=True):
        m.restore_forward_state(st)
    bn.recalibrate(model, [rng.normal(size=(16, 4)) for _ in range(3)])  # succeeds
    np.testing.assert_array_equal(model.backward(dy), expected)  # the earlier forward's
