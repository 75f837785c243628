"""Errors a user can fix. `python -m cl` prints the message (one sentence that
names the fix) and exits with status 2, without a traceback."""


class UserError(Exception):
    """Bad input: an option, a missing file, data or weights, a diverging run."""
