"""Scenario run by tests/test_jax_variants.py in a process with 4 forced host devices:
batchnorm.jax with axis_name under pmap and shard_map against one device on the
concatenated batch. Prints one OK line per check; exits non-zero on the first failure."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import batchnorm.jax as bnj


def close(a, b, tol, what):
    err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    assert err <= tol, f"{what}: max error {err:.3g} > {tol}"


def main() -> None:
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 6)) * 2 + 1e3, jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 6)), jnp.float32)
    g = jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32)
    b = jnp.asarray(rng.standard_normal(6), jnp.float32)
    rm, rv = jnp.zeros(6, jnp.float32), jnp.ones(6, jnp.float32)

    def loss(x, w, g, b, axis_name=None):
        y, new = bnj.batch_norm(x, g, b, rm, rv, training=True, axis_name=axis_name)
        return jnp.sum(y * w), (y, new)

    (_, (y1, (m1, v1))), (dx1, dg1, db1) = (
        loss(x, w, g, b),
        jax.grad(lambda *a: loss(*a)[0], argnums=(0, 2, 3))(x, w, g, b),
    )

    # pmap: the gradient taken inside, per device (dgamma: this device's share)
    def step(xx, ww, g, b):
        grads, (y, new) = jax.grad(
            lambda *a: loss(*a, axis_name="d"), argnums=(0, 2, 3), has_aux=True
        )(xx, ww, g, b)
        return grads, y, new

    pm = jax.pmap(step, axis_name="d", in_axes=(0, 0, None, None))
    (dx, dg, db), y, (m, v) = jax.device_get(pm(x.reshape(4, 16, 6), w.reshape(4, 16, 6), g, b))
    assert all((a == a[0]).all() for a in (m, v)), "statistics differ between devices"
    print("OK bit-identical statistics on 4 devices")
    close(y.reshape(64, 6), y1, 2e-5, "pmap y")
    close(m[0], m1, 1e-4, "pmap mean")
    close(v[0], v1, 1e-4, "pmap var")
    close(dx.reshape(64, 6), dx1, 2e-5, "pmap dx")
    close(dg.sum(0), dg1, 1e-3, "pmap dgamma")
    close(db.sum(0), db1, 1e-4, "pmap dbeta")
    local = jax.pmap(lambda xx: bnj.batch_norm(xx, g, b, rm, rv, training=True)[0])(
        x.reshape(4, 16, 6)
    )
    err = np.max(np.abs(np.asarray(local).reshape(64, 6) - np.asarray(y1)))
    assert err > 1e-2, f"negative control: per-device statistics agree with global ({err})"
    print("OK pmap")

    # shard_map: the gradient of the global loss taken outside; replicated gamma/beta and
    # replicated (invariant) running statistics out
    mesh = Mesh(jax.devices(), ("d",))

    def body(xx, ww, g, b):
        total, (y, new) = loss(xx, ww, g, b, axis_name="d")
        return total[None], y, new

    sm = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(P("d"), P("d"), P(), P()),
            out_specs=(P("d"), P("d"), (P(), P())),
        )
    )
    _, y, (m, v) = sm(x, w, g, b)
    close(y, y1, 2e-5, "shard_map y")
    close(m, m1, 1e-4, "shard_map mean")
    close(v, v1, 1e-4, "shard_map var")
    dx, dg, db = jax.grad(lambda x, g, b: jnp.sum(sm(x, w, g, b)[0]), argnums=(0, 1, 2))(x, g, b)
    close(dx, dx1, 2e-5, "shard_map dx")
    close(dg, dg1, 1e-3, "shard_map dgamma")
    close(db, db1, 1e-4, "shard_map dbeta")
    print("OK shard_map")


def _linen_check(cls, x, w, mesh):
    """One linen class with axis_name under shard_map against one device; returns the
    variables used and the one-device output."""
    one = cls(use_running_average=False)
    many = cls(use_running_average=False, axis_name="d")
    v = one.init(jax.random.key(0), x)
    v = {"params": {"scale": v["params"]["scale"] + 0.5, "bias": v["params"]["bias"] + 1},
         "batch_stats": v["batch_stats"]}  # fmt: skip

    def loss(params, x, w, model):
        y, upd = model.apply({**v, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y * w), (y, upd["batch_stats"])

    _, (y1, s1) = loss(v["params"], x, w, one)
    g1 = jax.grad(lambda p: loss(p, x, w, one)[0])(v["params"])

    def body(params, xx, ww):
        total, (y, s) = loss(params, xx, ww, many)
        return total[None], y, s

    specs = {"in_specs": (P(), P("d"), P("d")), "out_specs": (P("d"), P("d"), P())}
    sm = jax.jit(jax.shard_map(body, mesh=mesh, check_vma=False, **specs))
    _, y, s = sm(v["params"], x, w)
    g = jax.grad(lambda p: jnp.sum(sm(p, x, w)[0]))(v["params"])
    close(y, y1, 2e-5, f"{cls.__module__} shard_map y")
    close(s["mean"], s1["mean"], 1e-4, "shard_map running mean")
    close(s["var"], s1["var"], 1e-4, "shard_map running var")
    close(g["scale"], g1["scale"], 1e-3, "shard_map dscale")
    close(g["bias"], g1["bias"], 1e-3, "shard_map dbias")
    print(f"OK linen {cls.__module__}")
    return v, y1


def flax_main() -> None:
    """batchnorm.flax's BatchNorm with axis_name under shard_map (linen: outputs, merged
    running statistics and parameter gradients; nnx: outputs and statistics) against one
    device on the whole batch; Flax's own BatchNorm as the control."""
    import flax.linen as nn
    from flax import nnx

    from batchnorm.flax import linen as bfl
    from batchnorm.flax import nnx as bfx

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((64, 6)) * 2 + 3, jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 6)), jnp.float32)
    mesh = Mesh(jax.devices(), ("d",))
    _linen_check(nn.BatchNorm, x, w, mesh)
    v, y1 = _linen_check(bfl.BatchNorm, x, w, mesh)

    def per_device(xx):
        return bfl.BatchNorm(use_running_average=False).apply(v, xx, mutable=["batch_stats"])[0]

    local = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("d"), out_specs=P("d"),
                                  check_vma=False))(x)  # fmt: skip
    err = float(np.max(np.abs(np.asarray(local) - np.asarray(y1))))
    assert err > 1e-2, f"negative control: per-device statistics agree with global ({err})"

    bn1 = bfx.BatchNorm(6, rngs=nnx.Rngs(0))
    y1 = bn1(x)
    graphdef, state = nnx.split(bfx.BatchNorm(6, axis_name="d", rngs=nnx.Rngs(0)))

    def nbody(state, xx):
        model = nnx.merge(graphdef, state)
        return model(xx), nnx.state(model)

    specs = {"in_specs": (P(), P("d")), "out_specs": (P("d"), P())}
    y, new = jax.jit(jax.shard_map(nbody, mesh=mesh, check_vma=False, **specs))(state, x)
    close(y, y1, 2e-5, "nnx shard_map y")
    close(new["mean"][...], bn1.mean[...], 1e-4, "nnx shard_map running mean")
    print("OK nnx")


if __name__ == "__main__":
    import sys

    flax_main() if "flax" in sys.argv else main()
