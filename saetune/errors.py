"""The one exception type a user is meant to read.

Every check on user input raises :class:`SaetuneError` with a sentence that names the bad
value and what would be valid. The CLI prints it without a traceback and exits with code 2.
"""


class SaetuneError(Exception):
    """A problem with the user's input, environment or run dir, explained in plain words."""
