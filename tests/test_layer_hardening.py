"""The layers by composition (issue 22 item 4) and the classes of bad input of issue 25:
one state check at every door, the config registry's identity, save/load/inspect round
trips, validated attributes, every layer on every namespace. Each class has a case per
instance and a negative control showing the case fails without the fix."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import snapshot
from namespaces import Case, _namespace, namespace_param

import batchnorm as bn
from batchnorm import _statedict as statedict
from batchnorm import _xp, checkpoint, convert, fold, variants
from batchnorm.diagnostics import describe_checkpoint, layer_from_checkpoint
from batchnorm.layers import BatchStatsLayer, NormLayer, register_layer
from batchnorm.layers import args as layer_args
from batchnorm.layers import state as layer_state
from batchnorm_demo.cli import main

SRC = Path(bn.__file__).parent
LIBRARY = [bn.BatchNorm, bn.BatchRenorm, bn.GhostBatchNorm, bn.FrozenBatchNorm]
MAKERS = {
    "BatchNorm": lambda: bn.BatchNorm(3),
    "BatchRenorm": lambda: bn.BatchRenorm(3, rmax=2.0, dmax=1.0),
    "GhostBatchNorm": lambda: bn.GhostBatchNorm(3, virtual_batch_size=4),
    "FrozenBatchNorm": lambda: bn.FrozenBatchNorm(3),
}


def _trained(make, steps=2, shape=(10, 3)):
    layer = make()
    rng = np.random.default_rng(0)
    for _ in range(steps):
        layer(rng.normal(1.0, 2.0, shape))
    return layer


# ----------------------------------------------------------------------------- composition
def test_library_layers_are_siblings_not_subclasses_of_each_other():
    for a in LIBRARY:
        for b in LIBRARY:
            assert a is b or not issubclass(a, b), (a, b)
    assert not issubclass(bn.FrozenBatchNorm, BatchStatsLayer)
    assert all(issubclass(c, NormLayer) for c in LIBRARY)


def _writes_around_validation(text: str) -> list[str]:
    """Lines that write attributes around the layers' validation."""
    pattern = re.compile(r"object\.__setattr__|__dict__\[|= self\.__dict__$|def __setattr__")
    return [line for line in text.splitlines() if pattern.search(line)]


def test_no_setattr_hook_and_no_direct_dict_writes_in_the_layers():
    files = [*(SRC / "layers").glob("*.py"), SRC / "renorm.py", SRC / "variants.py"]
    found = {f.name: _writes_around_validation(f.read_text()) for f in files}
    assert not any(found.values()), found
    assert all(c.__setattr__ is object.__setattr__ for c in LIBRARY)
    # negative control: the checker sees the kind of line the old layers had
    assert _writes_around_validation('        d = self.__dict__\n        d["dgamma"] = 1')
    assert _writes_around_validation('object.__setattr__(self, "running_mean", m)')


@pytest.mark.parametrize("cls", LIBRARY, ids=lambda c: c.__name__)
def test_every_constructor_argument_is_kept_in_the_config_and_as_an_attribute(cls):
    layer = MAKERS[cls.__name__]()
    cfg = layer.config()
    params = set(inspect.signature(cls).parameters) - {"kwargs", "comm", "timeout", "reducer"}
    if cls is bn.GhostBatchNorm:  # takes BatchNorm's convention arguments by **kwargs
        params |= set(inspect.signature(bn.layers.ConventionLayer).parameters) - {
            "comm",
            "timeout",
            "reducer",
        }
    assert params - {"reuse_buffers"} <= set(cfg), params - set(cfg)
    for name in params - {"num_features"}:
        getattr(layer, name)  # each is also an attribute
    rebuilt = NormLayer.from_config(cfg)
    assert type(rebuilt) is cls and rebuilt.config() == cfg


def test_frozen_keeps_the_module_contract_of_its_own_base():
    frozen = bn.FrozenBatchNorm.from_batchnorm(_trained(MAKERS["BatchNorm"]))
    x = np.random.default_rng(1).normal(size=(6, 3))
    y_eval = frozen(x)
    before = frozen.state_dict()
    assert frozen.train() is frozen and frozen.training is True  # the mode is recorded
    np.testing.assert_array_equal(frozen(x), y_eval)  # ...and changes nothing it computes
    for key, value in frozen.state_dict().items():
        np.testing.assert_array_equal(value, before[key])
    assert frozen.last_batch_stats is None
    assert frozen.eval().training is False
    assert frozen.parameters() == {} and frozen.gradients() == {}
    assert not hasattr(frozen, "momentum") and not hasattr(frozen, "dgamma")
    with pytest.raises(TypeError, match="mode must be True or False"):
        frozen.train("yes")


# ----------------------------------------------------------------------------- attributes
BAD_ASSIGNMENTS = [
    ("reuse_buffers", "yes", TypeError),
    ("reuse_buffers", 1, TypeError),
    ("momentum", 2.0, ValueError),
    ("momentum", "0.1", TypeError),
    ("eps", -1.0, ValueError),
    ("eps", float("nan"), ValueError),
    ("unbiased", "False", TypeError),
    ("nonfinite", "ignore", ValueError),
    ("nonfinite", ["raise"], ValueError),
    ("backend", "cuda", ValueError),
    ("training", "no", TypeError),
    ("num_batches_tracked", -1, ValueError),
    ("num_batches_tracked", 1.5, TypeError),
    ("skipped_updates", True, TypeError),
    ("running_var", np.array([-1.0, 1.0, 1.0]), ValueError),
    ("running_mean", np.ma.array([0.0, 1.0, 2.0], mask=[0, 1, 0]), TypeError),
    ("gamma", np.array([1j, 1, 1]), TypeError),
    ("beta", np.zeros(4), ValueError),
    ("reducer", object(), TypeError),
    ("timeout", -1, ValueError),
    ("sync_position", -1, ValueError),
]
READ_ONLY = [
    "feature_shape",
    "axis",
    "dtype",
    "affine",
    "track_running_stats",
    "convention",
    "dgamma",
    "dbeta",
    "last_batch_stats",
    "gradients_reduced",
    "uses_batch_stats",
    "synchronizable",
    "place",
]


@pytest.mark.parametrize("name, value, error", BAD_ASSIGNMENTS, ids=lambda v: str(v)[:20])
def test_an_assigned_attribute_is_checked_like_the_constructor_argument(name, value, error):
    layer = _trained(lambda: bn.BatchNorm(3, reuse_buffers=False))
    before = snapshot(layer)
    with pytest.raises(error):
        setattr(layer, name, value)
    assert snapshot(layer) == before
    if name in {"reuse_buffers", "momentum", "eps", "unbiased", "nonfinite", "backend"}:
        with pytest.raises(error):  # the constructor refuses the same value the same way
            bn.BatchNorm(3, **{name: value})


@pytest.mark.parametrize("name", READ_ONLY)
def test_state_shaping_attributes_and_results_are_read_only(name):
    layer = _trained(MAKERS["BatchNorm"])
    before = snapshot(layer)
    with pytest.raises(AttributeError):
        setattr(layer, name, getattr(layer, name))
    assert snapshot(layer) == before


def test_a_valid_assignment_updates_the_config_the_layer_is_rebuilt_from():
    layer = bn.BatchNorm(3)
    layer.reuse_buffers = True
    layer.momentum = 0.5
    assert layer.config()["reuse_buffers"] is True and layer.config()["momentum"] == 0.5
    assert NormLayer.from_config(layer.config()).reuse_buffers is True
    renorm = bn.BatchRenorm(3, rmax=2.0, dmax=1.0)
    with pytest.raises(ValueError, match="rmax"):
        renorm.rmax = 0.5
    with pytest.raises(ValueError, match="eps > 0"):
        renorm.eps = 0.0
    ghost = bn.GhostBatchNorm(3, virtual_batch_size=4)
    with pytest.raises(TypeError):
        ghost.virtual_batch_size = 2.5
    # negative control: a plain attribute (what reuse_buffers used to be) takes anything
    plain = type("Plain", (), {})()
    plain.reuse_buffers = "yes"
    assert plain.reuse_buffers == "yes"


# ----------------------------------------------------------------------------- one state check
BAD_ARRAYS = {
    "masked": np.ma.array([0.5, 1.0, 2.0], mask=[0, 1, 0]),
    "complex": np.array([1.0, 2.0, 3.0 + 1j]),
    "object": np.array([1.0, None, 2.0], dtype=object),
    "string": np.array(["1.0", "2.0", "3.0"]),
    "bool": np.array([True, False, True]),
    "nan": np.array([1.0, np.nan, 1.0]),
    "inf": np.array([1.0, np.inf, 1.0]),
}


def _door_load_state_dict(bad):
    layer = _trained(MAKERS["BatchNorm"])
    state = layer.state_dict()
    state["running_var"] = bad
    return layer, lambda: layer.load_state_dict(state)


def _door_import_state(bad):
    layer = _trained(MAKERS["BatchNorm"])
    state = {"running_mean": np.zeros(3), "running_var": bad, "weight": np.ones(3)}
    state["bias"] = np.zeros(3)
    return layer, lambda: bn.import_state(state, "torch", layer=layer)


def _door_import_flax(bad):
    layer = _trained(lambda: bn.BatchNorm(3, convention="flax"))
    state = {"params": {"scale": bad, "bias": np.zeros(3)}}
    state["batch_stats"] = {"mean": np.zeros(3), "var": np.ones(3)}
    return layer, lambda: bn.import_state(state, "flax", layer=layer)


def _door_attribute(bad):
    layer = _trained(MAKERS["BatchNorm"])
    return layer, lambda: setattr(layer, "running_mean", bad)


def _door_from_statistics(bad):
    return None, lambda: bn.FrozenBatchNorm.from_statistics(np.zeros(3), bad)


def _door_fold(bad):
    layer = _trained(MAKERS["BatchNorm"])
    weight = np.stack([bad, bad])  # (in=2, out=3)
    return layer, lambda: bn.fold_linear(weight, None, layer)


def _door_file(bad, tmp_path):
    """A file can hold only numeric arrays; the bool and non-finite ones reach the check."""
    layer = _trained(MAKERS["BatchNorm"])
    state = dict(layer.state_dict())
    state["running_var"] = bad
    path = tmp_path / "bad.npz"
    checkpoint.save_npz(path, state, meta={"batchnorm": layer.config()})
    return layer, lambda: layer.load(path)


DOORS = {
    "load_state_dict": _door_load_state_dict,
    "import_state": _door_import_state,
    "import_state_flax": _door_import_flax,
    "attribute": _door_attribute,
    "from_statistics": _door_from_statistics,
    "fold": _door_fold,
}


@pytest.mark.parametrize("kind", list(BAD_ARRAYS))
@pytest.mark.parametrize("door", list(DOORS))
def test_every_door_refuses_bad_state_arrays_the_same_way(door, kind):
    bad = BAD_ARRAYS[kind]
    if door == "fold" and kind in ("bool",):
        pass  # weights may be integers, never bools
    layer, call = DOORS[door](bad)
    before = None if layer is None else snapshot(layer)
    error = ValueError if kind in ("nan", "inf") else TypeError
    expected = {
        "masked": "masked array",
        "nan": "non-finite",
        "inf": "non-finite",
    }.get(kind, "must be a real")
    with pytest.raises(error, match=expected):
        call()
    if layer is not None:
        assert snapshot(layer) == before


@pytest.mark.parametrize("kind", ["bool", "nan", "inf"])
def test_a_checkpoint_file_goes_through_the_same_check(kind, tmp_path):
    layer, call = _door_file(BAD_ARRAYS[kind], tmp_path)
    before = snapshot(layer)
    with pytest.raises(ValueError if kind != "bool" else TypeError):
        call()
    assert snapshot(layer) == before


def _permissive(value, name, *, kinds="f", finite=True):
    return np.asarray(value)


@pytest.mark.parametrize(
    "module, door",
    [(convert, "import_state"), (variants, "from_statistics"), (fold, "fold")],
)
def test_negative_control_without_the_shared_check_a_door_lets_a_masked_array_in(
    module, door, monkeypatch
):
    """With the check replaced by a bare ``np.asarray`` in the door's module (and in the
    state-dict check behind it), the masked array of issue 25 gets in: the refusal above
    is the shared check's doing."""
    monkeypatch.setattr(module, "check_state_array", _permissive)
    monkeypatch.setattr(statedict, "check_state_array", _permissive)
    _, call = DOORS[door](BAD_ARRAYS["masked"])
    call()  # accepted: the mask is silently dropped


def test_the_shared_check_is_exported_for_the_adapters():
    assert checkpoint.check_state_array is bn._validation.check_state_array
    out = checkpoint.check_state_array(np.arange(3), "w", kinds="fiu")
    assert out.dtype.kind == "i"
    with pytest.raises(TypeError, match="'count' must be a real numeric"):
        checkpoint.check_state_array(np.array([True]), "'count'", kinds="iu")


# ----------------------------------------------------------------------------- identity
def test_a_users_class_named_like_a_library_class_changes_nothing():
    class BatchNorm(bn.BatchNorm):  # a user's own class, same short name
        pass

    built = NormLayer.from_config(bn.BatchNorm(3).config())
    assert type(built) is bn.BatchNorm  # the library's class, not the user's
    assert layer_args.layer_class("BatchNorm") is bn.BatchNorm
    cfg = BatchNorm(3).config()
    assert cfg["class"].endswith(
        "test_a_users_class_named_like_a_library_class_changes_nothing.<locals>.BatchNorm"
    )
    with pytest.raises(ValueError, match="unknown layer class"):
        NormLayer.from_config(cfg)  # never registered: never built from a config
    with pytest.raises(ValueError, match="unknown layer class"):
        NormLayer.from_config({**bn.BatchNorm(3).config(), "class": "Sigmoid"})


def test_a_registered_user_class_builds_under_its_qualified_name_only():
    @register_layer
    class MyNorm(bn.BatchNorm):
        pass

    cfg = MyNorm(3).config()
    assert type(NormLayer.from_config(cfg)) is MyNorm
    with pytest.raises(ValueError, match="unknown layer class"):
        NormLayer.from_config({**cfg, "class": "MyNorm"})  # the short name is the library's
    with pytest.raises(ValueError, match="not a batchnorm library class|is not a class"):
        layer_args.library_layer(MyNorm)


# ----------------------------------------------------------------------------- round trips
ROUND_TRIPS = {
    "BatchNorm": lambda: bn.BatchNorm(3),
    "torch": lambda: bn.BatchNorm(3, convention="torch", reuse_buffers=True),
    "custom convention": lambda: bn.BatchNorm(
        3, convention=bn.Convention("mine", "new", 0.2, 1e-4, True, 1)
    ),
    "no affine": lambda: bn.BatchNorm(3, affine=False),
    "no running stats": lambda: bn.BatchNorm(3, track_running_stats=False),
    "float16": lambda: bn.BatchNorm(3, dtype="float16"),
    "cumulative": lambda: bn.BatchNorm(3, momentum=None),
    "Ghost": MAKERS["GhostBatchNorm"],
    "Renorm": MAKERS["BatchRenorm"],
    "Renorm schedule": lambda: bn.BatchRenorm(3, schedule=bn.RenormSchedule(1, 2.0, 5, 1.0, 5)),
    "Frozen": lambda: bn.FrozenBatchNorm.from_batchnorm(_trained(MAKERS["BatchNorm"])),
}


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_whatever_save_writes_load_and_inspect_read(name, suffix, tmp_path, capsys):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    layer = ROUND_TRIPS[name]()
    if layer.uses_batch_stats:
        layer = _trained(lambda: layer)
    path = tmp_path / f"layer{suffix}"
    layer.save(path)
    rebuilt = layer_from_checkpoint(path)
    assert type(rebuilt) is type(layer) and rebuilt.config() == layer.config()
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(rebuilt.state_dict()[key], value)
    type(layer).from_config(layer.config()).load(path)
    assert describe_checkpoint(path)["config"] == layer.config()
    assert main(["inspect", str(path)]) == 0
    assert main(["inspect", "--json", str(path)]) == 0
    assert str(path) in capsys.readouterr().out


def test_a_custom_schedule_is_refused_before_anything_is_written(tmp_path):
    layer = _trained(lambda: bn.BatchRenorm(3, schedule=lambda step: (2.0, 1.0)))
    path = tmp_path / "renorm.npz"
    with pytest.raises(ValueError, match="custom callable.*nothing was written"):
        layer.save(path)
    assert list(tmp_path.iterdir()) == []  # no file, no temporary


def test_negative_control_a_custom_schedule_written_anyway_is_unreadable(tmp_path, monkeypatch):
    """Without the refusal, save writes a file that load and inspect cannot read (the
    instance of issue 25)."""
    layer = _trained(lambda: bn.BatchRenorm(3, schedule=lambda step: (2.0, 1.0)))
    path = tmp_path / "renorm.npz"
    monkeypatch.setattr(layer_state, "check_savable", lambda layer, path: layer.config())
    layer.save(path)
    with pytest.raises(ValueError, match="schedule"):
        layer_from_checkpoint(path)
    assert main(["inspect", str(path)]) == 2


def test_an_unregistered_user_class_is_refused_before_writing(tmp_path):
    class Mine(bn.BatchNorm):
        pass

    with pytest.raises(ValueError, match="register_layer.*nothing was written"):
        Mine(3).save(tmp_path / "mine.npz")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- namespaces
NAMESPACES = ["numpy", "strict", "strict-device1", "strict-no_float64", "torch", "jax-x64"]


@pytest.fixture(params=[namespace_param(n) for n in NAMESPACES])
def case(request):
    with _namespace(request.param) as (xp, device):
        dt = "float64" if _xp.stats_dtype(xp, device) == xp.float64 else "float32"
        yield Case(request.param, xp, device, dt)


@pytest.mark.parametrize("name", list(MAKERS))
def test_every_layer_runs_on_every_namespace_like_on_numpy(name, case):
    dtype = np.float32 if case.dtype_name == "float32" else np.float64
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, (10, 3, 4))
    dy = rng.normal(size=x.shape)
    layer, ref = MAKERS[name](), MAKERS[name]()
    if name == "FrozenBatchNorm":
        stats = (rng.normal(size=3), rng.uniform(0.5, 2, 3), rng.normal(size=3), rng.normal(size=3))
        layer = bn.FrozenBatchNorm.from_statistics(*stats)  # loaded: moved explicitly
        layer.to(case.arr(x))
        ref = bn.FrozenBatchNorm.from_statistics(*stats)
    xa, dya = case.arr(x), case.arr(dy)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for training in (True, False):
        y = layer.forward(xa, training=training)
        assert _xp.namespace(y).__name__ == case.xp.__name__
        case.close(y, ref.forward(case.np(xa), training=training), tol=tol, what=f"{name} y")
        dx = layer.backward(dya)
        case.close(dx, ref.backward(case.np(dya)), tol=tol, what=f"{name} dx")
    for key, value in ref.state_dict().items():
        np.testing.assert_allclose(layer.state_dict()[key], value, rtol=tol, atol=tol)


def test_negative_control_a_partial_index_is_refused_by_array_api_strict():
    """What GhostBatchNorm did before (``x[sl]`` on an N-d array): array-api-strict refuses
    it, so the test above fails on the old slicing; ``x[sl, ...]`` is the portable form."""
    strict = pytest.importorskip("array_api_strict")
    xa = strict.asarray(np.zeros((4, 3, 2)))
    with pytest.raises(IndexError):
        xa[0:2]
    assert xa[0:2, ...].shape == (2, 3, 2)


def test_a_frozen_layer_exports_statistics_that_never_move_and_takes_no_momentum():
    frozen = bn.FrozenBatchNorm.from_batchnorm(_trained(MAKERS["BatchNorm"]))
    assert bn.export_state(frozen, "torch")[1]["momentum"] == 0.0  # weight of the new value
    assert bn.export_state(frozen, "keras")[1]["momentum"] == 1.0  # weight of the old value
    state, _ = bn.export_state(frozen, "torch")
    before = snapshot(frozen)
    with pytest.raises(ValueError, match="no momentum"):
        bn.import_state(state, "torch", layer=frozen, momentum=0.1)
    assert snapshot(frozen) == before
    assert bn.import_state(state, "torch", layer=frozen) is frozen


def test_load_refuses_a_file_whose_configuration_contradicts_its_arrays(tmp_path):
    layer = _trained(MAKERS["BatchNorm"])
    path = tmp_path / "lies.npz"
    meta = {"batchnorm": {**layer.config(), "num_features": [4]}}
    checkpoint.save_npz(path, layer.state_dict(), meta=meta)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"declares \(4,\)"):
        layer.load(path)
    assert snapshot(layer) == before
    # control: the same arrays with a truthful configuration load
    checkpoint.save_npz(path, layer.state_dict(), meta={"batchnorm": layer.config()})
    layer.load(path)


def test_threads_training_one_layer_while_another_thread_assigns_attributes():
    """Attribute assignments (valid and refused) from one thread never disturb training
    forwards from four others: every update counted, the result the sequential one."""
    import threading

    x = np.random.default_rng(5).normal(3.0, 2.0, (32, 4))
    layer, ref = bn.BatchNorm(4, momentum=0.5), bn.BatchNorm(4, momentum=0.5)
    for _ in range(200):
        ref(x)
    errors = []

    def train():
        try:
            for _ in range(50):
                layer(x)
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(exc)

    def meddle():
        for _ in range(200):
            layer.momentum, layer.eps, layer.reuse_buffers = 0.5, 1e-5, False
            for name, bad in (("momentum", "0.5"), ("reuse_buffers", "yes"), ("eps", -1.0)):
                try:
                    setattr(layer, name, bad)
                except (TypeError, ValueError):
                    pass
                else:
                    errors.append(f"{name}={bad!r} accepted")

    threads = [threading.Thread(target=train) for _ in range(4)]
    threads.append(threading.Thread(target=meddle))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert layer.num_batches_tracked == 200
    np.testing.assert_array_equal(layer.running_mean, ref.running_mean)
    np.testing.assert_array_equal(layer.running_var, ref.running_var)
