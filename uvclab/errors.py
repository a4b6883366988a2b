"""The one exception type for mistakes a user can make (bad budget, unknown model, missing data...).

Every message says what went wrong and how to fix it; the CLI prints it without a traceback. Two kinds are
named for the callers that act on them: `DiskFull` (a write ran out of space; nothing was replaced) and
`Preempted` (a stop signal ended a run after its checkpoint; the CLI exits with `Preempted.exit_status`).
"""


class UvclabError(ValueError):
    """A user-facing error whose message names the fix."""


def one_of(obj, choices: dict, prefix: str = "") -> None:
    """Config fields with a fixed set of values: field name -> the allowed values."""
    for name, allowed in choices.items():
        if getattr(obj, name) not in allowed:
            raise UvclabError(f"{prefix}{name}={getattr(obj, name)!r} is not one of {tuple(allowed)}.")


def at_least_one(obj, names, prefix: str = "") -> None:
    """Config fields that are optional counts: None (no limit) or >= 1, else a clear error."""
    for name in names:
        if getattr(obj, name) is not None and getattr(obj, name) < 1:
            raise UvclabError(f"{prefix}{name} must be >= 1 (or null for no limit).")


class DiskFull(UvclabError):
    """A file could not be written for lack of space (or quota); the previous version of it is intact."""


class Preempted(UvclabError):
    """SIGTERM / SIGUSR1 stopped a run after the current step, with a checkpoint to continue from."""
    exit_status = 75  # EX_TEMPFAIL (sysexits.h): try again later, i.e. run the same command with --resume
