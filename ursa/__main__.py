"""Allow ``python -m ursa``."""

from ursa.cli import _entry

_entry()
