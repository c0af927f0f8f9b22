"""Command-line values as bundle configs receive them.

``python -m monai.bundle run ... --key value`` parses values with python-fire, which turns ``True``/``False``
into booleans but leaves ``true``/``false`` as strings, and the string ``"false"`` is truthy. Configs read their
on/off settings through :func:`as_flag` so that every common spelling works.
"""

from __future__ import annotations

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", "none", "null", ""}


def as_flag(value, name: str = "flag") -> bool:
    """Return ``value`` as a bool: a bool, 0/1, or a string such as true/false, yes/no, on/off (any case)."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"--{name} must be true or false, got {value!r}")
