r"""The formulas of batch normalization, each written once.

Every function takes per-feature values as Python/NumPy scalars, NumPy arrays or arrays of
any Array API namespace, and uses only arithmetic and :mod:`batchnorm.core.ops`; the
compiled backend compiles these same functions (numba overloads the ops), the NumPy backend
and the array-API passes call them on arrays.

The rounding-safe affine form. Elementwise work runs in the working precision ``wt``
(float32 for float16/32 data, float64 for float64 data). With ``s`` the mean rounded to
``wt`` (the *shift*) and ``h`` a per-feature power of two (1 unless ``x - s`` could
overflow ``wt``),

.. math::

    y = (x h - s h)\,\frac{a}{h} + \bigl(\beta - (\mu - s)\,a\bigr), \qquad
    a = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}},

where ``x h - s h`` is exact near the mean (Sterbenz) and the float64 correction
``mu - s`` enters only the per-feature bias. The backward pass writes
``dx = k\,dy + p\,(x - \mu) + q`` the same way.
"""

from __future__ import annotations

from .ops import sqrt, where

#: Multiplier for the overflow-scaled passes: exact (a power of two), and it brings data
#: spanning the whole float range back inside it.
OVERFLOW_H = 1.0 / 16.0

#: Power of two the compiled kernels sum float64 data on again when a float64 sum
#: overflowed while the data are finite (|x| near 1e308): multiplying by it is exact, and
#: (1e308 * 2^-600)^2 times any realistic count stays far below the float64 limit. (The
#: same power-of-two rule as :func:`batchnorm.core.sums.range_scale`, with one scale for
#: every feature, which the kernels take as a scalar.)
RESCALE = 2.0**-600


def overflow_limit(max_finite):
    """The ``big`` of :func:`overflow_needed` for a working precision whose largest finite
    value is ``max_finite`` (``finfo(wt).max``): half of it."""
    return max_finite / 2


def mean_offset(shift, delta, s):
    """``mean - s`` for a mean held unrounded as ``shift + delta`` (``delta = sum(x -
    shift) / n``): ``(shift - s) + delta``. ``shift - s`` is exact when the two are close
    (Sterbenz), so the offset keeps the digits that rounding ``shift + delta`` to one float
    would lose (float64 data of mean 1e12 and spread 1e-3: ``ulp(1e12) = 1.2e-4``)."""
    return (shift - s) + delta


def inv_std(var, eps):
    r""":math:`1/\sqrt{\sigma^2 + \epsilon}`."""
    return 1.0 / sqrt(var + eps)


def moments_from_shifted_sums(shift, t1, t2, n, hs):
    """(mean, biased variance) from the sums ``t1 = sum(d)``, ``t2 = sum(d*d)`` over ``n``
    values of ``d = x*hs - shift`` (``hs`` a power of two: 1, or a rescale against
    overflow). Negative round-off in the variance is clipped to 0; NaN stays NaN."""
    d = t1 / n
    mean = (shift + d) / hs
    var = t2 / n - d * d
    var = where(var < 0.0, 0.0, var)
    return mean, (var / hs) / hs


def overflow_needed(mean, var, shift, count, big):
    """Whether ``x - shift`` may overflow the working precision whose largest finite value
    is ``2 * big``: ``|x - mean| <= sqrt(count * var)`` bounds the data, so the pass is
    scaled when that bound plus ``|mean - shift|`` reaches ``big``, or ``|mean|`` reaches
    ``big / 2``. Elementwise booleans."""
    return (sqrt(count * var) + abs(mean - shift) >= big) | (abs(mean) >= big / 2)


def overflow_scale(mean, var, shift, count, big):
    """The per-feature power of two ``h`` of the rounding-safe form (see
    :func:`overflow_needed`): :data:`OVERFLOW_H` where needed, else 1."""
    return where(overflow_needed(mean, var, shift, count, big), OVERFLOW_H, 1.0)


def output_coef(mean, inv, gamma, beta, shift, h):
    """Coefficients of ``y = (x h - s h) * a_h + c``: returns ``(a_h, c)`` with
    ``a = gamma * inv``, ``a_h = a / h`` and ``c = beta - (mean - shift) * a``."""
    a = inv * gamma
    return a / h, beta - (mean - shift) * a


def backward_coef(sum_dy, sum_dy_xc, inv, k, count):
    r"""``(p, q)`` of ``dx = k dy + p (x - mean) + q`` after a forward with batch
    statistics: the means over the ``count`` values of
    :math:`dx = k(dy - \overline{dy} - \hat x\,\overline{dy\,\hat x})`, ``k = gamma * inv``,
    from ``sum_dy`` and ``sum_dy_xc = sum(dy * (x - mean))``."""
    p = -k * inv * (inv * sum_dy_xc) / count
    q = -k * sum_dy / count
    return p, q


def input_grad_coef(p, q, mean, shift, h):
    """``(p_h, q_s)`` of the rounding-safe ``dx = k dy + (x h - s h) p_h + q_s``."""
    return p / h, q + p * (shift - mean)


def centred_grad_sum(sum_dy_d, sum_dy, mean, shift, h):
    """``sum(dy * (x - mean))`` from ``sum_dy_d = sum(dy * (x h - s h))`` and ``sum(dy)``."""
    return sum_dy_d / h - (mean - shift) * sum_dy
