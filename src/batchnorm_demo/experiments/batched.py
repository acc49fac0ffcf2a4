"""R training runs of one arm and one network shape as one batched model.

The demo trains many runs that share a network shape: arms x learning rates x seeds. Trained
one by one (:func:`.ioffe.train_arm`, on the library's ``Sequential``), each SGD step of the
small 784-100-100-100-10 network costs mostly Python overhead of small operations. Here the R
runs are stacked: weights of shape (R, fan_in, fan_out), activations (R, N, units), per-run
learning rates, and the library's batch-norm kernels called once per layer on (R, N, units)
with feature axes (0, 2), so the statistics are per run and per unit over the batch axis
only. One Python call then serves R runs; the maths per run is that of the one-by-one run
(:mod:`tests.test_batched` checks that both give the same numbers to float rounding).

Runs are ordered by seed: the runs of one seed share their batch order and their noise draws
(as the one-by-one runs with the same seed do), so the first layer multiplies each seed's
batch (N, in) with the contiguous block of that seed's weights, and a noise draw of shape
(N, units) per seed is shared by the seed's runs. Ghost batch norm splits each run's batch
into virtual batches (R, N/k, k, units) with feature axes (0, 1, 3).

Notation per hidden layer: ``z = a W (+ b)``; BN arms ``u = BN(z)``, noisy BN
``v = s * u + m``; ``a' = sigmoid(v)``. The output layer is ``logits = a W + b``.
"""

from __future__ import annotations

import numpy as np

from batchnorm import batch_norm_backward, batch_norm_eval, batch_norm_train
from batchnorm.conventions import new_value_weight
from batchnorm.nn import gaussian_init

from ._fused import sigmoid, sigmoid_backward

__all__ = ["BatchedNet", "Tape", "softmax_cross_entropy_batched"]

EPS = 1e-5  # BatchNorm's default eps, as in the one-by-one runs


def softmax_cross_entropy_batched(logits: np.ndarray, labels: np.ndarray):
    """Per-run mean cross-entropy and d loss / d logits.

    Parameters
    ----------
    logits : ndarray, shape (R, N, K)
    labels : ndarray of int, shape (R, N)

    Returns
    -------
    loss : ndarray, shape (R,)
    dlogits : ndarray, shape (R, N, K)
    """
    z = logits - logits.max(axis=2, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=2, keepdims=True))
    r, n = labels.shape
    rows, cols = np.arange(r)[:, None], np.arange(n)[None, :]
    loss = -log_p[rows, cols, labels].mean(axis=1)
    d = np.exp(log_p)
    d[rows, cols, labels] -= 1.0
    return loss, d / n


class Tape:
    """What a training forward keeps for its backward: every layer's input, BN caches, noise
    scales and sigmoid outputs."""

    __slots__ = ("inputs", "caches", "scales", "sig", "pre_sig", "bn_out", "stats")

    def __init__(self):
        self.inputs, self.caches, self.scales, self.sig = [], [], [], []
        self.pre_sig, self.bn_out, self.stats = [], [], []


class BatchedNet:
    """The arm's network for R runs at once (see the module docstring).

    Parameters
    ----------
    arm : {"no_bn", "bn", "noisy_bn"}
    n_in, n_classes : int
    hidden : tuple of int
    init_seeds : list of numpy.random.SeedSequence
        Per run, the seed of its initial weights (runs of one seed get equal seeds).
    init_stds : list of float
        Per run, the standard deviation of the Gaussian initial weights.
    seed_of : ndarray of int, shape (R,)
        Per run, the index of its seed (non-decreasing: runs are ordered by seed).
    lrs : sequence of float
        Per run, the SGD learning rate.
    ghost : sequence of int or None
        Per run, the virtual batch size (None: plain batch norm).
    momentum : float
        BatchNorm's momentum (weight of the old running value).
    dtype : {"float64", "float32"}
        Precision of the parameters and activations (the initial weights are drawn in
        float64 and rounded; BN statistics and running averages are float64 either way).
    """

    def __init__(self, arm, n_in, n_classes, hidden, init_seeds, init_stds, seed_of, lrs, ghost,
                 momentum, dtype="float64"):  # fmt: skip
        self.arm, self.hidden, self.momentum = arm, tuple(hidden), float(momentum)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64; got {dtype!r}")
        self.bn = arm != "no_bn"
        self.seed_of = np.asarray(seed_of, dtype=np.intp)
        if np.any(np.diff(self.seed_of) < 0):
            raise ValueError("runs must be ordered by seed")
        self.lr = np.asarray(lrs, dtype=np.float64)
        self.ghost = None if ghost is None else np.asarray(ghost, dtype=np.intp)
        widths = (n_in, *self.hidden, n_classes)
        per_run = []
        for seed, std in zip(init_seeds, init_stds, strict=True):
            rng = np.random.default_rng(seed)  # drawn in the one-by-one network's order
            per_run.append(
                [gaussian_init(rng, a, b, std) for a, b in zip(widths, widths[1:], strict=False)]
            )
        self.params: dict[str, np.ndarray] = {}
        r = len(per_run)
        for i in range(len(widths) - 1):
            self.params[f"W{i}"] = np.stack([ws[i] for ws in per_run]).astype(self.dtype)
            last = i == len(widths) - 2
            if last or not self.bn:
                self.params[f"b{i}"] = np.zeros((r, widths[i + 1]), self.dtype)
            if not last and self.bn:
                self.params[f"gamma{i}"] = np.ones((r, widths[i + 1]), self.dtype)
                self.params[f"beta{i}"] = np.zeros((r, widths[i + 1]), self.dtype)
        self.running = {}
        if self.bn:
            for i, w in enumerate(self.hidden):
                self.running[f"mean{i}"] = np.zeros((r, w))
                self.running[f"var{i}"] = np.ones((r, w))
        self.tracked = 0
        self._slices()

    # ------------------------------------------------------------------ bookkeeping
    @property
    def runs(self) -> int:
        """Number of runs R."""
        return self.seed_of.shape[0]

    def _slices(self) -> None:
        seeds, starts = np.unique(self.seed_of, return_index=True)
        ends = [*starts[1:], self.runs]
        self.seed_slices = [
            (int(s), slice(int(a), int(b))) for s, a, b in zip(seeds, starts, ends, strict=True)
        ]
        self.ghost_groups = None
        if self.ghost is not None:
            self.ghost_groups = [
                (int(k), np.flatnonzero(self.ghost == k)) for k in np.unique(self.ghost)
            ]

    def keep(self, rows: np.ndarray) -> None:
        """Keep only the runs ``rows`` (the others finished or diverged)."""
        rows = np.asarray(rows, dtype=np.intp)
        self.params = {k: v[rows] for k, v in self.params.items()}
        self.running = {k: v[rows] for k, v in self.running.items()}
        self.seed_of, self.lr = self.seed_of[rows], self.lr[rows]
        if self.ghost is not None:
            self.ghost = self.ghost[rows]
        self._slices()

    def parameter_list(self, row: int) -> list[np.ndarray]:
        """Run ``row``'s parameters in the order of the one-by-one ``Sequential.parameters()``."""
        out = []
        for i in range(len(self.hidden) + 1):
            out.append(self.params[f"W{i}"][row])
            if f"b{i}" in self.params:
                out.append(self.params[f"b{i}"][row])
            if f"gamma{i}" in self.params:
                out += [self.params[f"gamma{i}"][row], self.params[f"beta{i}"][row]]
        return out

    # ------------------------------------------------------------------ pieces
    def _first(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """``x W`` of the first layer: ``x`` (M, in) shared by all runs, or (S, N, in) per seed."""
        if x.ndim == 2:
            return np.matmul(x, w)
        out = np.empty((w.shape[0], x.shape[1], w.shape[2]), self.dtype)
        for s, sl in self.seed_slices:
            np.matmul(x[s], w[sl], out=out[sl])
        return out

    def _first_grad(self, x: np.ndarray, dz: np.ndarray) -> np.ndarray:
        out = np.empty((dz.shape[0], x.shape[-1], dz.shape[2]), self.dtype)
        for s, sl in self.seed_slices:
            np.matmul(x[s].T, dz[sl], out=out[sl])
        return out

    def _bn_train(self, z, gamma, beta):
        """Batch statistics per run (and per virtual batch): output, caches, mean, var."""
        if self.ghost_groups is None:
            y, cache = batch_norm_train(z, gamma, beta, axis=(0, 2), eps=EPS)
            return y, [(None, None, cache)], cache.mean, cache.var
        r, n, c = z.shape
        y = np.empty_like(z)
        mean, var, caches = np.empty((r, c)), np.empty((r, c)), []
        for k, rows in self.ghost_groups:
            g = n // k
            zk = z[rows].reshape(len(rows), g, k, c)
            gk = np.broadcast_to(gamma[rows][:, None, :], (len(rows), g, c))
            bk = np.broadcast_to(beta[rows][:, None, :], (len(rows), g, c))
            yk, cache = batch_norm_train(zk, gk, bk, axis=(0, 1, 3), eps=EPS)
            y[rows] = yk.reshape(len(rows), n, c)
            mean[rows] = cache.mean.mean(axis=1)  # equal virtual batches: equal weights
            var[rows] = cache.var.mean(axis=1)
            caches.append((k, rows, cache))
        return y, caches, mean, var

    def _bn_backward(self, du, caches):
        if caches[0][0] is None:
            return batch_norm_backward(du, caches[0][2])
        r, n, c = du.shape
        dz, dgamma, dbeta = np.empty_like(du), np.empty((r, c)), np.empty((r, c))
        for k, rows, cache in caches:
            g = n // k
            dzk, dgk, dbk = batch_norm_backward(du[rows].reshape(len(rows), g, k, c), cache)
            dz[rows] = dzk.reshape(len(rows), n, c)
            dgamma[rows], dbeta[rows] = dgk.sum(axis=1), dbk.sum(axis=1)
        return dz, dgamma, dbeta

    def _shift_noise(self, z: np.ndarray, m: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Noisy BN's ``s * z + m``, each seed's draws (S, N, C) shared by its runs."""
        v = np.empty_like(z)
        for k, sl in self.seed_slices:
            np.multiply(s[k], z[sl], out=v[sl])
            v[sl] += m[k]
        return v

    # ------------------------------------------------------------------ passes
    def forward(self, x, *, training: bool, noise=None, params=None, tape: Tape | None = None):
        """Logits (R, N, K) of every run.

        Parameters
        ----------
        x : ndarray
            (M, in) shared by all runs, or (S, N, in) one batch per seed.
        training : bool
            Batch statistics (training) or running statistics (evaluation).
        noise : list of (m, s) per hidden layer, optional
            Noisy BN's per-seed shifts and scales, each (S, N, units); training only.
        params : dict, optional
            Parameters to use instead of the network's own (same keys and shapes).
        tape : Tape, optional
            Filled with what :meth:`backward` needs.
        """
        p = self.params if params is None else params
        a = x
        for i in range(len(self.hidden)):
            if tape is not None:
                tape.inputs.append(a)
            z = self._first(a, p[f"W{i}"]) if i == 0 else np.matmul(a, p[f"W{i}"])
            if not self.bn:
                z = z + p[f"b{i}"][:, None, :]
            elif training:
                z, caches, mean, var = self._bn_train(z, p[f"gamma{i}"], p[f"beta{i}"])
                if tape is not None:
                    tape.caches.append(caches)
                    tape.stats.append((mean, var))
                    tape.bn_out.append(z)
            else:
                z = batch_norm_eval(z, p[f"gamma{i}"], p[f"beta{i}"], self.running[f"mean{i}"],
                                    self.running[f"var{i}"], axis=(0, 2), eps=EPS)  # fmt: skip
            if self.arm == "noisy_bn" and training:
                m, s = noise[i]
                if tape is not None:
                    tape.scales.append(s)
                z = self._shift_noise(z, m, s)
            a = sigmoid(z)
            if tape is not None:
                tape.pre_sig.append(z)
                tape.sig.append(a)
        if tape is not None:
            tape.inputs.append(a)
        out = len(self.hidden)
        return np.matmul(a, p[f"W{out}"]) + p[f"b{out}"][:, None, :]

    def backward(self, dlogits: np.ndarray, tape: Tape, params=None) -> dict:
        """Gradients of every parameter (same keys as ``params``) from a training forward."""
        p = self.params if params is None else params
        out = len(self.hidden)
        grads = {}
        a = tape.inputs[out]
        grads[f"W{out}"] = np.matmul(np.swapaxes(a, 1, 2), dlogits)
        grads[f"b{out}"] = dlogits.sum(axis=1)
        da = np.matmul(dlogits, np.swapaxes(p[f"W{out}"], 1, 2))
        for i in reversed(range(out)):
            dz = sigmoid_backward(da, tape.sig[i])
            if self.arm == "noisy_bn":  # noisy BN's scales (after the sigmoid's derivative)
                for k, sl in self.seed_slices:
                    dz[sl] *= tape.scales[i][k]
            if self.bn:
                dz, grads[f"gamma{i}"], grads[f"beta{i}"] = self._bn_backward(dz, tape.caches[i])
            else:
                grads[f"b{i}"] = dz.sum(axis=1)
            a = tape.inputs[i]
            if i == 0:
                grads["W0"] = self._first_grad(a, dz)
            else:
                grads[f"W{i}"] = np.matmul(np.swapaxes(a, 1, 2), dz)
                da = np.matmul(dz, np.swapaxes(p[f"W{i}"], 1, 2))
        return grads

    def step(self, grads: dict) -> None:
        """SGD on every run with its own learning rate (in place)."""
        for k, v in self.params.items():
            g = grads[k]
            np.multiply(g, self.lr.reshape((-1,) + (1,) * (v.ndim - 1)), out=g)
            v -= g  # the gradients are spent: scaled in place

    def update_running(self, tape: Tape) -> None:
        """One running-statistics update per layer from a training forward's batch statistics
        (``running <- (1 - w) running + w batch``, as the one-by-one BatchNorm layer does)."""
        if not self.bn:
            return
        self.tracked += 1
        w = new_value_weight(self.momentum, "old", self.tracked)
        for i, (mean, var) in enumerate(tape.stats):
            rm, rv = self.running[f"mean{i}"], self.running[f"var{i}"]
            self.running[f"mean{i}"] = (1.0 - w) * rm + w * mean
            self.running[f"var{i}"] = (1.0 - w) * rv + w * var

    def shifted(self, grads: dict, scale: np.ndarray) -> dict:
        """Parameters moved by ``-scale[r] * grads`` per run (new arrays)."""
        out = {}
        for k, v in self.params.items():
            c = scale.reshape((-1,) + (1,) * (v.ndim - 1))
            out[k] = (v - c * grads[k]).astype(self.dtype, copy=False)
        return out
