"""What every ``python -m training.X`` command shares: the help formatter and
the ``run(argv)`` wrapper that turns the errors a user can cause into a message
and an exit status instead of a traceback."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

INTERRUPTED_TRAINING = "interrupted: the last completed epoch is in last.pt; continue with --resume"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default, except where there is none (an empty
    text, a flag that is off) or the help already says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == "" \
                or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def command(get_args_parser: Callable[[], argparse.ArgumentParser], main: Callable[[argparse.Namespace], object],
            user_errors: tuple[type[BaseException], ...], interrupted: str | None = None) -> Callable[..., int]:
    """``run(argv) -> exit status`` for a command: 2 with ``error: ...`` on stderr for
    ``user_errors``; 130 with ``interrupted`` on Ctrl-C where the command can say how
    to go on (otherwise the interrupt propagates)."""

    def run(argv: list[str] | None = None) -> int:
        args = get_args_parser().parse_args(argv)
        try:
            main(args)
        except user_errors as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if interrupted is None:
                raise
            print(interrupted, file=sys.stderr)
            return 130
        return 0

    return run
