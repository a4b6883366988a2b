"""The one exception type for mistakes a user can make (bad budget, unknown model, missing data...).

Every message says what went wrong and how to fix it; the CLI prints it without a traceback. Two kinds are
named for the callers that act on them: `DiskFull` (a write ran out of space; nothing was replaced) and
`Preempted` (a stop signal ended a run after its checkpoint; the CLI exits with `Preempted.exit_status`).
"""


class UvclabError(ValueError):
    """A user-facing error whose message names the fix."""


class DiskFull(UvclabError):
    """A file could not be written for lack of space (or quota); the previous version of it is intact."""


class Preempted(UvclabError):
    """SIGTERM / SIGUSR1 stopped a run after the current step, with a checkpoint to continue from."""
    exit_status = 75  # EX_TEMPFAIL (sysexits.h): try again later, i.e. run the same command with --resume
