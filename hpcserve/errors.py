"""The tool's own error types. Anything raised as HpcserveError is a user-facing one-line message."""

from __future__ import annotations


class HpcserveError(Exception):
    """A mistake the user can fix; the CLI prints ``str(err)`` on one line and exits with ``exit_code``."""

    exit_code = 2


class RecipeError(HpcserveError):
    """A recipe, cluster profile or override that does not validate."""


class PlanError(HpcserveError):
    """A recipe that validates but cannot be laid out on nodes, GPUs or ports."""


class BackendError(HpcserveError):
    """Slurm or the local machine refused or failed to run something."""

    exit_code = 1


class UsageError(HpcserveError):
    """A process started with a command line it cannot run (a flag's value, a missing flag)."""
