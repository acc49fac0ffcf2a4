"""
Numerics far from zero
======================

float32 data with standard deviation 1 and a growing offset :math:`\\mu`. The one-pass
variance :math:`E[x^2] - E[x]^2` loses everything once :math:`\\mu^2` dwarfs the variance;
the library's shifted two-pass, accumulated in float64, stays at the rounding of ``y``. The
reference is float64 arithmetic on the same float32 values. PyTorch's CPU kernel is shown
when PyTorch is installed.
"""

import matplotlib.pyplot as plt
import numpy as np

import batchnorm as bn

try:
    import torch
except ImportError:
    torch = None

rng = np.random.default_rng(0)
offsets = 10.0 ** np.arange(0, 8)
noise = rng.standard_normal((2048, 16))
eps = 1e-5
curves = {"E[x^2]-E[x]^2, float32": [], "E[x^2]-E[x]^2, float64": [], "batchnorm, float32": []}
if torch is not None:
    curves["torch batch_norm, float32"] = []

for mu in offsets:
    x32 = (noise + mu).astype(np.float32)
    x64 = x32.astype(np.float64)
    y_ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + eps)
    with np.errstate(invalid="ignore", divide="ignore"):
        for dtype in (np.float32, np.float64):
            x = x32.astype(dtype)
            var = (x * x).mean(0) - x.mean(0) ** 2
            y = (x - x.mean(0)) / np.sqrt(np.maximum(var, 0) + dtype(eps))
            curves[f"E[x^2]-E[x]^2, {np.dtype(dtype).name}"].append(np.nanmax(np.abs(y - y_ref)))
    y_lib, _ = bn.batch_norm_train(x32, None, None)
    curves["batchnorm, float32"].append(np.max(np.abs(y_lib - y_ref)))
    if torch is not None:
        xt = torch.from_numpy(x32)
        yt = torch.nn.functional.batch_norm(xt, None, None, training=True, eps=eps)
        curves["torch batch_norm, float32"].append(np.max(np.abs(yt.numpy() - y_ref)))

short = ["naive f32", "naive f64", "batchnorm", "torch"][: len(curves)]
print("offset " + "".join(f"{name:>12}" for name in short))
for i, mu in enumerate(offsets):
    print(f"{mu:6.0e} " + "".join(f"{curves[n][i]:12.2e}" for n in curves))

fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
for name, err in curves.items():
    ax.plot(offsets, np.maximum(err, 1e-16), "o-", label=name)
ax.set(xscale="log", yscale="log", xlabel="offset (mean of the data)", ylabel="max |y - y_ref|")
fig.legend(loc="outside lower center", ncols=2, fontsize=8)
plt.show()

# %%
# Clipping the naive variance at 0 (as above) is the usual patch; it prevents the NaNs
# but not the error. The float32 rounding of an output of size 4 is about
# :math:`2 \times 10^{-7}`: the library's curve stays there at every offset.
