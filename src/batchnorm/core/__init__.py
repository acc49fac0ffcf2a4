"""The maths of batch normalization: pure functions of arrays of any Array API namespace.

Nothing here does I/O, talks to other processes or imports an array library beyond NumPy
(for NumPy-specific fast exits that are never taken on other arrays):

* :mod:`.ops`: the few elementwise functions the formulas need beyond arithmetic
  (``sqrt``, ``where``, ``rounded``), written once for every namespace; the compiled
  backend registers numba implementations of the same names, so it compiles the very same
  formulas;
* :mod:`.coef`: the formulas (inverse standard deviation, output coefficients, backward
  coefficients, the overflow rule, shifted sums to moments);
* :mod:`.stats`: :class:`BatchStats`, :class:`RunningStats` and the one exact merge;
* :mod:`.passes`: the array-API passes (moments, normalize, gradient sums, input gradient);
* :mod:`.sums`: the accurate per-feature sums those passes accumulate statistics with;
* :mod:`.reduce`: the reducer protocol and :class:`LocalReducer`.
"""
