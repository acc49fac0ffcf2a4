"""The demo's settings (:class:`IoffeConfig`) and one training run (:class:`RunSpec`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

__all__ = ["ARMS", "IoffeConfig", "RunSpec"]

ARMS = ("no_bn", "bn", "noisy_bn")


@dataclass(frozen=True)
class IoffeConfig:
    """Settings of the whole demo; the defaults fit in about four minutes on 2 cores.

    Attributes
    ----------
    steps : int
        SGD steps of each learning-rate-sweep run (the main comparison reuses these runs).
    batch_size : int
        Mini-batch size (60, as in the paper).
    hidden : tuple of int
        Hidden widths of the main network.
    init_std : float
        Standard deviation of the Gaussian initial weights.
    small_init_std : float
        The paper's "small Gaussian" initial scale, run at each arm's chosen rate.
    lrs : tuple of float
        The learning-rate grid, the same for every arm.
    bn_momentum : float
        Weight of the old running value in BatchNorm's running averages.
    seeds : int
        Seeds per setting.
    val_size : int
        Training items held out as the validation split (chooses the learning rates).
    eval_every : int
        Steps between evaluations of the accuracy curves.
    early_step : int
        The step at which "how fast" is read off (accuracy at that step).
    probe_every, probe_size : int
        Steps between probes of the layer-input distribution, and probe-set size.
    early_window : int
        Steps that count as "early" for the distribution change; later steps are "late".
    unit : int
        The unit of the last hidden layer whose percentiles are drawn in the figure.
    ics_every : int
        Steps between measurements of Santurkar et al.'s ICS.
    smooth_every : int
        Steps between measurements of the loss landscape's smoothness along the gradient
        (Santurkar et al. 2018, section 3; :mod:`.smoothness`), from step 0.
    smooth_multipliers : tuple of float
        Distances moved along the negative gradient, in multiples of the run's learning rate
        (1 is the step SGD takes).
    train_eval_size : int
        Training items evaluated for the training-accuracy curve (the final value uses all).
    deep_hidden, deep_lrs, deep_steps :
        The deep network (its learning rate is chosen on validation from ``deep_lrs``).
    reg_dataset, reg_steps :
        Dataset and length of the regularization runs (each arm at its chosen rate).
    ghost_sizes, ghost_steps :
        Virtual batch sizes of the ghost-batch sweep (inside batches of ``batch_size``), run on
        the main dataset at BN's chosen rate until fitted (at most ``ghost_steps``). Each
        size must divide ``batch_size`` (equal virtual batches).
    fit_threshold : float
        Training accuracy an arm must reach before its generalization is judged.
    workers : int
        Worker processes.
    dtype : {"float32", "float64"}
        Precision of the batched training (:mod:`.batched`); float32 halves the time of the
        matrix products. The one-by-one reference (:func:`.ioffe.train_arm`) is float64.
    noise : dict
        NoisyShift settings.
    """

    steps: int = 2000
    batch_size: int = 60
    hidden: tuple[int, ...] = (100, 100, 100)
    init_std: float = 0.1
    small_init_std: float = 0.01
    lrs: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
    bn_momentum: float = 0.9
    seeds: int = 3
    val_size: int = 1000
    eval_every: int = 250
    early_step: int = 500
    probe_every: int = 50
    probe_size: int = 500
    early_window: int = 1000
    unit: int = 0
    ics_every: int = 100
    smooth_every: int = 100
    smooth_multipliers: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    train_eval_size: int = 1000
    deep_hidden: tuple[int, ...] = (100,) * 8
    deep_lrs: tuple[float, ...] = (0.5, 2.0)
    deep_steps: int = 1000
    reg_dataset: str = "mnist1d"
    reg_steps: int = 15000
    ghost_sizes: tuple[int, ...] = (2, 4, 10, 20, 60)
    ghost_steps: int = 3000
    fit_threshold: float = 0.99
    workers: int = 2
    dtype: str = "float32"
    noise: dict = field(
        default_factory=lambda: {"mean_range": 0.5, "scale_range": 0.25, "jitter": 0.1}
    )

    def __post_init__(self):
        problems = []
        for name in (
            "steps",
            "seeds",
            "eval_every",
            "probe_every",
            "ics_every",
            "smooth_every",
            "deep_steps",
            "reg_steps",
            "ghost_steps",
            "probe_size",
            "train_eval_size",
            "early_step",
            "early_window",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 for batch statistics (got {self.batch_size})")
        if not self.hidden or not 0 <= self.unit < self.hidden[-1]:
            problems.append(f"unit {self.unit} must index the last hidden layer {self.hidden}")
        if any(r <= 0 for r in (*self.lrs, *self.deep_lrs)) or not self.lrs or not self.deep_lrs:
            problems.append("learning rates must be positive (and at least one given)")
        if any(k < 2 or k > self.batch_size or self.batch_size % k for k in self.ghost_sizes):
            problems.append(
                f"ghost sizes must divide batch_size {self.batch_size} and be >= 2; got "
                f"{self.ghost_sizes}"
            )
        if not self.smooth_multipliers or any(
            not (c > 0 and c < float("inf")) for c in self.smooth_multipliers
        ):
            problems.append(
                f"smooth_multipliers must be positive and finite; got {self.smooth_multipliers}"
            )
        if self.dtype not in ("float32", "float64"):
            problems.append(f"dtype must be 'float32' or 'float64'; got {self.dtype!r}")
        if problems:
            raise ValueError("invalid IoffeConfig: " + "; ".join(problems))

    @classmethod
    def full(cls, **overrides) -> IoffeConfig:
        """The long schedule of ``--full``: the paper's 50,000 steps, 5 seeds.

        Parameters
        ----------
        **overrides
            Fields to set on top of the long schedule.
        """
        base = dict(
            steps=50_000,
            seeds=5,
            eval_every=1000,
            probe_every=100,
            ics_every=500,
            smooth_every=500,
            early_step=1000,
            deep_steps=20_000,
            reg_steps=60_000,
            ghost_steps=10_000,
        )
        return cls(**{**base, **overrides})

    def scaled(self, steps: int) -> IoffeConfig:
        """The same design with ``steps`` sweep steps; the other schedules scale with it.

        Parameters
        ----------
        steps : int
            New number of sweep steps (``--steps``).
        """
        f = steps / self.steps

        def s(v):
            return max(1, int(round(v * f)))

        return replace(
            self,
            steps=steps,
            deep_steps=s(self.deep_steps),
            reg_steps=s(self.reg_steps),
            ghost_steps=s(self.ghost_steps),
            eval_every=min(self.eval_every, max(1, steps // 8)),
            early_step=s(self.early_step),
            early_window=s(self.early_window),
            probe_every=min(self.probe_every, max(1, steps // 10)),
            ics_every=min(self.ics_every, max(1, steps // 10)),
            smooth_every=min(self.smooth_every, max(1, steps // 10)),
        )

    def to_json(self) -> dict:
        """The settings as a JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class RunSpec:
    """One training run: which network, how trained, and with what seed.

    Attributes
    ----------
    arm : str
        One of :data:`ARMS`.
    lr : float
        SGD learning rate.
    seed : int
        Index of the seed (``seed_entropy`` is derived from it).
    seed_entropy : int
        Entropy of the run's generators: initial weights, batch order, noise and probe noise.
        The same entropy gives the same initial weights and batch order in every arm.
    steps : int
        SGD steps.
    dataset : str
        Key of the dataset the run uses (``"main"`` or ``"reg"``).
    hidden : tuple of int
        Hidden widths.
    init_std : float
        Initial weight scale.
    ghost : int or None
        Virtual batch size (GhostBatchNorm) instead of plain BatchNorm, for arm ``"bn"``.
    measure : bool
        Whether to probe distributions and measure ICS.
    stop_at_fit : bool
        Stop at the first evaluation where the accuracy on the whole training set reaches
        ``config.fit_threshold`` (``steps`` is then a cap).
    """

    arm: str
    lr: float
    seed: int
    seed_entropy: int
    steps: int
    dataset: str = "main"
    hidden: tuple[int, ...] = (100, 100, 100)
    init_std: float = 0.1
    ghost: int | None = None
    measure: bool = False
    stop_at_fit: bool = False
