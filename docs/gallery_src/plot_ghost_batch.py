"""
Ghost batch size against the train/eval gap
===========================================

:class:`batchnorm.GhostBatchNorm` (Hoffer et al. 2017) normalizes each group of
``virtual_batch_size`` consecutive samples with that group's statistics, inside a larger
batch. Its evaluation mode uses running statistics like plain batch norm, so the smaller
the virtual batch, the further the training-mode outputs are from the evaluation-mode
ones: the noise that is said to regularize.
"""

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

import batchnorm as bn

rng = np.random.default_rng(0)
D, batch = 32, 60
sizes = [2, 3, 4, 6, 10, 15, 20, 30, 60]
gaps = []
for v in sizes:
    layer = bn.GhostBatchNorm(D, virtual_batch_size=v, axis=-1, momentum=None)
    for _ in range(100):  # running statistics of the population
        layer(rng.standard_normal((batch, D)) * 2 + 1)
    x = rng.standard_normal((batch, D)) * 2 + 1
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    gaps.append(np.sqrt(np.mean((y_train - y_eval) ** 2)))
    print(f"virtual batch {v:>2}: rms |y_train - y_eval| = {gaps[-1]:.3f}")

fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
ax.plot(sizes, gaps, "o-")
ax.set(
    xscale="log",
    yscale="log",
    xlabel="virtual batch size (batch of 60)",
    ylabel="rms train - eval output",
)
ax.set_xticks(sizes, [str(s) for s in sizes])
ax.xaxis.set_minor_formatter(NullFormatter())
plt.show()

# %%
# The demo's ghost-batch experiment (:doc:`/evidence`) measures the same gap in test
# accuracy on MNIST, for a trained network: it grows as the virtual batch shrinks.
