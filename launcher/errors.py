"""The one exception a user's mistake becomes. The CLI prints it as a paragraph, without a traceback."""


class FTLError(Exception):
    """A problem the user can fix: what went wrong, where (field or file), and how to fix it."""
