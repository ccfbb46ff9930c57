"""The one exception type for user mistakes, in the lowest layer of FTL so that every package can raise
it: strategies/ depends on nothing of launcher/, and launcher/ and cluster/ re-export it."""


class FTLError(Exception):
    """A user-facing problem: one paragraph saying what is wrong, where, and how to fix it (exit code 2)."""
