"""The one error type a user of the experiment scripts is meant to read."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class ExperimentError(ValueError):
    """A config, dataset or workdir the runner cannot use; the message says which and why.

    The command-line scripts print the message and exit with status 2, without a
    traceback.
    """


def run_command(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Runs a script's work; its errors and interrupts become a message and an exit status.

    :class:`ExperimentError`: the message, exit status 2. Ctrl-C at a safe point
    (:class:`experiments.interrupt.Interrupted`): its message, 130. A second Ctrl-C
    (``KeyboardInterrupt``): a one-line message, 130. Never a traceback for these.
    """
    from experiments.interrupt import Interrupted

    try:
        return fn(*args, **kwargs)
    except ExperimentError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    except Interrupted as error:
        print(f"\n{error}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
