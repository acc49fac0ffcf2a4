"""batchnorm.jax against flax.linen.BatchNorm under jax.jit, and the passes over the data
in the compiled HLO.

For each shape (float32, CPU) every contender's training step is compiled once:
``fwd`` (output and new running statistics) and ``grad`` (``jax.grad`` of
``sum(y * w)`` with respect to ``x``, ``scale`` and ``bias``, plus the new statistics). The
repeats interleave the contenders (one call of each per repeat, in a rotating order) and
the table keeps the minimum per contender. Also measured: the largest output error at mean
1e6, std 1 against a float64 reference of the same float32 input, and the number of
passes over ``x``-sized arrays in each compiled module (:func:`count_passes`).

Run::

    python benchmarks/jax_flax.py                       # all four shapes, 30 repeats
    python benchmarks/jax_flax.py --shapes 64x256 --repeats 10 --json out.json

or from Python, ``main(["--shapes", "64x256", "--repeats", "5"])`` (returns the results).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = ((64, 256), (256, 1024), (32, 56, 56, 64), (128, 28, 28, 128))
_SKIP = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")


def _flax_step(shape, ours: bool = False):
    import flax.linen as nn

    if ours:
        from batchnorm.flax.linen import BatchNorm
    else:
        BatchNorm = nn.BatchNorm  # noqa: N806
    model = BatchNorm(use_running_average=False)
    variables = model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))

    def fwd(x, scale, bias):
        params = {"scale": scale, "bias": bias}
        y, new = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
        )
        return y, new["batch_stats"]

    return fwd


def _ours_step(shape, kind: str):
    import batchnorm.jax as bnj

    c = shape[-1]
    rm, rv = jnp.zeros(c, jnp.float32), jnp.ones(c, jnp.float32)

    def fwd(x, scale, bias):
        if kind == "batch_norm":
            return bnj.batch_norm(x, scale, bias, rm, rv, training=True)
        if kind == "batch_renorm":
            return bnj.batch_renorm(x, scale, bias, rm, rv, training=True, rmax=3.0, dmax=5.0)
        vbs = max(2, shape[0] // 4)
        return bnj.ghost_batch_norm(x, scale, bias, rm, rv, training=True, virtual_batch_size=vbs)

    return fwd


def contenders(shape) -> dict[str, Callable]:
    """The training forward of each contender: ``fwd(x, scale, bias) -> (y, stats)``."""
    out = {"flax.linen": _flax_step(shape)}
    for kind in ("batch_norm", "batch_renorm", "ghost_batch_norm"):
        out[kind] = _ours_step(shape, kind)
    out["batchnorm.flax.linen"] = _flax_step(shape, ours=True)
    return out


def _grad_of(fwd):
    def loss(x, scale, bias, w):
        y, stats = fwd(x, scale, bias)
        return jnp.sum(y * w), stats

    return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)


def _computations(hlo: str) -> dict[str, str]:
    """The body text of every computation of an HLO module, by name."""
    out, name, lines = {}, None, []
    for line in hlo.splitlines():
        m = re.match(r"(?:ENTRY )?%(\S+) \(", line)
        if m:
            name, lines = m.group(1), []
        elif line.startswith("}") and name is not None:
            out[name], name = "\n".join(lines), None
        elif name is not None:
            lines.append(line)
    return out


def _sizes(body: str) -> dict[str, int]:
    """Element count of every named value defined in a computation body."""
    out = {}
    for line in body.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (.+?) [\w\-]+\(", line)
        if m:
            dims = re.findall(r"\[([\d,]*)\]", m.group(2))
            out[m.group(1)] = max(
                (int(np.prod([int(d) for d in ds.split(",") if d] or [1])) for ds in dims),
                default=0,
            )
    return out


def _reduces(line: str, comps: dict[str, str], size: int, depth: int = 0) -> bool:
    """Whether an instruction reduces an array of ``size`` elements, itself or in a
    computation it calls (a reduction of a small array that merely slices ``x`` is not a
    pass over ``x``)."""
    for callee in re.findall(r"calls=%([\w.\-]+)", line):
        body = comps.get(callee, "")
        sizes = _sizes(body)
        for inner in body.splitlines():
            m = re.search(r" reduce(?:-window)?\(%([\w.\-]+)", inner)
            if m and sizes.get(m.group(1), 0) == size:
                return True
            if depth < 4 and "calls=%" in inner and _reduces(inner, comps, size, depth + 1):
                return True
    return False


def _passes(body: str, comps: dict[str, str], size: int) -> list[dict[str, int]]:
    """The passes over arrays of ``size`` elements of one computation, one dict per path
    through it: a ``conditional`` contributes each of its branches (a path per branch)."""
    sizes: dict[str, int] = {}
    counts = {"reduction": 0, "elementwise": 0}
    branches: list[list[dict[str, int]]] = []
    for line in body.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (.+?) ([\w\-]+)\(", line)
        if not m:
            continue
        name, shape_text, op = m.groups()
        out = [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for dims in re.findall(r"\[([\d,]*)\]", shape_text)]  # fmt: skip
        sizes[name] = max(out) if out else 0
        if op in _SKIP:
            continue
        if op == "conditional":
            names = re.search(r"branch_computations=\{([^}]*)\}", line).group(1)
            bodies = [comps[b.strip().lstrip("%")] for b in names.split(",")]
            branches.append([p for body_b in bodies for p in _passes(body_b, comps, size)])
            continue
        args = line[m.end() :].split(")", 1)[0]
        if not any(sizes.get(o, 0) == size for o in re.findall(r"%([\w.\-]+)", args)):
            continue
        if _reduces(line, comps, size) or re.search(r" reduce(-window)?\(", line):
            counts["reduction"] += 1
        elif sizes[name] == size:
            counts["elementwise"] += 1
    paths = [counts]
    for options in branches:
        paths = [{k: p[k] + o[k] for k in p} for p in paths for o in options]
    return paths


def count_passes(hlo: str, size: int) -> dict:
    """Passes over arrays of ``size`` elements in the ENTRY computation of a compiled HLO
    module. Every instruction (a fusion, or an unfused op) with an operand of that size
    counts: a ``reduction`` when it reduces (its fused computation holds a ``reduce``),
    an ``elementwise`` pass when it writes an array of that size, and otherwise (a slice
    that reads one row) not at all. A ``conditional`` runs one of its branches: the
    result counts the path with the fewest passes, and ``fallback`` (a dict of the same
    keys) the one with the most (equal to it where there is no conditional)."""
    comps = _computations(hlo)
    paths = _passes(hlo[hlo.index("\nENTRY") :].split("\n", 2)[2], comps, size)
    order = sorted(paths, key=lambda p: (sum(p.values()), p["reduction"]))
    return {**order[0], "fallback": dict(order[-1])}


def _data(shape, offset: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape) + offset, jnp.float32)
    c = shape[-1]
    scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(c), jnp.float32)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return x, scale, bias, w


def exactness(shape=(1024, 16), offset: float = 1e6) -> dict[str, float]:
    """Largest |y - y_ref| of the batch-norm contenders at mean ``offset``, std 1, float32
    (y_ref in float64 from the same float32 values, scale 1, bias 0)."""
    x = _data(shape, offset)[0]
    c = shape[-1]
    ones, zeros = jnp.ones(c, jnp.float32), jnp.zeros(c, jnp.float32)
    x64 = np.asarray(x, np.float64)
    red = tuple(range(x64.ndim - 1))
    ref = (x64 - x64.mean(red)) / np.sqrt(x64.var(red) + 1e-5)
    out = {}
    for name in ("flax.linen", "batch_norm"):
        y, _ = jax.jit(contenders(shape)[name])(x, ones, zeros)
        out[name] = float(np.max(np.abs(np.asarray(y, np.float64) - ref)))
    return out


def _time(fns: dict[str, Callable], args, repeats: int) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    names = list(fns)
    for f in fns.values():
        jax.block_until_ready(f(*args))  # compile, and warm
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](*args))
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def measure(shape, repeats: int) -> dict:
    """Times (seconds, min over repeats) and pass counts of every contender at ``shape``."""
    x, scale, bias, w = _data(shape)
    size = int(np.prod(shape))
    fwds = contenders(shape)
    jf = {n: jax.jit(f) for n, f in fwds.items()}
    jg = {n: jax.jit(_grad_of(f)) for n, f in fwds.items()}
    res: dict = {"shape": list(shape), "fwd": _time(jf, (x, scale, bias), repeats)}
    res["grad"] = _time(jg, (x, scale, bias, w), repeats)
    res["passes_fwd"] = {
        n: count_passes(f.lower(x, scale, bias).compile().as_text(), size) for n, f in jf.items()
    }
    res["passes_grad"] = {
        n: count_passes(f.lower(x, scale, bias, w).compile().as_text(), size) for n, f in jg.items()
    }
    return res


def _fmt_passes(p: dict) -> str:
    text = f"{p['reduction']}R+{p['elementwise']}E"
    f = p.get("fallback", p)
    if (f["reduction"], f["elementwise"]) != (p["reduction"], p["elementwise"]):
        text += f", else {f['reduction']}R+{f['elementwise']}E"
    return text


def table(results: list[dict]) -> str:
    """A Markdown table: time per contender (us) and its ratio to Flax, forward and grad."""
    names = list(results[0]["fwd"])
    head = "| shape | mode | " + " | ".join(names) + " |"
    rows = [head, "|" + "---|" * (len(names) + 2)]
    for r in results:
        for mode in ("fwd", "grad"):
            base = r[mode]["flax.linen"]
            passes = r[f"passes_{mode}"]
            cells = [
                f"{r[mode][n] * 1e6:.0f} us ({r[mode][n] / base:.2f}x, {_fmt_passes(passes[n])})"
                for n in names
            ]
            shape = "x".join(map(str, r["shape"]))
            rows.append(f"| {shape} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is like 64x256; got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape needs >= 2 positive sizes; got {text!r}")
    return shape


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; print the table, the exactness check, and return everything.

    Parameters
    ----------
    argv : sequence of str, optional
        ``--shapes 64x256 256x1024 ...``, ``--repeats N`` (default 30), ``--json PATH``.
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", type=_shape, default=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1; got {args.repeats}")
    results = [measure(s, args.repeats) for s in args.shapes]
    exact = exactness()
    out = {
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "repeats": args.repeats,
        "results": results,
        "max_error_mean_1e6": exact,
    }
    print(table(results))
    print("max |y - y_ref| at mean 1e6, std 1, (1024, 16) float32:", exact)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
