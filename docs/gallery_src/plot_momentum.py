"""
Running statistics under each momentum convention
=================================================

The same stream of batches (true mean 3, true variance 4) feeds one layer per convention.
``"seed"`` reads ``momentum=0.9`` as the weight of the old running value, ``"torch"`` reads
``0.1`` as the weight of the new batch (the same smoothing), ``"keras"`` and ``"flax"`` use
0.99 on the old value (100-batch memory), and ``momentum=None`` is a true cumulative
average. All start from mean 0 and variance 1.
"""

import matplotlib.pyplot as plt
import numpy as np

import batchnorm as bn
from batchnorm import diagnostics

rng = np.random.default_rng(0)
D, steps = 16, 400
layers = {
    "seed (0.9 old)": bn.BatchNorm(D, axis=-1),
    "torch (0.1 new)": bn.BatchNorm(D, convention="torch", axis=-1),
    "keras/flax (0.99 old)": bn.BatchNorm(D, convention="flax"),
    "cumulative (None)": bn.BatchNorm(D, axis=-1, momentum=None),
}
errors = {name: [] for name in layers}
for _ in range(steps):
    x = rng.standard_normal((32, D)) * 2 + 3
    for name, layer in layers.items():
        layer(x)
        errors[name].append(np.mean(np.abs(layer.running_mean - 3.0)))

for name, layer in layers.items():
    window = diagnostics.averaging_window(layer)["effective_batches"]
    print(
        f"{name:<22} mean |running mean - 3| at the end: {errors[name][-1]:.3f}, "
        f"effective window {window:.0f} batches"
    )

fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
styles = {"torch (0.1 new)": dict(ls="--", lw=2.5, alpha=0.7)}
for name, err in errors.items():
    ax.plot(np.arange(1, steps + 1), err, label=name, **styles.get(name, {}))
ax.set(xscale="log", yscale="log", xlabel="training batches", ylabel="mean |running mean - 3|")
ax.legend()
plt.show()

# %%
# Seed and torch lie on top of each other: 0.9 on the old value *is* 0.1 on the new one
# (:func:`batchnorm.translate_momentum` converts). The 0.99 presets average over about 200
# batches, so they fluctuate less once settled, but they forget slowly: after 400 batches
# the starting value 0 still weighs :math:`0.99^{400} \approx 0.018`, an error of about
# 0.05 on a mean of 3, the end of their curve. The cumulative average keeps improving as
# :math:`1/\sqrt{t}`.
