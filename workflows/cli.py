"""The way out of every entry point: a user's mistake ends in one line on stderr, not in a Python traceback.

    if __name__ == "__main__":
        sys.exit(run_cli(main))          # main(argv) -> int builds its parser with add_debug_flag(ap)

A mistyped config key, a missing data folder, a `--config` that is not YAML or a file that is not a checkpoint
raise one of the project's user-error exceptions (`rcm_core.config.ConfigError`, `rcm_core.data.latents.DatasetError` and
its `StorageError`/`BadRowError`, `WanCheckpointError`, or `UserError` here); `run_cli` prints `error: <message>`
and exits 2 for usage and config errors (argparse's own code for a bad command line) or 1 for the others.
`--debug` (or RCM_DEBUG=1) lets the exception through with its traceback. Anything else is a bug and keeps its
traceback. Test: `.venv/bin/python -m pytest -q tests/test_cli.py`.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

USAGE_EXIT = 2        # argparse's code for a bad command line; config errors are the same kind of mistake
FAILURE_EXIT = 1


class UserError(Exception):
    """A mistake in what the user passed that the project's own exceptions do not cover (e.g. a file that is not
    a checkpoint). Exits 1."""


class UsageError(UserError):
    """A command-line value that parses but names nothing (a run id MLflow does not know). Exits 2."""


def user_errors() -> tuple[type[BaseException], ...]:
    from rcm_core.config import ConfigError
    from rcm_core.data.latents import DatasetError
    from rcm_core.networks.wan_io import WanCheckpointError
    return ConfigError, DatasetError, WanCheckpointError, UserError


def exit_code(error: BaseException) -> int:
    from rcm_core.config import ConfigError
    return USAGE_EXIT if isinstance(error, (ConfigError, UsageError)) else FAILURE_EXIT


def add_debug_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--debug", action="store_true", help="on an error, print the full Python traceback")


def wants_debug(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("RCM_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """`main(argv)`'s exit code; a user error becomes `error: <message>` on stderr and exit 2 or 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    errors = user_errors()
    try:
        return main(argv)
    except errors as e:
        if wants_debug(argv):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return exit_code(e)
    except Exception as e:
        # Ray Train wraps a worker's exception (a teacher checkpoint that does not fit the config, raised where the
        # worker loads it): report the user's mistake inside it the same way, and let real failures through.
        cause = user_error_inside(e, errors)
        if cause is None or wants_debug(argv):
            raise
        print(f"error: {one_line(cause)}", file=sys.stderr)
        return exit_code(cause)


def user_error_inside(error: BaseException, errors: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first user error in `error`'s cause/context chain or, for Ray Train's failure, its workers' errors."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, errors):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
    return None


def one_line(error: BaseException) -> str:
    """The message on one line (a multi-line message keeps its lines, joined by '; ')."""
    text = str(error).strip() or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())
