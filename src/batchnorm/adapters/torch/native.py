"""A compiled autograd node for eager CPU training of small inputs (experimental).

The eager route (:mod:`.fast`) runs a Python ``torch.autograd.Function`` around the compiled
kernels; at small sizes its Python node costs more than the kernels. This module builds a
C++ ``torch::autograd::Function`` (``csrc/lean.cpp``) whose forward and backward call the
same kernels through their C entry points (:mod:`batchnorm.backends.numba.centry`): the
same values, bit for bit, with no Python in the training step but the module's call.

Never built at import:

* :func:`build` (or ``batchnorm warmup --torch``) compiles the extension (a C++ compiler and
  torch's headers; 30-60 s once per torch version, into the user's cache directory,
  :func:`cache_dir`) or loads it from there, compiles the kernels' entry points (cached on
  disk by numba) and turns the route on; :func:`disable` turns it off again.
* By default the first call that can take the route loads a built extension from the
  cache (about half a second, no compiler); where none is built, it starts one background
  build (:mod:`._autobuild`: a low-priority process, one at a time across processes, its
  log ``build.log`` in :func:`cache_dir`, one line on stderr) and takes the Python route;
  later calls load the extension once that build is done. A failed one is not retried.
* ``BATCHNORM_TORCH_NATIVE=1`` in the environment: the first call that can take the route
  builds in the foreground if needed (a failed build warns once and leaves the route off);
  ``BATCHNORM_TORCH_NATIVE=0``: never used nor built.

The route takes training calls with gradients of float32 / float64 inputs whose one-call
layout is ``ROWS`` or ``WIDE`` (:func:`batchnorm.adapters.torch._cpu.kind`) and whose weight
and bias have the input's dtype; every other call, and a batch whose statistics need the
overflow-scaled general path (non-finite ones included), takes the Python route as before.
A double backward (``create_graph=True``) and a batched or wrapped incoming gradient are
handed back to Python: the custom operator's backward, which is differentiable.

A ``ROWS`` input of at least :data:`~batchnorm.backends.numba.plan.SERIAL_MAX` elements is
trained in strips of columns on torch's own threads (``at::parallel_for``; the extension is
built with ``-fopenmp`` under torch's OpenMP backend), each strip running on its columns the
kernel the Python route runs on all of them: the same bits whatever the number of threads.

Evaluation without gradients (:func:`evaluate`, a plain C++ function, no autograd node) is
served through the same extension while the route is on: ``_cpu.evaluate_direct``'s one
coefficient call and one scale-and-shift pass, bit for bit, for float16/32/64 inputs with
float32/64 parameters and buffers at every one-call size (the parallel pass only where
:func:`.centry.parallel_safe`); the entry point of a dtype combination is compiled on its
first call (disk-cached by numba).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from ...backends.numba.plan import SERIAL_MAX, threads
from ...core.coef import RESCALE
from . import _autobuild, _cpu, _pool
from . import ops as O
from ._pool import POOL_ENV, empty_cache, pool_stats, set_pool_limit
from ._running import UPDATE_LOCK, next_count, update_views

__all__ = [
    "COMMON_EVAL",
    "prepare_eval",
    "ENV",
    "POOL_ENV",
    "SKIP",
    "build",
    "built",
    "cache_dir",
    "disable",
    "enabled",
    "empty_cache",
    "evaluate",
    "pool_stats",
    "set_pool_limit",
    "train",
]

#: The environment variable that turns the route on (value ``1``).
ENV = "BATCHNORM_TORCH_NATIVE"
SOURCE = Path(__file__).with_name("csrc") / "lean.cpp"
POOL_HEADER = SOURCE.with_name("pool.h")
_DTYPES = {torch.float32: 0, torch.float64: 1}
_WRAPPED = torch._C._functorch.is_functorch_wrapped_tensor
_EXT = None  # the loaded extension module
_PARALLEL = False  # whether the entry points may call the parallel kernels (centry)
_BUILD_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where the extension is built: ``$XDG_CACHE_HOME`` (or ``~/.cache``)
    ``/batchnorm/torch-native/<torch version>-<python>-<source hash>``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{_digest()}"
    return Path(base) / "batchnorm" / "torch-native" / tag.replace("+", "_")


def _digest() -> str:
    h = hashlib.sha256()
    for f in (SOURCE, POOL_HEADER):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def build(verbose: bool = False, use_ninja: bool | None = None):
    """Compile (or load from :func:`cache_dir`) the native node and turn its route on.

    ``use_ninja``: build through ``torch.utils.cpp_extension.load`` (ninja) or by calling
    the C++ compiler directly; None: ninja when it is installed. Returns the extension
    module. Raises the compiler's error (RuntimeError, OSError) when the build fails; the
    route is then left off."""
    global _EXT, _PARALLEL, route
    with _BUILD_LOCK:  # (two threads' first calls build once)
        if _EXT is None:
            _EXT, _PARALLEL = _setup(verbose, use_ninja)
            _autobuild.clear_failure(cache_dir())
    route = train
    _cpu.POOLED = _EXT.empty_pooled
    return _EXT


def _setup(verbose: bool, use_ninja: bool | None):
    """Load (or compile) the extension and hand it the kernels' entry points."""
    ext = _load(verbose, use_ninja)
    from ...backends.numba import centry  # compiles the entry points (disk-cached)

    for dtype, index in _DTYPES.items():
        big, limit = _cpu.kernel_limits(dtype)
        rescale = RESCALE if dtype == torch.float64 else 1.0
        addrs = list(centry.addresses(_cpu.NP_DTYPES[dtype]))
        ext.set_kernels(index, addrs, big, limit, rescale, SERIAL_MAX)
    ext.set_fallback(_backward_op)
    _pool.attach(ext)
    return ext, centry.parallel_safe()


def _load(verbose: bool, use_ninja: bool | None):
    from torch.utils import cpp_extension as ce

    name = "batchnorm_native_" + _digest()
    where = cache_dir()
    where.mkdir(parents=True, exist_ok=True)
    direct = where / (name + sysconfig.get_config_var("EXT_SUFFIX"))
    if use_ninja is None:  # the one built (the background build's is direct), else ninja
        use_ninja = not direct.exists() and ce.is_ninja_available()
    so = where / (name + ".so") if use_ninja else direct
    if not so.exists():  # a cold build: say why the call waits (once, on stderr)
        print(
            f"batchnorm: building the native torch node, a one-off wait of about 30-60 s "
            f"(cached in {where})",
            file=sys.stderr,
            flush=True,
        )
    if use_ninja:
        return ce.load(
            name,
            [str(SOURCE)],
            extra_cflags=["-O2", *_openmp()],
            extra_ldflags=_openmp(),
            build_directory=str(where),
            verbose=verbose,
        )
    if not so.exists():
        _compile(ce, name, so, verbose)
    spec = importlib.util.spec_from_file_location(name, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _openmp() -> list[str]:
    """Compiler flags for torch's threads: without them at::parallel_for (the strips of
    columns of a ROWS input, lean.cpp) runs every strip in the calling thread. The OpenMP
    runtime is torch's own (libgomp.so.1, loaded by torch before the extension). Read at
    build time only (parallel_info starts torch's thread pools)."""
    return ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []


def _compile(ce, name: str, so: Path, verbose: bool) -> None:
    """The C++ compiler on the source, without ninja; written atomically (temp + rename)."""
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    tmp = so.with_suffix(f".{os.getpid()}.tmp")
    cmd = [
        os.environ.get("CXX", "c++"), "-O2", *_openmp(), "-std=c++17", "-shared", "-fPIC",
        f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in ce.include_paths()), f"-I{sysconfig.get_paths()['include']}",
        str(SOURCE), "-o", str(tmp),
        f"-L{lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip
    if verbose:
        print(" ".join(cmd))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building {SOURCE.name} failed:\n{res.stderr[-4000:]}")
    os.replace(tmp, so)


def disable() -> None:
    """Turn the route off (the Python route serves every call again, with torch's
    allocator; the pool keeps its cached blocks until :func:`empty_cache`)."""
    global route
    route = None
    _cpu.POOLED = None


def enabled() -> bool:
    """Whether training calls take the native route now."""
    return route is train


def _backward_op(dy, x, weight, has_bias: bool, stats, eps: float):
    """The fallback backward (double backward, batched or wrapped gradients): the custom
    operator's, which is differentiable; the parameter gradients in their dtypes."""
    dx, dw, db = O.call_backward(dy, x, weight, stats[0], stats[1], eps, True)
    dtypes = (None if weight is None else weight.dtype, x.dtype if has_bias else None)
    return dx, *O.param_grads(dw, db, dtypes)


def train(module, x, weight, bias, lay, views, eps: float, update: bool, rm=None, rv=None):
    """The training forward of ``module`` on ``x`` through the native node (``lay`` its
    layout, ``views`` the module's cached NumPy views, :func:`.fast.batch_norm`), updating
    the running statistics ``rm``, ``rv`` when ``update``; None where the route does not
    apply (nothing done: the caller takes the Python route)."""
    dt = x.dtype
    if (
        dt not in _DTYPES
        or (weight is not None and (weight.dtype is not dt or _WRAPPED(weight)))
        or (bias is not None and (bias.dtype is not dt or _WRAPPED(bias)))
        or eps < _cpu.TINY_EPS
    ):
        return None
    vs = lay.view_shape
    if lay.kind == _cpu.ROWS:
        a0, a1, a2 = vs[0], vs[1], 1
    else:  # WIDE: as the Python route, which fuses unless a channel takes several threads,
        # and sums the gradients alone (another order) where no input gradient is wanted;
        # the parallel kernels (from SERIAL_MAX elements) only without the Python lock
        a0, a1, a2 = vs
        if not x.requires_grad or (
            a0 * a1 * a2 >= SERIAL_MAX and (not _PARALLEL or a1 < threads())
        ):
            return None
    args = (x, weight, bias, lay.kind, a0, a1, a2, lay.channels_last, eps)
    if update and views[5] and rm is not None:
        return _train_updating(module, args, views, lay.count, rm, rv)
    y, stats, plain, _ = _EXT.train(*args, None, None, 0.0, 0.0, 0.0)
    if not plain:
        return None
    if update:
        s = stats.numpy()
        update_views(module, views, s[0], s[1], lay.count, x.shape)
    return y


def _train_updating(module, args, views, count: int, rm, rv):
    """:func:`train` with the running update made in the extension right after the
    forward (no Python between them: the Python after a large forward runs on caches it
    evicted), under the update lock as :func:`._running.update_views`; a refused update
    (a non-finite new value) is handed to ``update_views``, which raises."""
    n_np = views[4]
    with UPDATE_LOCK:
        n_new = next_count(n_np)  # (may refuse: nothing done yet)
        w = module.momentum if module.momentum is not None else 1.0 / n_new
        y, stats, plain, done = _EXT.train(*args, rm, rv, 1.0 - w, w, w * count / (count - 1))
        if plain and done == 1:
            n_np[...] = n_new
            return y
    if not plain:
        return None
    s = stats.numpy()  # (another layout of the buffers, or refused: raises, nothing changed)
    update_views(module, views, s[0], s[1], count, args[0].shape)
    return y


#: :func:`evaluate`'s answer where the native route does not apply (the caller's Python
#: route serves the call).
SKIP = object()
_X_CODES = {torch.float16: 0, torch.float32: 1, torch.float64: 2}
_VEC_CODES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}


def evaluate(x, weight, bias, rm, rv, lay, views, eps: float):
    """Evaluation with the running statistics ``rm``, ``rv`` (no gradients wanted; ``eps``
    at least ``TINY_EPS``) through the extension, as :func:`._cpu.evaluate_direct`: the
    output; None where the running mean is too large for the plain form (the caller takes
    the general path); :data:`SKIP` where this route does not apply (the extension not
    loaded, an empty input, the parallel pass without :func:`.centry.parallel_safe`, a
    lazily negated tensor).
    ``views``: the module's NumPy views (:func:`.fast.batch_norm`), whose dtypes pick the
    entry point (compiled on the first call of a dtype combination)."""
    if _EXT is None and not _ready():
        return SKIP
    vs = lay.view_shape
    a0, a1, a2 = (vs[0], vs[1], 0) if len(vs) == 2 or vs[2] == 1 else vs
    size = a0 * a1 * (a2 or 1)
    if size == 0 or (size >= SERIAL_MAX and not _PARALLEL):
        return SKIP
    nchunks = max(1, min(a0, threads())) if size >= SERIAL_MAX and a2 == 0 else 1
    args = (x, weight, bias, rm, rv, a0, a1, a2, lay.channels_last, float(eps), nchunks)
    y, status = _EXT.evaluate(*args)
    if status < 0:  # the first call of these dtypes: compile and register its entry point
        _register_eval(x.dtype, [views[j].dtype for j in range(4)])
        y, status = _EXT.evaluate(*args)
    return y if status == 1 else None if status == 0 else SKIP  # (2: lazily negated)


def _register_eval(dtype: torch.dtype, dts) -> None:
    """Register the evaluation entry point of an input of ``dtype`` with a weight, bias,
    running mean and running variance of the NumPy dtypes ``dts``."""
    from ...backends.numba import centry

    code = _X_CODES[dtype] * 16 + sum(_VEC_CODES[d] << (3 - j) for j, d in enumerate(dts))
    address = centry.eval_address(_cpu.NP_DTYPES[dtype], *dts)
    _EXT.set_eval(code, address, _cpu.kernel_limits(dtype)[1])


_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
#: The evaluation dtype combinations :func:`prepare_eval` registers ahead: ``(x, (weight,
#: bias, running mean, running variance))``: float32 and float64 modules, a float32 module
#: without weight and bias (float64 ones and zeros), a float16 input to a float32 module.
COMMON_EVAL = (
    (torch.float32, (_F32,) * 4),
    (torch.float64, (_F64,) * 4),
    (torch.float32, (_F64, _F64, _F32, _F32)),
    (torch.float16, (_F32,) * 4),
)


def prepare_eval(combos=COMMON_EVAL) -> int:
    """Build (or load) the extension and register the evaluation entry points of
    ``combos`` (compiled once, then loaded from numba's disk cache), so that their first
    calls wait for no compiler; returns how many were registered."""
    build()
    for dtype, dts in combos:
        _register_eval(dtype, [np.dtype(d) for d in dts])
    return len(combos)


def _ready() -> bool:
    """Whether the extension is loaded for :func:`evaluate`: loaded (or built) here as the
    training route's first call would, which turns that route on too."""
    if route is None:
        return False
    if route is _cached and not _pickup():
        return False
    return _load_or_warn()


def _load_or_warn() -> bool:
    """:func:`build`; a failure turns the route off with one warning."""
    global route
    try:
        build()
    except Exception as exc:  # noqa: BLE001 - any build failure leaves the Python route
        route = None
        warnings.warn(
            f"the native batch-norm node could not be built or loaded ({exc!s:.300}); the "
            f"Python route serves every call ({ENV}=0 turns the native node off)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _first(*args):
    """The route's first call under ``BATCHNORM_TORCH_NATIVE=1`` (build, then route) or,
    by default, with a built extension (load, then route)."""
    return train(*args) if _load_or_warn() else None


def built() -> bool:
    """Whether the extension of this torch, Python and source is in :func:`cache_dir`
    (built by :func:`build`, with or without ninja)."""
    where, name = cache_dir(), "batchnorm_native_" + _digest()
    suffixes = (".so", sysconfig.get_config_var("EXT_SUFFIX"))
    return any((where / (name + s)).exists() for s in suffixes)


def _cached(*args):
    """The route's calls by default until the extension is loaded: loaded once built (never
    compiled here; the background build, :mod:`._autobuild`), the Python route until then."""
    return _first(*args) if _pickup() else None


def _pickup() -> bool:
    """Whether the extension may be loaded now (:meth:`._autobuild.Watcher.poll`: starts
    the background build or waits for it; the route off where it cannot come)."""
    global route
    state = _WATCH.poll()
    route = None if state == _autobuild.OFF else route
    return state == _autobuild.READY


def _initial(value: str | None):
    """The route a process starts with, from ``BATCHNORM_TORCH_NATIVE``."""
    if value == "1":
        return _first
    return None if value == "0" else _cached


#: What :func:`.fast.batch_norm`'s one-call route calls for training with gradients: None
#: (off), :func:`train`, the building first call under ``BATCHNORM_TORCH_NATIVE=1``, or
#: by default :func:`_cached` (loads a built extension, or builds it in the background).
route = _initial(os.environ.get(ENV))
_WATCH = _autobuild.Watcher(built, cache_dir)
