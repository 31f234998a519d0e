"""Errors a user can act on: the CLI prints them as one line, without a traceback."""


class DstuneError(Exception):
    """A runtime failure with a clear message (exit code 1)."""

    exit_code = 1


class InputError(DstuneError):
    """Bad input: a recipe key, a data file line, a missing path (exit code 2)."""

    exit_code = 2


class GateError(DstuneError):
    """A quality gate failed, e.g. general ability retention below the recipe's minimum (exit code 3)."""

    exit_code = 3
