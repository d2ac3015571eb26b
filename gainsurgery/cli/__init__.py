"""The ``gainsurgery`` command line (click): parse -> one call -> print.

Each command parses its arguments, makes one call into the library (mostly
:mod:`gainsurgery.api`; ``apply`` builds its :class:`~gainsurgery.applying.options.ApplyOptions`
and runs the pipeline) and prints the result. The commands live by topic:
:mod:`~gainsurgery.cli.checkpoints` (apply, verify, targets), :mod:`~gainsurgery.cli.gains`
(stack, scale, invert, inspect), :mod:`~gainsurgery.cli.hub` (push) and
:mod:`~gainsurgery.cli.training` (train, eval, export-peft, import-peft, demo), all on
the one group :func:`main` (:mod:`~gainsurgery.cli.group`: one-line errors, exit
statuses, shared options). Commands that need an optional extra say which one, in one line.

``gainsurgery.cli:main`` is the console script; ``python -m gainsurgery.cli`` runs it too
(torchrun launches training that way).
"""

from __future__ import annotations

# Importing the command modules registers their commands on the group.
from gainsurgery.cli import checkpoints, gains, hub, training  # noqa: F401
from gainsurgery.cli.group import main

__all__ = ["main"]
