"""
The train/eval gap of a small batch
===================================

In training mode a sample is normalized with its batch's mean and variance; in evaluation
mode with the population's (the running statistics). For a batch of :math:`m` samples the
batch mean misses the population mean by about :math:`\\sigma/\\sqrt{m}` and the batch
standard deviation misses by about :math:`\\sigma/\\sqrt{2m}`, so the two modes' outputs
differ by roughly :math:`\\sqrt{1.5/m}` for standardized data. Small batches pay for it.
"""

import matplotlib.pyplot as plt
import numpy as np

import batchnorm as bn
from batchnorm import diagnostics

rng = np.random.default_rng(0)
D = 64
layer = bn.BatchNorm(D, axis=-1, momentum=None)
for _ in range(200):  # running statistics of the population (mean 5, std 3)
    layer(rng.standard_normal((256, D)) * 3 + 5)

sizes = [2, 4, 8, 16, 32, 64, 128, 256]
gaps, shifts = [], []
for m in sizes:
    rms = []
    for _ in range(50):
        x = rng.standard_normal((m, D)) * 3 + 5
        y_train = bn.batch_norm_train(x, None, None, axis=-1)[0]
        y_eval = layer.eval()(x)
        rms.append(np.sqrt(np.mean((y_train - y_eval) ** 2)))
    gaps.append(np.mean(rms))
    shifts.append(diagnostics.train_eval_gap(layer, x)["max_abs_mean_shift_in_std"])
    print(
        f"batch of {m:>3}: rms |y_train - y_eval| = {gaps[-1]:.3f}, "
        f"max mean shift of the last batch {shifts[-1]:.2f} std"
    )

fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
ax.plot(sizes, gaps, "o-", label="measured")
ax.plot(sizes, np.sqrt(1.5 / np.array(sizes)), "--", label=r"$\sqrt{1.5/m}$")
ax.set(xscale="log", yscale="log", xlabel="batch size m", ylabel="rms train - eval output")
ax.legend()
plt.show()

# %%
# For :math:`m = 2` the approximation breaks down (the batch variance of two samples is far
# from normal), but the trend holds: halving the batch multiplies the gap by about 1.4.
# :func:`batchnorm.diagnostics.train_eval_gap` gives the per-feature statistics shift of a
# batch against a layer's running statistics.
