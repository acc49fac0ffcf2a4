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


def _pick(specs: list[RunSpec], **kw) -> list[RunSpec]:
    """The runs whose fields have these values."""
    return [s for s in specs if all(getattr(s, k) == v for k, v in kw.items())]


def _lr_sweep(config: IoffeConfig, sweep_specs: list[RunSpec], outputs: dict) -> dict:
    """Per arm and rate, the sweep's final numbers per seed."""
    lr_sweep: dict = {}
    for arm in ARMS:
        lr_sweep[arm] = {}
        for lr in config.lrs:
            runs = _pick(sweep_specs, arm=arm, lr=lr)
            lr_sweep[arm][repr(lr)] = {
                "val_accuracy": _per_seed(outputs, runs, "final_val_accuracy"),
                "test_accuracy": _per_seed(outputs, runs, "final_test_accuracy"),
                "train_accuracy": _per_seed(outputs, runs, "final_train_accuracy"),
                "train_loss": _per_seed(outputs, runs, "final_train_loss"),
                "early_test_accuracy": _per_seed(outputs, runs, "early_test_accuracy"),
                "diverged": _per_seed(outputs, runs, "diverged"),
            }
    return lr_sweep


def _ioffe_arm(outs: list[dict], lr: float) -> dict:
    """One arm at its chosen rate: final numbers and curves per seed."""
    return {
        "lr": lr,
        "final_test_accuracy": [o["final_test_accuracy"] for o in outs],
        "final_train_accuracy": [o["final_train_accuracy"] for o in outs],
        "final_val_accuracy": [o["final_val_accuracy"] for o in outs],
        "final_train_loss": [o["final_train_loss"] for o in outs],
        "early_step": outs[0]["early_step"],
        "early_test_accuracy": [o["early_test_accuracy"] for o in outs],
        "curves": {
            "steps": outs[0]["curves"]["steps"],
            **{
                k: [o["curves"][k] for o in outs]
                for k in ("test_accuracy", "val_accuracy", "train_accuracy", "train_loss")
            },
        },
    }


def _distribution_arm(outs: list[dict], config: IoffeConfig) -> dict:
    """One arm's distribution change at its chosen rate, per seed."""
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
    return d


def _ics_arm(
    config: IoffeConfig, specs: list[RunSpec], outputs: dict, chosen: float, count: int
) -> dict:
    """One arm's internal covariate shift measure per rate, and at its chosen rate."""
    by_lr = {}
    for lr in config.lrs:
        rr = [outputs[s]["ics"] for s in sorted(_pick(specs, lr=lr), key=lambda s: s.seed)]
        by_lr[repr(lr)] = {
            "relative": [r["relative"] for r in rr],
            "cosine": [r["cosine"] for r in rr],
        }
    return {
        "lr": chosen,
        **by_lr[repr(chosen)],
        "by_lr": by_lr,
        "layer": "last hidden Linear layer (weights)",
        "measurements_per_run": count,
    }


def _at_chosen_rates(
    config: IoffeConfig, sweep_specs: list[RunSpec], outputs: dict, selected: dict
) -> tuple[dict, dict, dict]:
    """Per arm at its chosen rate: the ``ioffe``, ``distribution_change`` and ``ics`` keys."""
    ioffe, dist, ics = {}, {}, {}
    for arm in ARMS:
        runs = sorted(_pick(sweep_specs, arm=arm, lr=selected[arm]), key=lambda s: s.seed)
        outs = [outputs[s] for s in runs]
        ioffe[arm] = _ioffe_arm(outs, selected[arm])
        dist[arm] = _distribution_arm(outs, config)
        count = outs[0]["ics"]["count"]
        ics[arm] = _ics_arm(config, _pick(sweep_specs, arm=arm), outputs, selected[arm], count)
    return ioffe, dist, ics


def _init(
    config: IoffeConfig, phase2: list[RunSpec], outputs: dict, selected: dict, ioffe: dict
) -> dict:
    """The demo's initial scale (the sweep's runs) against the paper's small one."""
    init: dict = {repr(config.init_std): {}, repr(config.small_init_std): {}}
    for arm in ARMS:
        init[repr(config.init_std)][arm] = {
            "lr": selected[arm],
            "final_test_accuracy": ioffe[arm]["final_test_accuracy"],
            "final_train_accuracy": ioffe[arm]["final_train_accuracy"],
            "early_test_accuracy": ioffe[arm]["early_test_accuracy"],
        }
        runs = _pick(phase2, arm=arm, dataset="main", ghost=None)
        init[repr(config.small_init_std)][arm] = {
            "lr": selected[arm],
            "final_test_accuracy": _per_seed(outputs, runs, "final_test_accuracy"),
            "final_train_accuracy": _per_seed(outputs, runs, "final_train_accuracy"),
            "early_test_accuracy": _per_seed(outputs, runs, "early_test_accuracy"),
        }
    return init


def _deep(config: IoffeConfig, deep_specs: list[RunSpec], outputs: dict) -> dict:
    """The deep network without and with BN, each at its validation-chosen rate."""
    deep: dict = {}
    for arm in ("no_bn", "bn"):
        val = {
            lr: _per_seed(outputs, _pick(deep_specs, arm=arm, lr=lr), "final_val_accuracy")
            for lr in config.deep_lrs
        }
        lr = select_lr(val)
        runs = _pick(deep_specs, arm=arm, lr=lr)
        deep[arm] = {
            "lr": lr,
            "final_test_accuracy": _per_seed(outputs, runs, "final_test_accuracy"),
            "final_train_accuracy": _per_seed(outputs, runs, "final_train_accuracy"),
            "by_lr": {
                repr(r): {
                    "val_accuracy": val[r],
                    "test_accuracy": _per_seed(
                        outputs, _pick(deep_specs, arm=arm, lr=r), "final_test_accuracy"
                    ),
                }
                for r in config.deep_lrs
            },
        }
    return deep


def _regularization(
    config: IoffeConfig, phase2: list[RunSpec], outputs: dict, selected: dict, reg
) -> dict:
    """Each arm on the regularization dataset, trained until fitted."""
    regularization: dict = {
        "dataset": reg.summary() if reg is not None else None,
        "steps": config.reg_steps,
    }
    for arm in ARMS:
        runs = _pick(phase2, arm=arm, dataset="reg", ghost=None)
        regularization[arm] = {
            "lr": selected[arm],
            "final_test_accuracy": _per_seed(outputs, runs, "final_test_accuracy"),
            "final_train_accuracy": _per_seed(outputs, runs, "final_train_accuracy"),
            "steps_run": _per_seed(outputs, runs, "steps_run"),
        }
    return regularization


def _ghost(config: IoffeConfig, phase2: list[RunSpec], outputs: dict) -> dict:
    """Per ghost-batch size: accuracies and the train/eval gap, per seed."""
    ghost: dict = {}
    for k in config.ghost_sizes:
        runs = sorted(_pick(phase2, ghost=k), key=lambda s: s.seed)
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
    return ghost


def _cpu(phase1: list[RunSpec], phase2: list[RunSpec], outputs: dict) -> dict:
    """Runs and CPU seconds of each sub-experiment."""
    groups = {
        "lr_sweep": [s for s in phase1 if s.measure],
        "deep": [s for s in phase1 if not s.measure],
        "small_init": _pick(phase2, dataset="main", ghost=None),
        "regularization": _pick(phase2, dataset="reg"),
        "ghost": [s for s in phase2 if s.ghost is not None],
    }
    return {
        k: {"runs": len(v), "cpu_seconds": round(sum(outputs[s]["cpu_seconds"] for s in v), 1)}
        for k, v in groups.items()
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
    sweep_specs = [s for s in phase1 if s.measure]
    selected = selected_rates(config, sweep_specs, outputs)
    ioffe, dist, ics = _at_chosen_rates(config, sweep_specs, outputs, selected)
    smooth = {arm: _smoothness(outputs, _pick(sweep_specs, arm=arm), config, selected[arm])
              for arm in ARMS}  # fmt: skip
    return {
        "config": config.to_json(),
        "dataset": train.summary(),
        "ioffe": ioffe,
        "lr_sweep": _lr_sweep(config, sweep_specs, outputs),
        "selected_lr": selected,
        "init": _init(config, phase2, outputs, selected, ioffe),
        "deep": _deep(config, [s for s in phase1 if not s.measure], outputs),
        "distribution_change": dist,
        "ics": ics,
        "smoothness": smooth,
        "regularization": _regularization(config, phase2, outputs, selected, reg),
        "ghost": _ghost(config, phase2, outputs),
        "ghost_settings": {
            "lr": selected["bn"],
            "steps": config.ghost_steps,
            "batch_size": config.batch_size,
            "dataset": train.name,
        },
        "cpu_seconds": _cpu(phase1, phase2, outputs),
    }
