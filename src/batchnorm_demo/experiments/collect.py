"""Arrange the outputs of every run of the demo as its results dict (JSON-ready)."""

from __future__ import annotations

from ..data import Dataset
from .ioffe_config import ARMS, IoffeConfig, RunSpec
from .plan import select_lr, selected_rates

__all__ = ["collect"]


def _per_seed(outputs: dict, specs: list[RunSpec], key: str) -> list:
    return [outputs[s][key] for s in sorted(specs, key=lambda s: s.seed)]


def _smoothness(outputs: dict, specs: list[RunSpec], config: IoffeConfig, chosen: float) -> dict:
    """One arm's smoothness measures (:mod:`.smoothness`) per rate: per seed the means over
    the run, and the curves over training."""
    by_lr = {}
    for lr in config.lrs:
        rr = [outputs[s]["smoothness"] for s in sorted(specs, key=lambda s: s.seed) if s.lr == lr]
        by_lr[repr(lr)] = {
            **{k: [r[k] for r in rr] for k in ("mean_loss_range", "mean_grad_change_max",
                                               "mean_beta")},
            "curves": {k: [r[k] for r in rr] for k in ("loss_min", "loss_max", "loss_range",
                       "grad_change_min", "grad_change_max", "beta")},
        }  # fmt: skip
    steps = outputs[specs[0]]["smoothness"]["steps"] if specs else []
    return {
        "lr": chosen,
        "steps": steps,
        "multipliers": list(config.smooth_multipliers),
        "by_lr": by_lr,
    }


def collect(
    config: IoffeConfig,
    phase1: list[RunSpec],
    phase2: list[RunSpec],
    outputs: dict,
    train: Dataset,
    reg: Dataset | None,
) -> dict:
    """Arrange the runs' outputs as the results dict (see the issue's key list).

    Parameters
    ----------
    config : IoffeConfig
    phase1, phase2 : list of RunSpec
    outputs : dict
        RunSpec -> output of :func:`train_arm`.
    train : Dataset
        The main dataset as trained on (validation split removed).
    reg : Dataset or None
        The regularization dataset.

    Returns
    -------
    dict
    """

    def pick(specs, **kw):
        return [s for s in specs if all(getattr(s, k) == v for k, v in kw.items())]

    sweep_specs = [s for s in phase1 if s.measure]
    lr_sweep: dict = {}
    for arm in ARMS:
        lr_sweep[arm] = {}
        for lr in config.lrs:
            runs = pick(sweep_specs, arm=arm, lr=lr)
            lr_sweep[arm][repr(lr)] = {
                "val_accuracy": _per_seed(outputs, runs, "final_val_accuracy"),
                "test_accuracy": _per_seed(outputs, runs, "final_test_accuracy"),
                "train_accuracy": _per_seed(outputs, runs, "final_train_accuracy"),
                "train_loss": _per_seed(outputs, runs, "final_train_loss"),
                "early_test_accuracy": _per_seed(outputs, runs, "early_test_accuracy"),
                "diverged": _per_seed(outputs, runs, "diverged"),
            }
    selected = selected_rates(config, sweep_specs, outputs)

    ioffe, dist, ics = {}, {}, {}
    for arm in ARMS:
        runs = sorted(pick(sweep_specs, arm=arm, lr=selected[arm]), key=lambda s: s.seed)
        outs = [outputs[s] for s in runs]
        steps = outs[0]["curves"]["steps"]
        ioffe[arm] = {
            "lr": selected[arm],
            "final_test_accuracy": [o["final_test_accuracy"] for o in outs],
            "final_train_accuracy": [o["final_train_accuracy"] for o in outs],
            "final_val_accuracy": [o["final_val_accuracy"] for o in outs],
            "final_train_loss": [o["final_train_loss"] for o in outs],
            "early_step": outs[0]["early_step"],
            "early_test_accuracy": [o["early_test_accuracy"] for o in outs],
            "curves": {
                "steps": steps,
                **{
                    k: [o["curves"][k] for o in outs]
                    for k in ("test_accuracy", "val_accuracy", "train_accuracy", "train_loss")
                },
            },
        }
        d = {
            "probe_steps": outs[0]["probe_steps"],
            "early_window": outs[0]["early_window"],
            "unit": config.unit,
            "layer": "input to the sigmoids of the last hidden layer",
        }
        for key in ("seen", "before_noise"):
            if key in outs[0]["distribution"]:
                dd = [o["distribution"][key] for o in outs]
                d[key] = {
                    "early": [x["early"] for x in dd],
                    "late": [x["late"] for x in dd],
                    "curve": [x["curve"] for x in dd],
                    "unit_percentiles_seed0": dd[0]["unit_percentiles"],
                }
        d["early"], d["late"] = d["seen"]["early"], d["seen"]["late"]
        dist[arm] = d
        by_lr = {}
        for lr in config.lrs:
            rr = [
                outputs[s]["ics"]
                for s in sorted(pick(sweep_specs, arm=arm, lr=lr), key=lambda s: s.seed)
            ]
            by_lr[repr(lr)] = {
                "relative": [r["relative"] for r in rr],
                "cosine": [r["cosine"] for r in rr],
            }
        ics[arm] = {
            "lr": selected[arm],
            **by_lr[repr(selected[arm])],
            "by_lr": by_lr,
            "layer": "last hidden Linear layer (weights)",
            "measurements_per_run": outs[0]["ics"]["count"],
        }

    smooth = {arm: _smoothness(outputs, pick(sweep_specs, arm=arm), config, selected[arm])
              for arm in ARMS}  # fmt: skip

    init: dict = {repr(config.init_std): {}, repr(config.small_init_std): {}}
    for arm in ARMS:
        init[repr(config.init_std)][arm] = {
            "lr": selected[arm],
            "final_test_accuracy": ioffe[arm]["final_test_accuracy"],
            "final_train_accuracy": ioffe[arm]["final_train_accuracy"],
            "early_test_accuracy": ioffe[arm]["early_test_accuracy"],
        }
        runs = pick(phase2, arm=arm, dataset="main", ghost=None)
        init[repr(config.small_init_std)][arm] = {
            "lr": selected[arm],
            "final_test_accuracy": _per_seed(outputs, runs, "final_test_accuracy"),
            "final_train_accuracy": _per_seed(outputs, runs, "final_train_accuracy"),
            "early_test_accuracy": _per_seed(outputs, runs, "early_test_accuracy"),
        }

    deep_specs = [s for s in phase1 if not s.measure]
    deep: dict = {}
    for arm in ("no_bn", "bn"):
        val = {
            lr: _per_seed(outputs, pick(deep_specs, arm=arm, lr=lr), "final_val_accuracy")
            for lr in config.deep_lrs
        }
        lr = select_lr(val)
        runs = pick(deep_specs, arm=arm, lr=lr)
        deep[arm] = {
            "lr": lr,
            "final_test_accuracy": _per_seed(outputs, runs, "final_test_accuracy"),
            "final_train_accuracy": _per_seed(outputs, runs, "final_train_accuracy"),
            "by_lr": {
                repr(r): {
                    "val_accuracy": val[r],
                    "test_accuracy": _per_seed(
                        outputs, pick(deep_specs, arm=arm, lr=r), "final_test_accuracy"
                    ),
                }
                for r in config.deep_lrs
            },
        }

    regularization: dict = {
        "dataset": reg.summary() if reg is not None else None,
        "steps": config.reg_steps,
    }
    for arm in ARMS:
        runs = pick(phase2, arm=arm, dataset="reg", ghost=None)
        regularization[arm] = {
            "lr": selected[arm],
            "final_test_accuracy": _per_seed(outputs, runs, "final_test_accuracy"),
            "final_train_accuracy": _per_seed(outputs, runs, "final_train_accuracy"),
            "steps_run": _per_seed(outputs, runs, "steps_run"),
        }
    ghost: dict = {}
    for k in config.ghost_sizes:
        runs = sorted(pick(phase2, ghost=k), key=lambda s: s.seed)
        outs = [outputs[s] for s in runs]
        ghost[str(k)] = {
            "final_test_accuracy": [o["final_test_accuracy"] for o in outs],
            "final_train_accuracy": [o["final_train_accuracy"] for o in outs],
            "steps_run": [o["steps_run"] for o in outs],
            "train_mode_test_accuracy": [
                o.get("train_mode_test_accuracy", float("nan")) for o in outs
            ],
            "train_eval_gap": [
                o.get("train_mode_test_accuracy", float("nan")) - o["final_test_accuracy"]
                for o in outs
            ],
        }
    ghost_meta = {
        "lr": selected["bn"],
        "steps": config.ghost_steps,
        "batch_size": config.batch_size,
        "dataset": train.name,
    }
    groups = {
        "lr_sweep": sweep_specs,
        "deep": deep_specs,
        "small_init": pick(phase2, dataset="main", ghost=None),
        "regularization": pick(phase2, dataset="reg"),
        "ghost": [s for s in phase2 if s.ghost is not None],
    }
    cpu = {
        k: {"runs": len(v), "cpu_seconds": round(sum(outputs[s]["cpu_seconds"] for s in v), 1)}
        for k, v in groups.items()
    }

    return {
        "config": config.to_json(),
        "dataset": train.summary(),
        "ioffe": ioffe,
        "lr_sweep": lr_sweep,
        "selected_lr": selected,
        "init": init,
        "deep": deep,
        "distribution_change": dist,
        "ics": ics,
        "smoothness": smooth,
        "regularization": regularization,
        "ghost": ghost,
        "ghost_settings": ghost_meta,
        "cpu_seconds": cpu,
    }
