"""Allow ``python -m ursa`` (and ``torchrun -m ursa``)."""

from ursa.cli import entry

entry()
