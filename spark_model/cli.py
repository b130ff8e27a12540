"""The `spark` command: a root that gathers its subcommands from the installed packages.

Each package contributes its own subcommands through the entry-point group
``spark.commands`` (see pyproject.toml), the way pytest and llm find plugins: an entry's
name is the subcommand and its value a `Command`. The model package contributes `info`,
`generate` and `serve` (`spark_model.commands`); `train/`, `eval/` and `compiler/` add
theirs, so this package imports none of them and stays at the bottom of the import graph.

Only the chosen command's options are built, and a `Command` must be importable without
JAX, so `spark --help` starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from importlib import metadata
from typing import Callable

GROUP = "spark.commands"


@dataclasses.dataclass(frozen=True)
class Command:
    """One `spark` subcommand, as a package contributes it."""

    help: str  # one line for `spark --help`
    add_arguments: Callable[[argparse.ArgumentParser], object]  # declares the options
    run: Callable[[argparse.Namespace], int]  # runs them; returns the exit status
    description: str | None = None  # for `spark NAME --help` (default: `help`)


def commands() -> dict[str, Command]:
    """Every installed subcommand by name. One that fails to load is reported and skipped,
    so a broken plugin never takes the other commands down with it."""
    found: dict[str, Command] = {}
    for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name):
        try:
            cmd = ep.load()
            if not isinstance(cmd, Command):
                raise TypeError(f"{ep.value} is a {type(cmd).__name__}, not a spark Command")
        except Exception as e:  # noqa: BLE001 - any plugin failure is reported, not fatal
            print(f"spark: skipping command {ep.name!r}: {e}", file=sys.stderr)
            continue
        found.setdefault(ep.name, cmd)
    return found


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: every command listed, the chosen one with its options."""
    parser = argparse.ArgumentParser(
        prog="spark", description="Spark: a latency-first code model, its decode loop and "
                                  "its wafer-mapping compiler.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    found = commands()
    if not found:
        parser.error(f"no commands are installed (entry-point group {GROUP!r}); "
                     "install the package: pip install -e .")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, cmd in found.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help)
        if name == chosen:  # the others' options (and their imports) are never needed
            cmd.add_arguments(p)
            p.set_defaults(func=cmd.run)
    return parser


def _user_error(e: BaseException) -> bool:
    """Errors whose message is the whole story for a user (no traceback)."""
    if isinstance(e, (FileNotFoundError, ValueError, TypeError)):  # ConfigError is one
        return True
    if "spark_model.checkpoint" in sys.modules:  # only raised once a checkpoint was read
        return isinstance(e, sys.modules["spark_model.checkpoint"].CheckpointError)
    return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if os.environ.get("SPARK_DEBUG") or not _user_error(e):  # developers: the traceback
            raise
        print(f"spark {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # `python -m spark_model.cli`: use the importable module's
    from spark_model.cli import main as _main  # Command class, the one the plugins import

    sys.exit(_main())
