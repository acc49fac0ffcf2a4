"""The command line's argument types: integers, paths and a parser whose errors name the
flag once (each refused value gives exit status 2 before any work)."""

from __future__ import annotations

import argparse

__all__ = ["SEED_MAX", "HelpFormatter", "Parser", "integer", "path", "positive_int"]


class Parser(argparse.ArgumentParser):
    """An argument parser whose error messages name the flag once.

    argparse puts ``argument --steps: `` before a type's message; the types here name the
    flag themselves (``--steps must be an integer; got 'abc'``), so the prefix is dropped.
    """

    def error(self, message: str):
        """Exit with status 2 and ``message`` (without a repeated flag) on stderr."""
        head, sep, rest = message.partition(": ")
        if sep and head.startswith("argument "):
            names = head[len("argument ") :].split("/")
            if any(rest.startswith(f"{name} ") for name in names):
                message = rest
        super().error(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None) or it is a flag."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def integer(flag: str, low: int, high: int | None = None):
    """An argparse type: an integer in ``[low, high]``, with an error naming ``flag``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {low}; got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{flag} must be <= {high}; got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def positive_int(flag: str):
    """An argparse type: an integer >= 1, with an error naming ``flag``."""
    return integer(flag, 1)


def path(flag: str, what: str = "a folder"):
    """An argparse type: a non-empty path without NUL (what it names is checked later,
    before any work)."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{flag} must name {what}; got {text!r}")
        if "\x00" in text:
            raise argparse.ArgumentTypeError(f"{flag} must not contain a NUL character")
        return text

    parse.__name__ = "path"
    return parse


# seeds feed numpy's generators and mnist1d's global one (np.random.seed: < 2**32)
SEED_MAX = 2**32 - 1
