"""
Recalibration fixes stale running statistics
============================================

Running statistics are averages over training batches computed with *changing* weights,
so they can describe a network that no longer exists. Here the Linear layer before a
BatchNorm is changed after the statistics were collected (as a late, large learning-rate
step would), and the evaluation-mode outputs go wrong. :func:`batchnorm.recalibrate`
streams batches through the network and replaces the running statistics by the exact
population statistics of the current weights ("precise BN").
"""

import matplotlib.pyplot as plt
import numpy as np

import batchnorm as bn
from batchnorm.nn import Linear, Sequential, Sigmoid

rng = np.random.default_rng(0)
model = Sequential(Linear(20, 32, rng=rng, bias=False), bn.BatchNorm(32), Sigmoid())
data = rng.standard_normal((2000, 20))
for i in range(0, 2000, 50):  # training-mode passes fill the running statistics
    model(data[i : i + 50])

model.modules[0].W *= 1.8  # the weights move on; the running statistics do not
model.modules[0].W += 0.3


def eval_error():
    """Eval-mode output against the full-data training-mode output (the population's)."""
    model.eval()
    y_eval = model(data)
    model.train()
    norm = model.modules[1]
    saved = norm.state_dict()
    y_pop = model(data)  # one batch of all the data: population statistics
    norm.load_state_dict(saved)
    return np.max(np.abs(y_eval - y_pop))


stale = model.modules[1].running_var.copy()
before = eval_error()
report = bn.recalibrate(model, (data[i : i + 100] for i in range(0, 2000, 100)))
after = eval_error()
true_var = (data @ model.modules[0].W).var(axis=0)
print(f"max |eval - population| output: stale {before:.3f}, recalibrated {after:.2e}")
print("recalibration report of the layer:", report[0])

fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
ax.plot(true_var, stale, "o", label=f"stale (max output error {before:.2f})")
ax.plot(true_var, model.modules[1].running_var, "x", label=f"recalibrated ({after:.1e})")
lim = [0, true_var.max() * 1.05]
ax.plot(lim, lim, "k:", lw=1)
ax.set(xlabel="population variance of the BN input", ylabel="running variance")
ax.legend()
plt.show()
