"""Statistics records and the one exact merge of statistics.

:func:`merge` is Chan, Golub & LeVeque's pairwise update of (count, mean, M2) with
M2 = count * variance: exact in the sense that merging the statistics of two disjoint sets
gives those of their union up to round-off, whatever the grouping. Ghost batch norm,
recalibration and every cross-process reducer use it (and nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BatchStats", "RunningStats", "merge"]


def merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """(count, mean, M2) of the union of two disjoint sets of values, ``n_a + n_b > 0``.

    Works on per-feature arrays of any namespace (and on scalars); counts are numbers.
    """
    n = n_a + n_b
    # half the difference of the means: it cannot overflow (means 1e308 and -1e308), and
    # since halving and doubling are exact, the results are bit for bit those of the
    # textbook form delta = mean_b - mean_a (outside the subnormal range)
    half = mean_b / 2 - mean_a / 2
    mean = mean_a + half * (2 * n_b / n)
    m2 = m2_a + m2_b + half * half * (4 * n_a * n_b / n)
    return n, mean, m2


@dataclass(frozen=True, eq=False)
class BatchStats:
    """Statistics of one training batch, per feature.

    Attributes
    ----------
    count : int
        Values per feature the statistics reduce over (over all ranks, when synchronized).
    mean, var : array, shape (*features)
        Batch mean and *biased* batch variance (float64 where the device has it).
    """

    count: int
    mean: object
    var: object

    @classmethod
    def combine(cls, parts: list[BatchStats]) -> BatchStats:
        """The statistics of the union of disjoint batches, merged exactly in the given order.

        Parts with count 0 are skipped (a merge of nothing has count 0, mean 0, var 0).
        """
        count, mean, m2 = 0, None, None
        for p in parts:
            if p.count == 0:
                continue
            pm, pm2 = _f64(p.mean), _f64(p.var) * p.count
            if mean is None:
                count, mean, m2 = p.count, pm, pm2
            else:
                count, mean, m2 = merge(count, mean, m2, p.count, pm, pm2)
        if mean is None:
            shape = np.shape(parts[0].mean) if parts else ()
            return cls(0, np.zeros(shape), np.zeros(shape))
        return cls(count, mean, m2 / count)


def _f64(a):
    """NumPy input as float64 (other namespaces keep their statistics dtype)."""
    if isinstance(a, (np.ndarray, np.generic, float, int)):
        return np.asarray(a, np.float64)
    return a


@dataclass(frozen=True, eq=False)
class RunningStats:
    """A layer's running statistics: the state :func:`batchnorm.update_running` maps to a
    new one.

    Attributes
    ----------
    mean, var : array, shape (*features), in the layer's dtype
    num_batches_tracked : int
    """

    mean: object
    var: object
    num_batches_tracked: int
