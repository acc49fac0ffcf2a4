"""Benchmark of the kernels: ratios to a plain copy and to PyTorch's CPU kernel, side by side.

Measuring honestly on a shared, noisy machine: within every repeat the measured functions
run one after the other (copy, NumPy backend, numba backend, PyTorch, copy, ...), so a noisy
neighbour slows all of them alike, with a short untimed busy pause
(:data:`.timing.PAUSE_S`) after parallel calls so that no library's spinning idle
threads slow the next one; the minimum and the median over the repeats are reported, each as
a ratio to ``np.copyto`` of the same array into a preallocated one.

* Large-array table: every case (shape, layout in memory, dtype) and pass (train forward, eval
  forward, backward) for the NumPy backend, the numba backend (writing into a preallocated
  ``out=``, as a layer with ``reuse_buffers=True`` does; the ratio with a fresh output array
  is reported too) and PyTorch's CPU batch-norm kernel (``torch.ops.aten.native_batch_norm``
  / ``native_batch_norm_backward``, same number of threads, on a tensor sharing the
  array's memory: channels-last data are a ``channels_last`` tensor) when torch is
  installed. Channels-last cases (C-contiguous NHWC, or an NHWC view of NCHW memory) also
  report their numba time over that of the NCHW case of the same bytes ("twin").
* Small-array table: forward + backward of the :class:`~batchnorm.BatchNorm` layer (training
  mode, running update included), of the pure kernels and of the article's naive NumPy
  code, interleaved, and of PyTorch's ``BatchNorm1d``/``BatchNorm2d`` with autograd in its
  own loop right after (interleaved, it slowed whichever function ran next), in
  microseconds.
* First-call compile time of each compiled pass in a fresh process with an empty cache.

Ratios outside the goals of issue 11 are marked ``MISSED``.

The cases are in :mod:`.cases`, the timings in :mod:`.timing`, the tables in
:mod:`.table`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

from batchnorm.functional import numba_available

from .cases import CASES, SMALL_CASES, Case, goal
from .table import format_bench
from .timing import large_rows, small_row, thread_count, twin_ratios

__all__ = ["CASES", "SMALL_CASES", "Case", "compile_times", "format_bench", "goal", "run_bench"]


_COMPILE_SCRIPT = """
import json, time, numpy as np, batchnorm as bn
x = np.random.default_rng(0).standard_normal((4, 8, 40, 40)).astype(np.float32)
g = np.ones(8); out = {}
t = time.perf_counter(); y, cache = bn.batch_norm_train(x, g, g, backend="numba")
out["train"] = time.perf_counter() - t
t = time.perf_counter(); bn.batch_norm_eval(x, g, g, g, g, backend="numba")
out["eval"] = time.perf_counter() - t
t = time.perf_counter(); bn.batch_norm_backward(x, cache, backend="numba")
out["backward"] = time.perf_counter() - t
layer = bn.BatchNorm(100); s = np.random.default_rng(0).standard_normal((60, 100))
t = time.perf_counter(); layer.backward(layer(s))
out["small layer (60, 100)"] = time.perf_counter() - t
print(json.dumps(out))
"""


def compile_times(cache_dir: str | None = None) -> dict | None:
    """First-call seconds per pass in a fresh process; an empty numba cache unless
    ``cache_dir`` (a warm one) is given."""
    if not numba_available():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir or tmp}
        res = subprocess.run(
            [sys.executable, "-c", _COMPILE_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_bench(suite: str = "quick", repeats: int = 10, progress=None) -> dict:
    """Run the benchmark suite; return a JSON-ready dict of timings and ratios.

    Parameters
    ----------
    suite : {"quick", "full"}
    repeats : int
        Interleaved repeats per large-array timing (halved for arrays over 50 MB); the
        small-array table uses 30 times as many.
    progress : callable(done, total), optional
    """
    threads = thread_count()
    cases = CASES[suite]
    small = SMALL_CASES[suite]
    total = len(cases) + len(small) + 1
    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    compile_s = compile_times()  # first: it also compiles what the timings below need
    tick()
    rows = []
    for case in cases:
        rows.extend(large_rows(case, repeats, threads))
        tick()
    twin_ratios(rows)
    small_rows = []
    for name, shape in small:
        small_rows.append(small_row(name, shape, 30 * repeats, threads))
        tick()
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "threads": threads,
            "numpy": np.__version__,
        },
        "suite": suite,
        "repeats": repeats,
        "compile_s": compile_s,
        "rows": rows,
        "small": small_rows,
    }
