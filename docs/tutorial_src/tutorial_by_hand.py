"""
Batch norm by hand
==================

The short article this library grew out of implements batch normalization with two NumPy
functions. It skips the backward pass and forgets ``eps`` at test time, and it does not say
how the variance must be computed for data far from zero, where the one-pass formula that
fast implementations like breaks down. This page is the tutorial it meant to be: every
step is a cell that runs when the documentation is built, and every claim is checked
against the library (``import batchnorm as bn``) by the code next to it.

We use a batch of ``N`` samples with ``D`` features, ``x`` of shape ``(N, D)``; for images
``(N, C, H, W)`` the same equations hold per channel, with the statistics taken over
``N * H * W`` values.
"""

import numpy as np

import batchnorm as bn
from batchnorm.gradcheck import numerical_gradient, relative_error

rng = np.random.default_rng(0)
N, D = 32, 4
x = rng.standard_normal((N, D)) * 3 + 5  # float64, mean 5, std 3 per feature
gamma = rng.uniform(0.5, 2.0, D)  # learned scale, one per feature
beta = rng.uniform(-1.0, 1.0, D)  # learned shift
eps = 1e-5

# %%
# 1. The forward pass in training mode
# ------------------------------------
#
# For each feature :math:`j`, over the :math:`m` values of the batch (Ioffe & Szegedy 2015,
# algorithm 1):
#
# .. math::
#
#    \mu_j = \frac{1}{m}\sum_{i=1}^m x_{ij}, \qquad
#    \sigma_j^2 = \frac{1}{m}\sum_{i=1}^m (x_{ij} - \mu_j)^2, \qquad
#    \hat x_{ij} = \frac{x_{ij} - \mu_j}{\sqrt{\sigma_j^2 + \epsilon}}, \qquad
#    y_{ij} = \gamma_j \hat x_{ij} + \beta_j .
#
# The variance is the *biased* one (divided by :math:`m`, not :math:`m - 1`): it is the
# variance of the numbers actually normalized. ``eps`` keeps the division finite for a
# feature that is constant in the batch.


def forward_by_hand(x, gamma, beta, eps):
    """The four equations above, written out in float64."""
    mean = x.mean(axis=0)
    var = ((x - mean) ** 2).mean(axis=0)  # centre first, then square (see section 5)
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mean) * inv_std
    return gamma * x_hat + beta, (x_hat, inv_std)


y_hand, (x_hat, inv_std) = forward_by_hand(x, gamma, beta, eps)
y_lib, cache = bn.batch_norm_train(x, gamma, beta, axis=1, eps=eps)
print("max |y_hand - y_lib|      :", np.max(np.abs(y_hand - y_lib)))
print("per-feature mean of x_hat :", np.round(x_hat.mean(axis=0), 12))
print("per-feature std of x_hat  :", np.round(x_hat.std(axis=0), 6))
print("cache holds mean and var  :", np.allclose(cache.mean, x.mean(0)), cache.var.shape)

# %%
# ``x_hat`` has mean 0 and standard deviation just below 1 (``eps`` shrinks it slightly);
# ``gamma`` and ``beta`` then give the network back any scale and shift it needs, so the
# layer can represent the identity.
#
# 2. Running averages, and what "momentum" means in each framework
# -----------------------------------------------------------------
#
# At test time there is no batch to take statistics from (or it would make a sample's output
# depend on the others in its batch), so training also keeps *running* estimates of the mean
# and variance. Every framework smooths them the same way,
#
# .. math::
#
#    r \leftarrow (1 - w)\, r + w\, b ,
#
# with :math:`b` the batch statistic, but they name :math:`w` differently. In PyTorch
# ``momentum`` is :math:`w`, the weight of the **new** batch (default 0.1); in Keras, Flax and
# the seed article it is :math:`1 - w`, the weight of the **old** running value (0.9 in the
# article, 0.99 in Keras and Flax). PyTorch also feeds the running variance the *unbiased*
# batch variance :math:`\frac{m}{m-1}\sigma^2`. The library states this once, in
# :mod:`batchnorm.conventions`:

print("preset  momentum  weighs  eps     unbiased  axis")
for name in ("seed", "torch", "keras", "flax"):
    c = bn.get_convention(name)
    print(
        f"{name:<7} {c.momentum:<9} {c.momentum_weights:<7} {c.eps:<7g} {c.unbiased!s:<9} {c.axis}"
    )

# %%
# The same smoothing, written once by hand and once with the library's single update
# function, for PyTorch's convention (momentum 0.1 weighs the new batch):

running_mean, running_var = np.zeros(D), np.ones(D)  # every framework starts here
m = x.shape[0]
w = 0.1
mean_b, var_b = x.mean(axis=0), x.var(axis=0)
by_hand = ((1 - w) * running_mean + w * mean_b, (1 - w) * running_var + w * var_b * m / (m - 1))

new = bn.update_running(
    bn.RunningStats(running_mean, running_var, num_batches_tracked=0),
    bn.BatchStats(m, mean_b, var_b),
    momentum=0.1,
    momentum_weights="new",
    unbiased=True,
)
print("mean agrees:", np.allclose(new.mean, by_hand[0]))
print("var agrees: ", np.allclose(new.var, by_hand[1]))
print("PyTorch's 0.1 is the seed convention's", bn.translate_momentum(0.1, "torch", "seed"))

# %%
# After :math:`t` steps the starting value still carries the weight :math:`(1 - w)^t`: with
# :math:`w = 0.01` (Keras' 0.99) that is 0.37 after 100 steps, which is why a network
# evaluated early in training can look much worse in evaluation mode than in training mode.
# The gallery example :doc:`/gallery/plot_momentum` shows the three conventions converging.
#
# 3. Evaluation mode, with eps
# ----------------------------
#
# In evaluation mode the layer is a fixed affine map of each feature, with the running
# statistics in place of the batch ones:
#
# .. math::
#
#    y = \gamma \frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}} + \beta .
#
# The article left ``eps`` out here. A feature that was constant throughout training
# (a dead unit, a padding channel) ends with running variance 0 (exactly so with
# ``momentum=None``, the cumulative average; nearly so with any momentum after enough steps),
# and without eps its output becomes 0/0:

layer = bn.BatchNorm(D, momentum=None)
x_dead = x.copy()
x_dead[:, 0] = 2.0  # feature 0 never varies
for _ in range(10):
    layer(x_dead)  # training mode: updates the running statistics
layer.eval()
print("running var of feature 0:", layer.running_var[0])
with np.errstate(divide="ignore", invalid="ignore"):
    article = gamma * (x_dead - layer.running_mean) / np.sqrt(layer.running_var) + beta
print("article (no eps), feature 0 :", article[:3, 0])
layer.gamma[:], layer.beta[:] = gamma, beta
print("library (eps),    feature 0 :", layer(x_dead)[:3, 0])

# %%
# 4. The backward pass, derived step by step
# ------------------------------------------
#
# Let :math:`L` be the loss and :math:`\delta_{ij} = \partial L / \partial y_{ij}` the
# upstream gradient. The parameters are easy:
#
# .. math::
#
#    \frac{\partial L}{\partial \gamma_j} = \sum_i \delta_{ij} \hat x_{ij}, \qquad
#    \frac{\partial L}{\partial \beta_j} = \sum_i \delta_{ij} .
#
# For :math:`x` we must remember that :math:`\mu` and :math:`\sigma^2` depend on every
# :math:`x_{ij}` of the feature. Write :math:`g_{ij} = \gamma_j \delta_{ij}` for the gradient
# reaching :math:`\hat x`, and :math:`s = (\sigma^2 + \epsilon)^{-1/2}` (one feature; drop
# the :math:`j`). Then :math:`\hat x_i = (x_i - \mu) s`, and
#
# .. math::
#
#    \frac{\partial \hat x_i}{\partial x_k}
#    = s\Big(\mathbb{1}[i = k] - \frac{1}{m}\Big)
#      - \frac{(x_i - \mu)\, s^3}{2} \frac{\partial \sigma^2}{\partial x_k},
#    \qquad
#    \frac{\partial \sigma^2}{\partial x_k} = \frac{2}{m}(x_k - \mu)
#
# (the term of :math:`\partial\sigma^2/\partial x_k` through :math:`\mu` vanishes because
# :math:`\sum_i (x_i - \mu) = 0`). So :math:`\partial \hat x_i / \partial x_k
# = \frac{s}{m}\big(m\,\mathbb{1}[i=k] - 1 - \hat x_i \hat x_k\big)`, and summing
# :math:`g_i\, \partial \hat x_i / \partial x_k` over :math:`i`:
#
# .. math::
#
#    \frac{\partial L}{\partial x_k}
#    = \frac{s}{m}\Big(m\, g_k - \sum_i g_i - \hat x_k \sum_i g_i \hat x_i\Big)
#    = \frac{\gamma\, s}{m}\Big(m\, \delta_k
#      - \frac{\partial L}{\partial \beta} - \hat x_k \frac{\partial L}{\partial \gamma}\Big).
#
# Two sums per feature, then one elementwise pass: that is all the backward needs.


def backward_by_hand(dy, x_hat, inv_std, gamma):
    """The last formula: dx from the two per-feature sums."""
    m = dy.shape[0]
    dbeta = dy.sum(axis=0)
    dgamma = (dy * x_hat).sum(axis=0)
    dx = gamma * inv_std / m * (m * dy - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


dy = rng.standard_normal(x.shape)  # a random upstream gradient (all ones would give dx = 0)
dx_hand, dgamma_hand, dbeta_hand = backward_by_hand(dy, x_hat, inv_std, gamma)
dx_lib, dgamma_lib, dbeta_lib = bn.batch_norm_backward(dy, cache)
dx_num = numerical_gradient(lambda v: bn.batch_norm_train(v, gamma, beta, eps=eps)[0], x, dy)
print("relative error, hand vs finite differences   :", relative_error(dx_hand, dx_num))
print("relative error, library vs finite differences:", relative_error(dx_lib, dx_num))
print("dgamma agrees with the library:", np.allclose(dgamma_hand, dgamma_lib))
print("dbeta agrees with the library: ", np.allclose(dbeta_hand, dbeta_lib))

# %%
# The central differences agree with both to about :math:`10^{-10}`, the accuracy of a
# finite-difference step of :math:`10^{-5}` in float64. A check like this can pass
# vacuously, so here is the negative control: the *naive* backward that treats
# :math:`\mu` and :math:`\sigma` as constants, :math:`\partial L/\partial x = \gamma s \delta`,
# is far off:

print("relative error of the naive backward:", relative_error(gamma * inv_std * dy, dx_num))

# %%
# 5. Why :math:`E[x^2] - E[x]^2` fails far from zero
# --------------------------------------------------
#
# A one-pass implementation computes the variance as the mean of the squares minus the
# square of the mean, :math:`\sigma^2 = E[x^2] - E[x]^2` (Flax's ``BatchNorm`` does by
# default), because it needs one sweep over the data instead of two. Algebraically it is the same as
# :math:`E[(x - \mu)^2]`; numerically it subtracts two numbers of size :math:`\mu^2` to get
# one of size :math:`\sigma^2`. With float32 (about 7 significant digits), data of mean
# :math:`10^6` and standard deviation 1 have :math:`\mu^2 = 10^{12}`, whose rounding step
# (:math:`6.6 \times 10^4`) is far larger than the variance itself. The library accumulates in
# float64 and centres the data before squaring (a shifted two-pass). The reference below is
# the exact computation in float64 on the *same* float32 values.

x32 = (rng.standard_normal((4096, 64)) + 1e6).astype(np.float32)
x64 = x32.astype(np.float64)
mean_ref = x64.mean(axis=0)
y_ref = (x64 - mean_ref) / np.sqrt(x64.var(axis=0) + eps)


def naive(x):
    """The article's formula, in the precision of its input."""
    mean = x.mean(axis=0)
    var = (x * x).mean(axis=0) - mean * mean
    return (x - mean) / np.sqrt(var + x.dtype.type(eps))


errors = {}
with np.errstate(invalid="ignore"):
    errors["naive E[x^2]-E[x]^2, float32"] = np.max(np.abs(naive(x32) - y_ref))
    errors["naive E[x^2]-E[x]^2, float64"] = np.max(np.abs(naive(x64) - y_ref))
y_lib32, _ = bn.batch_norm_train(x32, None, None)
errors["batchnorm, float32 in and out"] = np.max(np.abs(y_lib32 - y_ref))

try:
    import torch
except ImportError:  # PyTorch is optional: its row is left out
    torch = None
if torch is not None:
    yt = torch.nn.functional.batch_norm(
        torch.from_numpy(x32), None, None, training=True, momentum=0.0, eps=eps
    )
    errors[f"torch {torch.__version__.split('+')[0]} batch_norm, float32"] = np.max(
        np.abs(yt.numpy() - y_ref)
    )

for name, err in errors.items():
    print(f"{name:<34} max |y - y_ref| = {err:.2g}")

# %%
# The naive formula in float32 gets variances that are wrong by orders of magnitude, so its
# outputs are off by several units; even in float64 it keeps only a few digits, worse than
# float32 computed the right way. PyTorch's CPU kernel, also float32, is off by units too.
# The library stays at the float32 rounding of ``y`` itself (a few :math:`10^{-7}` for
# outputs of size 4). What the naive float32 variances look like:

with np.errstate(invalid="ignore"):
    var_naive = (x32 * x32).mean(axis=0) - x32.mean(axis=0) ** 2
print("true variances      :", np.round(x64.var(axis=0)[:5], 3))
print("naive float32 ones  :", var_naive[:5])

# %%
# The gallery example :doc:`/gallery/plot_large_offset` sweeps the offset from 1 to
# :math:`10^7`.
