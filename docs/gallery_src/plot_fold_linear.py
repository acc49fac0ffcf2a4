"""
Folding batch norm into a Linear layer
======================================

In evaluation mode batch norm is a fixed affine map per feature,
:math:`y = \\gamma (z - \\hat\\mu)/\\sqrt{\\hat\\sigma^2 + \\epsilon} + \\beta`, so it can be
merged into the Linear layer before it: :math:`W' = W \\cdot s`, :math:`b' = (b - \\hat\\mu)
s + \\beta` with :math:`s = \\gamma / \\sqrt{\\hat\\sigma^2 + \\epsilon}` per output column.
:func:`batchnorm.fold_linear` does this (and :func:`batchnorm.fold_conv` for convolutions);
the folded network computes the same function with one layer less.
"""

import matplotlib.pyplot as plt
import numpy as np

import batchnorm as bn
from batchnorm.nn import Linear

rng = np.random.default_rng(0)
linear = Linear(16, 8, rng=rng)
norm = bn.BatchNorm(8, axis=-1)
norm.gamma[:], norm.beta[:] = rng.uniform(0.5, 2, 8), rng.uniform(-1, 1, 8)
for _ in range(50):  # running statistics of the Linear layer's outputs
    norm(linear(rng.standard_normal((64, 16)) * 2 + 1))

W_folded, b_folded = bn.fold_linear(linear.W, linear.b, norm.eval())
x = rng.standard_normal((1000, 16)) * 2 + 1
y_two_layers = norm(linear(x))
y_folded = x @ W_folded + b_folded
err = np.abs(y_two_layers - y_folded)
print(f"max |Linear+BN - folded Linear| = {err.max():.2e} over {x.shape[0]} samples")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
ax1.plot(y_two_layers.ravel(), y_folded.ravel(), ".", ms=2)
ax1.set(xlabel="Linear then BatchNorm (eval)", ylabel="folded Linear")
exact = int(np.sum(err == 0))
ax2.hist(np.log10(err[err > 0]), bins=30)
ax2.set(
    xlabel="log10 |difference|",
    ylabel="outputs",
    title=f"{exact} of {err.size} outputs identical; the rest:",
)
plt.show()

# %%
# The differences are float64 rounding. Folding needs the layer in evaluation mode (the
# batch statistics of training mode are not a fixed map) and refuses a layer without
# running statistics with a clear error.
