"""The one error type a user of the experiment scripts is meant to read."""

from __future__ import annotations


class ExperimentError(ValueError):
    """A config, dataset or workdir the runner cannot use; the message says which and why.

    The command-line scripts print the message and exit with status 2, without a
    traceback.
    """
