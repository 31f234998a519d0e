"""Errors a user can act on: the CLI prints them as one line, without a traceback."""

import functools


class DstuneError(Exception):
    """A runtime failure with a clear message (exit code 1)."""

    exit_code = 1


class InputError(DstuneError):
    """Bad input: a recipe key, a data file line, a missing path (exit code 2)."""

    exit_code = 2


class GateError(DstuneError):
    """A quality gate failed, e.g. general ability retention below the recipe's minimum (exit code 3)."""

    exit_code = 3


def phase(doing: str):
    """Decorator: an exception that leaves the function records what dstune was doing, e.g. "loading the model".

    The innermost phase wins (an outer one never overwrites it). The CLI names it in its one-line out-of-memory and
    disk-full messages (dstune.cli.resources).
    """

    def decorate(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except Exception as exc:
                if getattr(exc, "dstune_phase", None) is None:
                    try:
                        exc.dstune_phase = doing
                    except AttributeError:  # an exception type without a __dict__ cannot carry it
                        pass
                raise

        return run

    return decorate
