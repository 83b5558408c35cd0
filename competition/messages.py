"""How errors and reports name many things at once: the first few, then how many more.

One format everywhere: `a, b, c ... and 7 more`.
"""
from __future__ import annotations

from collections.abc import Iterable


def first_few(values: Iterable, limit: int = 5, quote: bool = False, separator: str = ", ") -> str:
    """`values` joined by `separator`, at most `limit` of them, then `... and K more`; `quote` shows
    each with repr (strings quoted, so a blank or trailing space shows), else with str."""
    values = list(values)
    shown = separator.join(_quoted(v) if quote else str(v) for v in values[:limit])
    return shown if len(values) <= limit else f"{shown} ... and {len(values) - limit} more"


def _quoted(value) -> str:
    # str first: numpy's string scalars would otherwise show as np.str_('...')
    return repr(str(value)) if isinstance(value, str) else repr(value)
