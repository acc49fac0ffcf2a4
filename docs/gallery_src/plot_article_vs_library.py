"""
The article's code against the library
======================================

The seed article's two functions, written out as it gives them (batch statistics and a
running average with momentum 0.9 on the old value in training; the running averages in
test mode, *without* ``eps``), next to :class:`batchnorm.BatchNorm` in its default ``"seed"``
convention. In training they agree to rounding; in evaluation they differ by the ``eps``
the article forgot, which is harmless for a feature that varies and fatal (0/0) for one
that never did.
"""

import matplotlib.pyplot as plt
import numpy as np

import batchnorm as bn


def article_forward(x, gamma, beta, state, mode, momentum=0.9, eps=1e-5):
    """The article's batchnorm_forward, its running averages kept in ``state``."""
    if mode == "train":
        mu, var = x.mean(axis=0), x.var(axis=0)
        state["mean"] = momentum * state["mean"] + (1 - momentum) * mu
        state["var"] = momentum * state["var"] + (1 - momentum) * var
        return gamma * (x - mu) / np.sqrt(var + eps) + beta
    return gamma * (x - state["mean"]) / np.sqrt(state["var"]) + beta  # no eps


rng = np.random.default_rng(0)
D = 8
gamma, beta = rng.uniform(0.5, 2, D), rng.uniform(-1, 1, D)
layer = bn.BatchNorm(D, momentum=None)  # a cumulative average: exact zeros stay zero
layer.gamma[:], layer.beta[:] = gamma, beta
state = {"mean": np.zeros(D), "var": np.ones(D)}

train_gap = 0.0
for _ in range(200):
    x = rng.standard_normal((60, D)) * 2 + 1
    x[:, 0] = 3.0  # feature 0 is constant: a dead unit
    y_article = article_forward(x, gamma, beta, state, "train", momentum=0.0)
    train_gap = max(train_gap, np.max(np.abs(y_article - layer(x))))
# momentum=0.0 in the article's direction keeps only the last batch; use the layer's
# cumulative average for both so that the running statistics are the same numbers
state["mean"], state["var"] = layer.running_mean.copy(), layer.running_var.copy()

x_test = rng.standard_normal((500, D)) * 2 + 1
x_test[:, 0] = 3.0
with np.errstate(divide="ignore", invalid="ignore"):
    y_article = article_forward(x_test, gamma, beta, state, "test")
y_library = layer.eval()(x_test)
diff = np.max(np.abs(y_article - y_library), axis=0)
print("training mode, max |article - library|:", train_gap)
print("evaluation mode, per feature          :", diff)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
ax1.plot(y_library[:, 1:].ravel(), y_article[:, 1:].ravel(), ".", ms=2)
ax1.set(xlabel="library, eval mode", ylabel="article, test mode", title="features 1-7")
finite = np.where(np.isfinite(diff), diff, np.nan)
ax2.bar(np.arange(1, D), finite[1:], color="C0")
ax2.bar([0], [finite[1:].max()], color="white", edgecolor="C3", hatch="//")
ax2.text(0, finite[1:].max(), "NaN", color="C3", va="bottom", ha="center", fontsize=11)
ax2.set(
    yscale="log",
    xlabel="feature",
    ylabel="max |article - library|",
    title="evaluation: the missing eps",
)
plt.show()

# %%
# Features 1-7 differ only by the effect of ``eps = 1e-5`` on a variance of about 4 (a
# relative change near :math:`10^{-6}`); feature 0, constant during training, has running
# variance exactly 0, and the article's test mode divides 0 by 0.
