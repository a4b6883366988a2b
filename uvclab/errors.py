"""The one exception type for mistakes a user can make (bad budget, unknown model, missing data...).

Every message says what went wrong and how to fix it; the CLI prints it without a traceback.
"""


class UvclabError(ValueError):
    """A user-facing error whose message names the fix."""
