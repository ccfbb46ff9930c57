"""The one exception a user's mistake becomes. The CLI prints it as a paragraph, without a traceback.

Defined in strategies/errors.py (the lowest layer, so strategies raise the same type without importing
launcher/) and re-exported here, where the rest of FTL looks for it."""

from strategies.errors import FTLError

__all__ = ["FTLError"]
