"""The demo's plan: which runs each phase trains, what they cost (for the ETA), and how a
learning rate is chosen on validation; see :mod:`.runner`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .ioffe_config import ARMS, IoffeConfig, RunSpec

# share of the step cap that a run stopping once fitted is expected to use (for the ETA only;
# calibrated on the default run: MNIST-1D runs fit after 55-100% of the cap, ghost runs are
# cheaper per step than the cost model says)
EXPECTED_FIT_FRACTION = {"reg": 0.85, "main": 0.7}

__all__ = [
    "MAX_GROUP_RUNS",
    "estimated_cost",
    "make_groups",
    "plan_phase1",
    "plan_phase2",
    "select_lr",
    "selected_rates",
    "weight_total",
]


def estimated_cost(group, n_in: int, config: IoffeConfig) -> float:
    """Rough milliseconds a group of runs takes on one core (for the progress bar's ETA only).

    Parameters
    ----------
    group : RunSpec or tuple of RunSpec
        One run, or runs trained together (:func:`make_groups`).
    n_in : int
        Input features of the runs' dataset.
    config : IoffeConfig

    Returns
    -------
    float
    """
    group = (group,) if isinstance(group, RunSpec) else tuple(group)
    spec = group[0]
    widths = (n_in, *spec.hidden, 10)
    macs = sum(a * b for a, b in zip(widths[:-1], widths[1:], strict=True))
    per_run = 1.0e-5 * macs * config.batch_size / 60  # three products per layer and step
    per_step = 0.15 + 0.06 * len(spec.hidden)  # Python and call overhead, once per group
    if spec.arm != "no_bn":
        kinds = len({s.ghost for s in group})
        per_step += len(spec.hidden) * 0.08 * kinds
        per_run += len(spec.hidden) * 0.01
    if spec.arm == "noisy_bn":
        per_run += 0.02 * len(spec.hidden)  # the noise draws (shared by a seed's runs)
    per_step += per_run * len(group)
    if spec.measure:
        per_step *= 1.2
    fraction = EXPECTED_FIT_FRACTION[spec.dataset] if spec.stop_at_fit else 1.0
    return per_step * spec.steps * 1.1 * fraction


# runs per batched group: large enough that one Python call serves many runs, small enough
# that a phase's groups spread over the workers (ghost and MNIST-1D groups are smaller)
MAX_GROUP_RUNS = 13
REG_GROUP_RUNS = 3


def make_groups(specs: list[RunSpec], max_runs: int = MAX_GROUP_RUNS) -> list[tuple[RunSpec, ...]]:
    """Split ``specs`` into groups trained as one batched model (:func:`.lockstep.train_group`).

    Runs that share :func:`.lockstep.group_key` (arm, network shape, schedule) go together,
    ordered by seed, in chunks of at most ``max_runs``; the grouping depends on the plan only,
    never on the number of workers, so the results do not either.

    Parameters
    ----------
    specs : list of RunSpec
    max_runs : int

    Returns
    -------
    list of tuple of RunSpec
    """
    from .lockstep import group_key

    by_key: dict[tuple, list[RunSpec]] = {}
    for s in specs:
        by_key.setdefault(group_key(s), []).append(s)
    groups = []
    for members in by_key.values():
        members = sorted(members, key=lambda s: (s.seed, specs.index(s)))
        cap = max_runs
        if members[0].dataset == "reg":  # small networks: per-step overhead, not arithmetic,
            cap = min(cap, REG_GROUP_RUNS)  # so split for balance over the workers
        n = -(-len(members) // cap)  # equal chunks
        size = -(-len(members) // n)
        groups += [tuple(members[i : i + size]) for i in range(0, len(members), size)]
    return groups


def plan_phase1(config: IoffeConfig, entropies: list[int]) -> list[RunSpec]:
    """The learning-rate sweep (all arms, rates, seeds) and the deep networks' sweep.

    Parameters
    ----------
    config : IoffeConfig
    entropies : list of int
        One seed entropy per seed.

    Returns
    -------
    list of RunSpec
    """
    specs = [
        RunSpec(
            arm,
            lr,
            s,
            e,
            config.steps,
            hidden=config.hidden,
            init_std=config.init_std,
            measure=True,
        )
        for s, e in enumerate(entropies)
        for arm in ARMS
        for lr in config.lrs
    ]
    specs += [
        RunSpec(
            arm, lr, s, e, config.deep_steps, hidden=config.deep_hidden, init_std=config.init_std
        )
        for s, e in enumerate(entropies)
        for arm in ("no_bn", "bn")
        for lr in config.deep_lrs
    ]
    return specs


def plan_phase2(
    config: IoffeConfig, entropies: list[int], selected: dict[str, float]
) -> list[RunSpec]:
    """Small initial scale, regularization and ghost batches, at the chosen rates.

    Parameters
    ----------
    config : IoffeConfig
    entropies : list of int
        One seed entropy per seed.
    selected : dict
        Arm -> learning rate chosen on validation.

    Returns
    -------
    list of RunSpec
    """
    specs = [
        RunSpec(
            arm,
            selected[arm],
            s,
            e,
            config.steps,
            hidden=config.hidden,
            init_std=config.small_init_std,
        )
        for s, e in enumerate(entropies)
        for arm in ARMS
    ]
    specs += [
        RunSpec(
            arm,
            selected[arm],
            s,
            e,
            config.reg_steps,
            dataset="reg",
            hidden=config.hidden,
            init_std=config.init_std,
            stop_at_fit=True,
        )
        for s, e in enumerate(entropies)
        for arm in ARMS
    ]
    specs += [
        RunSpec(
            "bn",
            selected["bn"],
            s,
            e,
            config.ghost_steps,
            hidden=config.hidden,
            init_std=config.init_std,
            ghost=k,
            stop_at_fit=True,
        )
        for s, e in enumerate(entropies)
        for k in config.ghost_sizes
    ]
    return specs


def select_lr(val_accuracy: dict[float, list[float]]) -> float:
    """The rate with the highest mean validation accuracy (ties: the smaller rate).

    Parameters
    ----------
    val_accuracy : dict
        Learning rate -> final validation accuracy per seed.

    Returns
    -------
    float
    """
    return max(sorted(val_accuracy), key=lambda lr: float(np.mean(val_accuracy[lr])))


def selected_rates(config: IoffeConfig, specs: list[RunSpec], outputs: dict) -> dict[str, float]:
    """Each arm's rate chosen on validation (:func:`select_lr`) from the sweep runs among
    ``specs`` and their ``outputs`` (RunSpec -> output of :func:`.ioffe.train_arm`)."""
    chosen = {}
    for arm in ARMS:
        val = {
            lr: [
                outputs[s]["final_val_accuracy"]
                for s in specs
                if s.arm == arm and s.lr == lr and s.measure
            ]
            for lr in config.lrs
        }
        chosen[arm] = select_lr(val)
    return chosen


def weight_total(weight: Callable[[RunSpec], float]) -> Callable[[RunSpec], float]:
    """Sort key: a run's estimated total cost.

    Parameters
    ----------
    weight : callable(group) -> float
        Estimated cost per step of a run or a group of runs.

    Returns
    -------
    callable(group) -> float
    """
    return lambda s: weight(s) * (s[0] if isinstance(s, tuple) else s).steps
