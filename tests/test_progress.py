"""Progress output that fits where it runs (issue 16): a live bar on a terminal, at most one
plain line per 10 % (and per 10 s) anywhere else."""

from __future__ import annotations

import io
import re
import sys

import pytest

from batchnorm_demo._progress import Progress, is_terminal


class FakeTerminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self):
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _drive(progress, clock, updates=1000, seconds_per_update=1.0, total=250.0):
    for i in range(1, updates + 1):
        clock.now += seconds_per_update
        progress(total * i / updates, total)


def test_the_streams_are_told_apart():
    assert is_terminal(FakeTerminal())
    assert not is_terminal(io.StringIO())
    closed = io.StringIO()
    closed.close()
    assert not is_terminal(closed)  # a closed stream raises ValueError on isatty
    assert not is_terminal(object())


def test_a_terminal_gets_the_live_bar():
    stream, clock = FakeTerminal(), Clock()
    progress = Progress("demo", unit="work", stream=stream, clock=clock)
    assert progress.terminal
    _drive(progress, clock, updates=50)
    text = stream.getvalue()
    assert "\r" in text  # redrawn in place
    assert "demo: 100%" in text
    assert progress.closed


def test_a_terminal_without_tqdm_gets_plain_lines(monkeypatch):
    """tqdm comes with the demo extra: ``batchnorm warmup`` on a bare install still shows
    its progress, as lines."""
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    stream, clock = FakeTerminal(), Clock()
    progress = Progress("warmup", unit="case", stream=stream, clock=clock)
    assert not progress.terminal
    _drive(progress, clock)
    text = stream.getvalue()
    assert "\r" not in text and text.splitlines()[-1].startswith("warmup: 100% after ")


def test_the_compile_notice_without_tqdm_is_a_plain_line(monkeypatch, capsys):
    from batchnorm_demo._common import notice_once
    from batchnorm_demo.warmup import COMPILE_NOTICE

    monkeypatch.setitem(sys.modules, "tqdm", None)
    say = notice_once()
    say()
    say()  # once only
    assert capsys.readouterr().err == COMPILE_NOTICE + "\n"


def test_a_log_gets_a_few_plain_lines_and_no_carriage_return():
    stream, clock = io.StringIO(), Clock()
    progress = Progress("demo", unit="work", stream=stream, clock=clock)
    assert not progress.terminal
    _drive(progress, clock)  # 1000 updates over 1000 s
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 5 <= len(lines) <= 11, lines  # one per 10 % and the end, not one per update
    percents = [int(re.match(r"demo: (\d+)% after ", line).group(1)) for line in lines]
    assert percents == sorted(percents) and percents[-1] == 100
    assert all(b - a >= 10 for a, b in zip(percents, percents[1:], strict=False))
    assert "left" in lines[0] and "left" not in lines[-1]
    assert lines[-1] == "demo: 100% after 16:40"


def test_a_fast_run_writes_no_line_more_often_than_every_ten_seconds():
    stream, clock = io.StringIO(), Clock()
    progress = Progress("bench", stream=stream, clock=clock)
    _drive(progress, clock, updates=1000, seconds_per_update=0.012)  # 12 s in all
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines  # the first line due after 10 s, and the end
    assert lines[-1].startswith("bench: 100% after 0:12")


def test_a_slow_run_still_shows_it_is_alive():
    """10 % taking half an hour: a heartbeat line every 5 minutes in between."""
    stream, clock = io.StringIO(), Clock()
    progress = Progress("demo", stream=stream, clock=clock)
    for minute in range(1, 31):
        clock.now = 60.0 * minute
        progress(minute / 300, 1.0)  # reaches 10 % at minute 30
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6, lines  # minutes 5, 10, ..., 30
    assert lines[0].startswith("demo: 2% after 5:00")


def test_closing_and_late_calls_write_nothing_more():
    stream, clock = io.StringIO(), Clock()
    progress = Progress("demo", stream=stream, clock=clock)
    clock.now = 20.0
    progress(3, 10)
    progress.close()
    progress.close()
    progress(10, 10)
    assert stream.getvalue().splitlines() == ["demo: 30% after 0:20, about 0:47 left"]


@pytest.mark.parametrize(
    "kwargs", [{"every_fraction": 0}, {"every_fraction": 1.5}, {"min_seconds": -1}]
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Progress("demo", stream=io.StringIO(), **kwargs)


def test_the_command_line_writes_plain_lines_into_a_log(monkeypatch, capsys):
    """Under pytest stderr is not a terminal: the CLI's progress must come out as lines."""
    import batchnorm_demo.bench
    from batchnorm_demo.cli import main

    def fake_run_bench(suite, repeats, progress=None):
        for i in range(1, 201):
            progress(i, 200)
        return {"rows": []}

    monkeypatch.setattr(batchnorm_demo.bench, "run_bench", fake_run_bench)
    monkeypatch.setattr(batchnorm_demo.bench, "format_bench", lambda result: "table")
    assert main(["bench", "--repeats", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    progress_lines = [line for line in err.splitlines() if line.startswith("bench: ")]
    assert 1 <= len(progress_lines) <= 11 and progress_lines[-1].startswith("bench: 100%")
