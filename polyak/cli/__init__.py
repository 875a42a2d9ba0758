"""The ``polyak`` command line: merge, inspect, weights, demo and posthoc.

Each subcommand is a module of this package with ``NAME``, ``HELP``, ``add_arguments`` and
``run``, listed once in :data:`COMMANDS`; a new subcommand is one more module there. The
argument helpers they share live in :mod:`polyak.cli._args`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from polyak.cli import demo, inspect, merge, posthoc, weights
from polyak.cli._args import CliError, add_schedule_arguments, schedule_from_args

__all__ = ["main", "COMMANDS", "add_schedule_arguments", "schedule_from_args"]

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[..., int]]

COMMANDS: list[Command] = [
    (m.NAME, m.HELP, m.add_arguments, m.run) for m in (merge, inspect, weights, demo, posthoc)
]


def build_parser() -> argparse.ArgumentParser:
    """The ``polyak`` parser, with one subparser per entry of :data:`COMMANDS`."""
    from polyak import __version__

    parser = argparse.ArgumentParser(
        prog="polyak",
        description="Average model weights: merge checkpoints on disk in bounded memory.",
    )
    parser.add_argument("--version", action="version", version=f"polyak {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        # The subcommand's own parser: its usage line heads the errors found after parsing.
        p.set_defaults(run=run, parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``polyak`` command line (``polyak`` and ``python -m polyak`` call this).

    Bad input and refused writes print one line, ``polyak: error: ...``, on stderr, never a
    traceback; usage mistakes print argparse's usage line and that message.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 for an error (bad input, a failed write), 130 when
        interrupted.

    Raises:
        SystemExit: status 2 for a usage error, or 0 after ``--help``/``--version``
            (argparse's convention).

    Example:
        >>> main(["weights", "linear", "-n", "3"])
        linear(), n=3 (oldest first):
             0      0.166667  #############
             1      0.333333  ###########################
             2      0.500000  ########################################
           sum      1.000000
        0
    """
    from polyak._errors import PolyakError
    from polyak.cli._args import join_number_lists
    from polyak.safetensors._errors import OutputWriteError

    parser = build_parser()
    args = parser.parse_args(join_number_lists(sys.argv[1:] if argv is None else argv))
    # The commands report bad numbers themselves; numpy's own RuntimeWarnings (overflow in
    # a sum, ...) would only add raw library lines to the output.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="numpy")
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # here, so that a closed pipe is handled below
        return code
    except CliError as e:
        args.parser.error(str(e))  # `usage: polyak merge ...`, then exits with status 2
    except (PolyakError, OutputWriteError) as e:
        print(f"polyak: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of our output went away (`polyak inspect ... | head`): stop quietly, and
        # point stdout at /dev/null so that the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        # The system refused something (permissions, a path through a file): a one-line
        # message naming the path, not a traceback.
        print(f"polyak: error: {e}", file=sys.stderr)
        return 1
    except (OverflowError, MemoryError) as e:
        # A number beyond float range (--weights=1e308,1e308, --sigma-rel 1e-300) or a size
        # beyond memory: say so in one line rather than with a traceback.
        what = "a number is out of range" if isinstance(e, OverflowError) else "out of memory"
        print(f"polyak: error: {what} ({e}); use smaller or less extreme values", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("polyak: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
