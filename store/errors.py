"""The one base class of every user-facing input error, and the check that required settings are set."""


class UsageError(ValueError):
    """A problem with what the user passed (a config value, a path, a file on disk); the message names the fix.

    Scripts catch it once and print ``error: <message>``; any other exception is a bug and shows its traceback.
    """


MISSING = "???"  # omegaconf's MISSING: a required config value nobody set


def require(cfg: object, *names: str) -> None:
    """Refuse a config whose required path settings ``names`` are unset (MISSING or empty)."""
    for name in names:
        if getattr(cfg, name) in (MISSING, "", None):
            raise UsageError(f"{name} is required; pass {name}=PATH")
