r"""A tiny NumPy toolkit for small networks: layers, a loss and SGD.

Every module has the one interface of :class:`batchnorm.module.Module` (forward/backward,
``parameters()``/``gradients()``, ``train()``/``eval()``), which the norm layers share:
batch normalization is the library's own :class:`batchnorm.BatchNorm`, used as is in a
:class:`Sequential`; there is no second copy of it here.

Equations. Linear: :math:`y = xW + b`, :math:`dW = x^\top dy`, :math:`db = \sum_i dy_i`,
:math:`dx = dy\,W^\top`. Sigmoid: :math:`y = 1/(1+e^{-x})`, :math:`dx = dy\,y(1-y)`.
ReLU: :math:`y = \max(x, 0)`, :math:`dx = dy\,[x>0]`. Softmax cross-entropy of logits
:math:`z` and labels :math:`t`: :math:`L = -\frac1N\sum_i \log \mathrm{softmax}(z_i)_{t_i}`,
:math:`dz = (\mathrm{softmax}(z) - \mathrm{onehot}(t))/N`.
"""

from __future__ import annotations

import numpy as np

from ._validation import check_count, check_real
from .module import Module, NoForwardError

__all__ = [
    "SGD",
    "Linear",
    "Module",
    "NoForwardError",
    "NoisyShift",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "accuracy",
    "gaussian_init",
    "softmax_cross_entropy",
]


def gaussian_init(rng: np.random.Generator, fan_in: int, fan_out: int, std: float | str):
    """Weights ``(fan_in, fan_out)`` from N(0, std²); ``std="xavier"`` uses 1/sqrt(fan_in)."""
    fan_in = check_count(fan_in, "in_features")
    fan_out = check_count(fan_out, "out_features")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}")
    if std == "xavier":
        scale = 1.0 / np.sqrt(fan_in)
    else:
        scale = check_real(std, "std")
        if scale < 0:
            raise ValueError(f"std must be >= 0 or 'xavier'; got {std!r}")
    return rng.normal(0.0, scale, size=(fan_in, fan_out))


class Linear(Module):
    """Affine map ``y = x W + b`` on (N, in_features) inputs.

    Parameters
    ----------
    in_features, out_features : int
    rng : numpy.random.Generator
        Draws the initial weights.
    std : float or "xavier"
        Standard deviation of the Gaussian initial weights.
    bias : bool
        False drops ``b`` (as when a BatchNorm's beta follows).
    """

    forward_state = ("_x",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rng: np.random.Generator,
        std: float | str = "xavier",
        bias: bool = True,
    ):
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be True or False; got {bias!r}")
        self.W = gaussian_init(rng, in_features, out_features, std)
        self.b = np.zeros(out_features) if bias else None
        self.dW = np.zeros_like(self.W)
        self.db = None if self.b is None else np.zeros_like(self.b)
        self._x = None

    def forward(self, x, *, training=None, update_stats=True):
        """``y = x W + b`` for ``x`` of shape (N, in_features)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.W.shape[0]:
            raise ValueError(f"Linear expects input of shape (N, {self.W.shape[0]}); got {x.shape}")
        self._x = x
        y = x @ self.W
        return y if self.b is None else y + self.b

    def backward(self, dy):
        """Set ``dW = x^T dy`` and ``db = sum(dy)``; return ``dx = dy W^T``."""
        x = self._need_cache(self._x)
        dy = np.asarray(dy)
        if dy.shape != (x.shape[0], self.W.shape[1]):
            raise ValueError(
                f"dy has shape {dy.shape}; the last forward's output had shape "
                f"{(x.shape[0], self.W.shape[1])}"
            )
        dx = dy @ self.W.T  # every result before any is stored
        dW = x.T @ dy
        self.dW = dW
        if self.b is not None:
            self.db = dy.sum(axis=0)
        return dx

    def parameters(self):
        """``W`` (and ``b`` when there is a bias)."""
        return {"W": self.W} if self.b is None else {"W": self.W, "b": self.b}

    def gradients(self):
        """``dW`` (and ``db``) from the last backward pass."""
        return {"W": self.dW} if self.b is None else {"W": self.dW, "b": self.db}


class Sigmoid(Module):
    """The logistic function, elementwise."""

    forward_state = ("_y",)

    def forward(self, x, *, training=None, update_stats=True):
        """``1 / (1 + exp(-x))``, computed without overflow on either tail."""
        # numerically stable on both tails: exp of a non-positive number only
        e = np.exp(-np.abs(x))
        self._y = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        return self._y

    def backward(self, dy):
        """``dx = dy * y * (1 - y)``."""
        y = self._need_cache(getattr(self, "_y", None))
        return dy * y * (1.0 - y)


class ReLU(Module):
    """``max(x, 0)``, elementwise."""

    forward_state = ("_mask",)

    def forward(self, x, *, training=None, update_stats=True):
        """``max(x, 0)``."""
        self._mask = x > 0
        return np.where(self._mask, x, 0.0)

    def backward(self, dy):
        """``dx = dy`` where ``x > 0``, else 0."""
        return dy * self._need_cache(getattr(self, "_mask", None))


class NoisyShift(Module):
    r"""Santurkar et al. (2018) "noisy BN" perturbation, active in training mode only.

    At every training forward, per unit: :math:`\mu_t \sim U(-a, a)`,
    :math:`\sigma_t \sim U(1, 1 + s)`; per sample and unit :math:`m \sim U(\mu_t \pm 0.1)`,
    :math:`s \sim N(\sigma_t, 0.1)`; then :math:`a \leftarrow s\,a + m`. The noise is
    treated as a constant in the backward pass (``dx = s * dy``). Placed right after a BatchNorm,
    it makes the distribution of the next layer's input deliberately unstable.
    """

    forward_state = ("_s",)

    def save_forward_state(self) -> dict:
        """The last forward's noise and the generator's state (a tool's own forwards then
        leave the random stream where the caller had it)."""
        return {**super().save_forward_state(), "rng": self.rng.bit_generator.state}

    def restore_forward_state(self, saved: dict) -> None:
        """Put back what :meth:`save_forward_state` returned."""
        saved = dict(saved)
        self.rng.bit_generator.state = saved.pop("rng")
        super().restore_forward_state(saved)

    def __init__(
        self,
        rng: np.random.Generator,
        *,
        mean_range: float = 0.5,
        scale_range: float = 0.25,
        jitter: float = 0.1,
    ):
        self.rng = rng
        self.mean_range, self.scale_range, self.jitter = mean_range, scale_range, jitter

    def forward(self, x, *, training=None, update_stats=True):
        """Apply fresh noise in training mode; identity in evaluation mode."""
        training = self._mode(training)
        if not training:
            self._s = None
            return x
        n, d = x.shape
        mu_t = self.rng.uniform(-self.mean_range, self.mean_range, size=d)
        sigma_t = self.rng.uniform(1.0, 1.0 + self.scale_range, size=d)
        m = self.rng.uniform(mu_t - self.jitter, mu_t + self.jitter, size=(n, d))
        self._s = self.rng.normal(sigma_t, self.jitter, size=(n, d))
        return self._s * x + m

    def backward(self, dy):
        """``dx = s * dy`` (the noise is a constant)."""
        s = getattr(self, "_s", None)
        return dy if s is None else dy * s


class Sequential(Module):
    """Modules applied in order; backward runs them in reverse."""

    def __init__(self, *modules: Module):
        bad = [type(m).__name__ for m in modules if not isinstance(m, Module)]
        if bad:
            raise TypeError(f"Sequential takes modules; got {bad}")
        self.modules = list(modules)

    def forward(self, x, *, training=None, update_stats=True):
        """Run every module in order."""
        for m in self.modules:
            x = m.forward(x, training=training, update_stats=update_stats)
        return x

    def forward_collect(self, x, *, training=None, update_stats=True):
        """Forward pass returning every intermediate output (for inspecting activations)."""
        outs = []
        for m in self.modules:
            x = m.forward(x, training=training, update_stats=update_stats)
            outs.append(x)
        return outs

    def backward(self, dy):
        """Run every module's backward in reverse order; return the input gradient."""
        for m in reversed(self.modules):
            dy = m.backward(dy)
        return dy

    def train(self, mode: bool = True):
        """Set the mode of this container and of every module in it."""
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"mode must be True or False; got {mode!r}")
        self.training = bool(mode)
        for m in self.modules:
            m.train(mode)
        return self

    def parameters(self):
        """Every module's parameters, named ``"<index>.<name>"``."""
        return {
            f"{i}.{k}": v for i, m in enumerate(self.modules) for k, v in m.parameters().items()
        }

    def gradients(self):
        """Every module's gradients, named like :meth:`parameters`."""
        return {f"{i}.{k}": v for i, m in enumerate(self.modules) for k, v in m.gradients().items()}


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer labels, and d loss / d logits."""
    if np.iscomplexobj(logits):
        raise TypeError("logits must be real; got a complex array")
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not match")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers; got dtype {labels.dtype}")
    if logits.shape[0] == 0:
        raise ValueError("softmax_cross_entropy needs at least one sample; got an empty batch")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(
            f"labels must lie in [0, {logits.shape[1]}); got [{labels.min()}, {labels.max()}]"
        )
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -float(log_p[np.arange(n), labels].mean())
    dlogits = np.exp(log_p)
    dlogits[np.arange(n), labels] -= 1.0
    return loss, dlogits / n


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose largest logit is at the label.

    ``logits`` has shape (N, K) and ``labels`` shape (N,) (integers): other shapes are
    refused (a broadcast would silently compare the wrong pairs)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"accuracy needs logits of shape (N, K) and labels of shape (N,); got "
            f"{logits.shape} and {labels.shape}"
        )
    return float(np.mean(np.argmax(logits, axis=1) == labels))


class SGD:
    """Plain SGD, optionally with (heavy-ball) momentum: v ← μ v + g; p ← p − lr v."""

    def __init__(self, module: Module, lr: float, momentum: float = 0.0):
        if lr <= 0 or not np.isfinite(lr):
            raise ValueError(f"learning rate must be positive and finite; got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")
        self.module, self.lr, self.momentum = module, float(lr), float(momentum)
        self._velocity: dict[str, np.ndarray] = {}

    def step(self) -> None:
        """Update every parameter of the module from its gradient (NumPy parameters, in
        place; layers placed on another array library are refused: use that library's
        optimizer)."""
        params, grads = self.module.parameters(), self.module.gradients()
        for name, p in params.items():
            if not isinstance(p, np.ndarray):
                raise TypeError(
                    f"SGD updates NumPy parameters in place; parameter {name!r} is a "
                    f"{type(p).__module__}.{type(p).__name__}: use that library's optimizer"
                )
        for name, p in params.items():  # check everything before anything changes
            g = grads.get(name)
            if g is None:
                raise NoForwardError(f"parameter {name!r} has no gradient; call backward() first")
            if np.shape(g) != p.shape:
                raise ValueError(
                    f"gradient of {name!r} has shape {np.shape(g)} but the parameter {p.shape}"
                )
        for name, p in params.items():
            g = grads[name]
            if self.momentum:
                v = self._velocity.setdefault(name, np.zeros_like(p))
                v *= self.momentum
                v += g
                g = v
            p -= self.lr * g
