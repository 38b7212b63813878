"""The one user-facing error of the ``tessera`` command and its subcommands (``train`` and
``demo`` included): :mod:`tessera.server.cli` prints its message and exits 1.

A module of its own, importing nothing, so that the subcommands' modules, which
:mod:`tessera.server.cli` imports, raise it without an import cycle.
"""


class CliError(Exception):
    """A user-facing failure (bad options, data, checkpoint, a missing redis-server or
    assets, a refused upload): the message is printed, the exit status is 1."""
