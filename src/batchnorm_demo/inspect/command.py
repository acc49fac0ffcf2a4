"""``batchnorm inspect``: its arguments (:func:`add_parser`) and its body (:func:`run_inspect`)."""

from __future__ import annotations

import argparse
import json

from .._cli_types import HelpFormatter, path

__all__ = ["add_parser", "layer_head", "run_inspect"]


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand to ``sub`` (the parser's subparsers); return it."""
    inspect = sub.add_parser(
        "inspect",
        formatter_class=HelpFormatter,
        help="describe a saved BatchNorm checkpoint (.npz or .safetensors)",
        description="Configuration, running statistics and their averaging window; with "
        "--batch, the per-feature gap between that batch's statistics and the running ones.",
    )
    inspect.add_argument("checkpoint", help="the .npz or .safetensors file")
    inspect.add_argument(
        "--batch", type=path("--batch", "a .npy file"), help="a .npy file with a batch of inputs"
    )
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=run_inspect)
    return inspect


def layer_head(config: dict) -> str:
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


def _load_batch(name: str | None):
    """The ``--batch`` array (one array from a .npy file, never pickled), or None."""
    import numpy as np

    if not name:
        return None
    try:
        batch = np.load(name, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"cannot read --batch {name}: {exc}") from exc
    if not isinstance(batch, np.ndarray):  # an .npz archive, not one array
        batch.close()
        raise ValueError(f"--batch {name} must be a .npy file holding one array")
    return batch


def _print_running(info: dict) -> None:
    """The running statistics' ranges and their averaging window, two lines."""
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


def run_inspect(args: argparse.Namespace) -> int:
    """``batchnorm inspect``: describe a saved layer (and a batch's gap to it).

    Parameters
    ----------
    args : argparse.Namespace
        The parsed arguments (``checkpoint``, ``batch``, ``json``).

    Returns
    -------
    int
        The exit status, 0.
    """
    from batchnorm.diagnostics import describe_checkpoint, json_safe

    info = describe_checkpoint(args.checkpoint, _load_batch(args.batch))
    if args.json:
        print(json.dumps(json_safe(info), indent=1, allow_nan=False))
        return 0
    tracked = info["num_batches_tracked"]
    print(
        f"{args.checkpoint}: {layer_head(info['config'])}; {tracked} "
        f"batch{'' if tracked == 1 else 'es'} tracked"
    )
    if "running_mean" in info:
        _print_running(info)
    if "train_eval_gap" in info:
        gap = info["train_eval_gap"]
        print(
            f"train/eval gap on {args.batch}: max |mean shift| "
            f"{gap['max_abs_mean_shift_in_std']:.3g} running std, max |log var ratio| "
            f"{gap['max_log_var_ratio']:.3g}"
        )
    return 0
