"""The command line's edges (issue 8): each test fails on the CLI before its fix."""

from __future__ import annotations

import argparse

import pytest

import batchnorm
from batchnorm_demo.bench import command as bench_command
from batchnorm_demo.cli import build_parser, main
from batchnorm_demo.demo import command as demo_command
from batchnorm_demo.inspect import command as inspect_command
from batchnorm_demo.sync_demo import command as sync_demo_command


def _refuse_work(*args, **kwargs):
    raise AssertionError("the demo started working before checking its arguments")


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"batchnorm {batchnorm.__version__}"


@pytest.mark.parametrize("command, default", [("demo", "bn-demo"), ("bench", "10")])
def test_help_shows_defaults(command, default):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    assert f"(default: {default})" in sub.format_help()


def test_demo_out_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    import batchnorm_demo.data
    import batchnorm_demo.experiments.runner

    monkeypatch.setattr(batchnorm_demo.data, "load_dataset", _refuse_work)
    monkeypatch.setattr(batchnorm_demo.experiments.runner, "run", _refuse_work)
    target = tmp_path / "README.md"
    target.write_text("not a folder")
    assert main(["demo", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not a folder" in err
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["demo", "--steps", "-5"], "--steps"),
        (["demo", "--steps", "0"], "--steps"),
        (["demo", "--workers", "0"], "--workers"),
        (["demo", "--seeds", "0"], "--seeds"),
        (["demo", "--eval-every", "0"], "--eval-every"),
        (["bench", "--repeats", "0"], "--repeats"),
        (["demo", "--steps", "many"], "--steps"),
    ],
)
def test_non_positive_counts_are_refused_naming_the_flag(argv, flag, monkeypatch, capsys):
    monkeypatch.setattr(demo_command, "run_demo", _refuse_work)
    monkeypatch.setattr(bench_command, "run_bench", _refuse_work)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} must be" in err
    assert "IoffeConfig" not in err


def test_bench_says_it_is_compiling_when_a_kernel_compiles_and_only_then(monkeypatch, capsys):
    import numba

    import batchnorm_demo.bench
    from batchnorm_demo.warmup import COMPILE_NOTICE

    seen = []

    def fake_run_bench(suite, repeats, progress=None):
        if compile_now:
            numba.njit(lambda a: a + 1.0)(1.0)  # a real compilation, never cached
        seen.append(capsys.readouterr().err)  # what was printed once the slow part began
        return {"rows": []}

    monkeypatch.setattr(batchnorm_demo.bench, "run_bench", fake_run_bench)
    monkeypatch.setattr(batchnorm_demo.bench, "format_bench", lambda result: "table")
    compile_now = True
    assert main(["bench", "--repeats", "1"]) == 0
    compile_now = False
    assert main(["bench", "--repeats", "1"]) == 0
    assert COMPILE_NOTICE in seen[0] and COMPILE_NOTICE not in seen[1]


def _subparsers():
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices


def _valued_options():
    """(subcommand, option) for every option of every subcommand that takes a value."""
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if action.option_strings and action.nargs is None and action.const is None:
                if action.dest != "help":
                    yield name, action


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["demo", "--seed", "-1"], "--seed"),
        (["demo", "--seed", "1.5"], "--seed"),
        (["demo", "--seed", str(2**32)], "--seed"),
        (["demo", "--workers", "-1"], "--workers"),
        (["demo", "--out", ""], "--out"),
        (["demo", "--data", " "], "--data"),
        (["inspect", "x.npz", "--batch", ""], "--batch"),
        (["sync-demo", "--steps", "0"], "--steps"),
        (["sync-demo", "--seeds", "-2"], "--seeds"),
        (["sync-demo", "--out", ""], "--out"),
        (["bench", "--repeats", "-3"], "--repeats"),
        (["bench", "--repeats", "nan"], "--repeats"),
    ],
)
def test_bad_values_are_refused_by_the_parser_before_any_work(
    argv, flag, tmp_path, monkeypatch, capsys
):
    """Exit status 2 and a message naming the flag and the value; nothing is created."""
    import batchnorm_demo.data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(batchnorm_demo.data, "load_dataset", _refuse_work)
    for module, command in (
        (demo_command, "run_demo"),
        (bench_command, "run_bench"),
        (inspect_command, "run_inspect"),
        (sync_demo_command, "run_sync_demo"),
    ):
        monkeypatch.setattr(module, command, _refuse_work)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} must" in err, err
    assert repr(argv[-1]) in err or argv[-1] in err  # the value refused
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--download"], "--download"),
        (["demo", "--dataset", "mnist1d", "--data", "x.npz"], "--data"),
        (["demo", "--dataset", "mnist"], "needs --data"),
    ],
)
def test_dataset_flags_that_cannot_work_are_refused_before_the_output_folder(
    argv, words, tmp_path, monkeypatch, capsys
):
    import batchnorm_demo.data

    monkeypatch.setattr(batchnorm_demo.data, "load_dataset", _refuse_work)
    out = tmp_path / "never"
    assert main([*argv, "--out", str(out)]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "command, action", list(_valued_options()), ids=[f"{c} {a.dest}" for c, a in _valued_options()]
)
def test_every_option_that_takes_a_value_checks_it(command, action):
    """No option takes its value unchecked: a choice list or a checking type."""
    assert action.choices is not None or action.type is not None, (command, action.dest)
    if action.type is not None and action.type.__name__ == "integer":
        for bad in ("-1", "nan", "inf", "1e3", ""):
            with pytest.raises(argparse.ArgumentTypeError):
                action.type(bad)


@pytest.mark.parametrize(
    "make, head",
    [
        (lambda: batchnorm.BatchNorm(64), "BatchNorm(64, convention='seed', axis=1, "),
        (
            lambda: batchnorm.BatchNorm((4, 5), axis=(1, 2)),
            "BatchNorm((4, 5), convention='seed', axis=(1, 2), ",
        ),
        (
            lambda: batchnorm.GhostBatchNorm(64, virtual_batch_size=4),
            "GhostBatchNorm(64, convention='seed', axis=1, ",
        ),
    ],
    ids=["BatchNorm(64)", "two feature axes", "GhostBatchNorm"],
)
def test_inspect_names_the_layer_as_its_constructor_call(make, head, tmp_path, capsys):
    """``BatchNorm(64)``, not ``BatchNorm(64,)``: the layer's repr, arguments as given."""
    import numpy as np

    layer = make()
    shape = (8, 4, 5) if head.startswith("BatchNorm((4") else (8, 64)
    layer(np.random.default_rng(0).standard_normal(shape))
    path = tmp_path / "bn.npz"
    layer.save(path)
    assert main(["inspect", str(path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{path}: {head}"), first
    assert ",)" not in first and "[" not in first
    assert first.endswith("; 1 batch tracked")
    assert repr(layer).startswith(first.split(": ", 1)[1].split(")")[0])


def test_a_bad_value_names_its_flag_once(monkeypatch, capsys):
    """``--steps abc`` used to print 'argument --steps: --steps must be an integer'."""
    monkeypatch.setattr(demo_command, "run_demo", _refuse_work)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--steps", "abc"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "batchnorm demo: error: --steps must be an integer; got 'abc'"
    assert last.count("--steps") == 1


def test_other_parser_errors_keep_their_argument_prefix(capsys):
    """Only a message that already names its flag loses argparse's prefix."""
    with pytest.raises(SystemExit):
        main(["demo", "--dataset", "cifar"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --dataset: invalid choice: 'cifar'" in last


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--steps", "100", "--eval-every", "1000"], ("--eval-every 1000", "--steps 100")),
        (["--eval-every", "2001"], ("--eval-every 2001", "--steps (2000, the default)")),
        (["--steps", "7", "--eval-every", "8"], ("--eval-every 8", "--steps 7")),
    ],
)
def test_an_evaluation_interval_longer_than_the_run_is_refused(
    argv, words, tmp_path, monkeypatch, capsys
):
    """``--steps 100 --eval-every 1000`` used to run and judge claims from two points."""
    import batchnorm_demo.data

    monkeypatch.setattr(batchnorm_demo.data, "load_dataset", _refuse_work)
    out = tmp_path / "never"
    assert main(["demo", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv", [["--steps", "100", "--eval-every", "100"], ["--eval-every", "2000"]]
)
def test_an_evaluation_interval_up_to_the_run_length_is_accepted(argv, tmp_path, monkeypatch):
    """The negative control: the check refuses only intervals longer than the run."""
    import batchnorm_demo.data

    monkeypatch.setattr(batchnorm_demo.data, "load_dataset", _refuse_work)
    with pytest.raises(AssertionError, match="started working"):
        main(["demo", *argv, "--out", str(tmp_path / "out")])


def test_download_without_full_mnist_names_both_flags(tmp_path, monkeypatch, capsys):
    import batchnorm_demo.data

    monkeypatch.setattr(batchnorm_demo.data, "load_dataset", _refuse_work)
    assert main(["demo", "--download", "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "--download" in err and "--dataset mnist " in err and "mnist-subset" in err
    assert not (tmp_path / "never").exists()


def test_the_command_names_known_before_parsing_are_the_parsers():
    """cli.COMMANDS names the command in a stop line that comes before the parser exists; it
    must list exactly the parser's subcommands."""
    from batchnorm_demo import cli

    subs = build_parser()._subparsers._group_actions[0].choices
    assert tuple(subs) == cli.COMMANDS


def test_the_demo_help_states_the_true_schedules():
    """--full runs IoffeConfig.full(): its help says so (it once said 3 seeds for 5)."""
    from batchnorm_demo.experiments.ioffe_config import IoffeConfig

    full, default = IoffeConfig.full(), IoffeConfig()
    text = " ".join(_subparsers()["demo"].format_help().split())
    assert f"{full.steps:,} steps per sweep run, {full.seeds} seeds" in text
    assert f"seeds per setting ({default.seeds}; {full.seeds} with --full)" in text
    assert f"({default.steps}; {full.steps} with --full;" in text
