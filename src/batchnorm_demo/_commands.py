"""The ``batchnorm`` subcommands, one function each (the parser in :mod:`.cli` calls them):
each checks what it can before any work, runs, prints and returns the exit status."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ._progress import Progress

__all__ = ["run_bench", "run_demo", "run_inspect", "run_sync_demo", "run_warmup"]


def _notice_once():
    """A function that prints :data:`batchnorm_demo.warmup.COMPILE_NOTICE` once on stderr."""
    from ._progress import _tqdm
    from .warmup import COMPILE_NOTICE

    tqdm = _tqdm()

    said = []

    def say() -> None:
        if not said:
            said.append(True)
            if tqdm is None:  # no bar can be active: a plain line
                print(COMPILE_NOTICE, file=sys.stderr)
            else:  # tqdm.write keeps an active progress bar intact
                tqdm.write(COMPILE_NOTICE, file=sys.stderr)
            sys.stderr.flush()

    return say


def _check_out(out: str) -> Path:
    """Refuse an output folder that cannot be one (before any work is done)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"--out {out} exists and is not a folder; name a folder (it is created if missing)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create the folder ({exc.strerror})") from exc
    if not os.access(path, os.W_OK):
        raise ValueError(f"--out {out}: the folder is not writable")
    return path


def _check_dataset_flags(args: argparse.Namespace) -> None:
    """Refuse dataset flags that cannot work together, before any folder or data is touched."""
    if args.dataset == "mnist" and args.data is None:
        raise ValueError("--dataset mnist needs --data PATH (a folder of IDX files or an .npz)")
    if args.download and args.dataset != "mnist":
        default = " (the default)" if args.dataset == "mnist-subset" else ""
        raise ValueError(
            "--download fetches full MNIST: it needs --dataset mnist --data FOLDER; got "
            f"--dataset {args.dataset}{default}, which needs no download"
        )
    if args.data is not None and args.dataset == "mnist1d":
        raise ValueError("--data does not apply to --dataset mnist1d (it is generated offline)")


def _check_schedule(args: argparse.Namespace, steps: int) -> None:
    """Refuse an evaluation interval longer than the sweep runs, naming both values (no
    evaluation would fall inside a run: the claims would be judged from its two ends)."""
    if args.eval_every is None or args.eval_every <= steps:
        return
    if args.steps is not None:
        given = f"--steps {steps}"
    else:
        given = f"--steps ({steps}, the default{' of --full' if args.full else ''})"
    raise ValueError(
        f"--eval-every {args.eval_every} is larger than {given}: no evaluation would fall "
        f"inside a run; give --eval-every {steps} or less"
    )


def _machine() -> dict:
    """Where the demo ran (the report's reproducibility note): CPU, cores, library builds."""
    import platform

    import numba

    import batchnorm

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "batchnorm": batchnorm.__version__,
    }


def run_demo(args: argparse.Namespace) -> int:
    """``batchnorm demo``: run the experiments, write the report; return the exit status."""
    from .data import load_dataset
    from .experiments.ioffe import IoffeConfig
    from .experiments.runner import run
    from .report import format_table, write_report
    from .report.summary import summary_text
    from .warmup import notices_through

    _check_dataset_flags(args)
    config = IoffeConfig.full() if args.full else IoffeConfig()
    if args.steps is not None:
        config = config.scaled(args.steps)
    _check_schedule(args, config.steps)
    if args.eval_every is not None:
        config = replace(config, eval_every=args.eval_every)
    if args.seeds is not None:
        config = replace(config, seeds=args.seeds)
    if args.workers is not None:
        config = replace(config, workers=args.workers)
    out = _check_out(args.out)
    data = load_dataset(args.dataset, path=args.data, download=args.download, seed=args.seed)
    print(f"dataset: {data.description}", file=sys.stderr)
    notice = _notice_once()
    print(
        f"3 arms x {len(config.lrs)} learning rates x {config.seeds} seeds x {config.steps} "
        f"steps, then the small init, the deep network, {config.reg_dataset} and the "
        f"ghost-batch sweep, on {config.workers} worker(s)",
        file=sys.stderr,
    )
    start = time.monotonic()
    progress = None if args.quiet else Progress("demo", unit="work")
    try:
        # the kernels compile here with one worker, in the workers (which report it) else
        with notices_through(notice):
            results = run(
                config,
                np.random.default_rng(args.seed),
                data=data,
                progress=progress,
                on_compile=notice,
            )
    finally:
        if progress is not None:
            progress.close()  # an interrupted bar ends its line before the message
    results["wall_seconds"] = round(time.monotonic() - start, 1)
    results["seed"] = args.seed
    results["machine"] = _machine()
    summary = write_report(results, out)
    print(format_table(results, summary))
    print()
    print(summary_text(summary["claims"]))  # the report's opening table, for a terminal
    print(
        f"\nwrote {out}/results.json, report.md, report.html and figures "
        f"(training took {results['wall_seconds']:.0f} s)"
    )
    return 0


def run_bench(args: argparse.Namespace) -> int:
    """``batchnorm bench``: time the kernels, print the table (or JSON)."""
    import json

    from .bench import format_bench, run_bench
    from .warmup import notices_through

    with notices_through(_notice_once()):  # said only when something really compiles
        result = run_bench(
            "full" if args.full else "quick",
            repeats=args.repeats,
            progress=None if args.json else Progress("bench", unit="case"),
        )
    print(json.dumps(result, indent=1) if args.json else format_bench(result))
    return 0


def run_warmup(args: argparse.Namespace) -> int:
    """``batchnorm warmup``: compile every numba kernel once, say how long it took."""
    from batchnorm.backends import AUTO_NUMBA_MIN_SIZE

    from .warmup import DTYPES, notices_through, warmup, warmup_cases

    cases = warmup_cases()
    what = (
        f"{', '.join(DTYPES)} x {', '.join(dict.fromkeys(c.layout for c in cases))}; below "
        f"and above {AUTO_NUMBA_MIN_SIZE:,} elements"
    )
    with notices_through(_notice_once()):
        result = warmup(
            DTYPES, cases, progress=None if args.quiet else Progress("warmup", unit="case")
        )
    if result["compiled"]:
        print(
            f"warmup: compiled the numba kernels in {result['seconds']:.1f} s "
            f"({result['compiled']} compilations, {result['calls']} kernel calls: {what}); "
            "cached on disk, later runs load them from there"
        )
    else:
        print(
            f"warmup: every kernel was already cached ({result['calls']} kernel calls: {what}"
            f"; {result['seconds']:.1f} s)"
        )
    return 0


def _layer_head(config: dict) -> str:
    """A saved layer's configuration written as its constructor call, like its repr."""

    def plain(v):
        return tuple(plain(u) for u in v) if isinstance(v, (list, tuple)) else v

    cfg = dict(config)
    name = cfg.pop("class", "layer")
    args = []
    if "num_features" in cfg:
        nf = plain(cfg.pop("num_features"))
        args.append(repr(nf[0] if isinstance(nf, tuple) and len(nf) == 1 else nf))
    args += [f"{k}={plain(v)!r}" for k, v in cfg.items()]
    return f"{name}({', '.join(args)})"


def run_inspect(args: argparse.Namespace) -> int:
    """``batchnorm inspect``: describe a saved layer (and a batch's gap to it)."""
    import json

    from batchnorm.diagnostics import describe_checkpoint

    batch = None
    if args.batch:
        try:
            batch = np.load(args.batch, allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"cannot read --batch {args.batch}: {exc}") from exc
        if not isinstance(batch, np.ndarray):  # an .npz archive, not one array
            batch.close()
            raise ValueError(f"--batch {args.batch} must be a .npy file holding one array")
    info = describe_checkpoint(args.checkpoint, batch)
    if args.json:
        from batchnorm.diagnostics import json_safe

        print(json.dumps(json_safe(info), indent=1, allow_nan=False))
        return 0
    tracked = info["num_batches_tracked"]
    print(
        f"{args.checkpoint}: {_layer_head(info['config'])}; {tracked} "
        f"batch{'' if tracked == 1 else 'es'} tracked"
    )
    if "running_mean" in info:
        rm, rv, win = info["running_mean"], info["running_var"], info["averaging_window"]
        print(
            f"running mean in [{rm['min']:.4g}, {rm['max']:.4g}], running var in "
            f"[{rv['min']:.4g}, {rv['max']:.4g}]"
        )
        if win["kind"] == "exponential":
            print(
                f"averaging window: new-value weight {win['new_value_weight']:.4g}, "
                f"effective {win['effective_batches']:.1f} batches, half-life "
                f"{win['half_life_batches']:.1f} batches; the initial value still weighs "
                f"{win['initial_value_weight']:.3g}"
            )
        else:
            print(f"averaging window: {win['kind']} over {win['batches_tracked']} batches")
    if "train_eval_gap" in info:
        gap = info["train_eval_gap"]
        print(
            f"train/eval gap on {args.batch}: max |mean shift| "
            f"{gap['max_abs_mean_shift_in_std']:.3g} running std, max |log var ratio| "
            f"{gap['max_log_var_ratio']:.3g}"
        )
    return 0


def run_sync_demo(args: argparse.Namespace) -> int:
    """``batchnorm sync-demo``: the MPI experiments; rank 0 writes the report."""
    from ._ranks import collectively
    from .data import load_dataset
    from .experiments.sync import SyncConfig, _world, run
    from .report.sync import write_sync_report
    from .warmup import notices_through

    comm = _world()
    rank0 = comm.Get_rank() == 0
    # rank 0 checks --out before any work, every rank loads the data; a failure anywhere is
    # the same error on every rank (no rank is left waiting in a collective), printed once
    collectively(comm, lambda: _check_out(args.out) if rank0 else None, "checking --out")
    config = SyncConfig()
    if args.steps is not None:
        config = replace(config, small_batch_steps=args.steps)
    if args.seeds is not None:
        config = replace(config, seeds=args.seeds)
    data = collectively(comm, lambda: load_dataset("mnist-subset"), "loading the data")
    if rank0:
        print(
            f"sync-demo on {comm.Get_size()} rank(s); dataset: {data.description}", file=sys.stderr
        )
    # rank 0 says it once; the other ranks compile the same kernels silently
    watch = notices_through(_notice_once() if rank0 else lambda: None)
    progress = None if args.quiet or not rank0 else Progress("sync-demo", unit="step")
    try:
        with watch:
            results = run(config, data, comm=comm, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    if rank0:
        s = write_sync_report(results, args.out)
        print(
            f"SyncBN vs one process: max parameter difference after "
            f"{config.equivalence_steps} steps {s['sync_vs_single_process_max_param_diff']:.3g}"
            f"; local BN vs GhostBatchNorm: {s['local_vs_ghost_max_param_diff']:.3g}"
        )
        for row in s["small_batches"]:
            renorm = (
                f", BatchRenorm {100 * row['renorm_mean']:.1f}%" if "renorm_mean" in row else ""
            )
            print(
                f"per-rank batch {row['per_rank_batch']:>3}: local BN "
                f"{100 * row['local_bn_mean']:.1f}%, SyncBN {100 * row['sync_bn_mean']:.1f}%"
                + renorm
            )
        if "renorm_fixes_tiny_local_batches" in s:
            print(
                f"BatchRenorm fixes tiny local batches: {s['renorm_fixes_tiny_local_batches']}"
                f"; {s['renorm_why']}"
            )
        print(
            f"time/step local {s['local_median_step_ms']:.2f} ms, sync "
            f"{s['sync_median_step_ms']:.2f} ms; bytes/step local "
            f"{s['local_bytes_per_step']:,.0f}, sync {s['sync_bytes_per_step']:,.0f}"
        )
        print(
            f"wall time {s['wall_seconds']:.1f} s; wrote {args.out}/results.json, report.md, "
            "report.html and figures"
        )
    return 0
