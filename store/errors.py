"""The one base class of every user-facing input error."""


class UsageError(ValueError):
    """A problem with what the user passed (a config value, a path, a file on disk); the message names the fix.

    Scripts catch it once and print ``error: <message>``; any other exception is a bug and shows its traceback.
    """
