"""Errors a user can cause: every error class of the core lives here.

Every error that bad input, a bad file or a bad environment can trigger is a
:class:`GainSurgeryError`. The CLI prints its message on one line, without a
traceback, and exits non-zero. Anything else is a bug and raises normally.
(The lab package, :mod:`gainsurgery_lab`, adds its own subclasses for its
experiments.)
"""


class GainSurgeryError(Exception):
    """Base class: a problem the user can fix. The message says what and how."""


class GainFileError(GainSurgeryError):
    """A gain file is missing, malformed, or holds values we refuse to apply."""


class CheckpointError(GainSurgeryError):
    """A base checkpoint is missing, truncated, hostile or in an unsupported form."""


class ArchitectureError(GainSurgeryError):
    """The model type is unknown or its tensors do not match the registry."""


class PlanError(GainSurgeryError):
    """A gain does not fit the checkpoint, or the output location is unusable."""


class HubError(GainSurgeryError):
    """A Hugging Face Hub request failed (auth, not found, network, rate limit)."""


class TrainingError(GainSurgeryError):
    """Training was asked for something that cannot work (bad options, no data)."""


class DataError(GainSurgeryError):
    """A data file is missing, empty or in an unsupported format."""


class MissingExtraError(GainSurgeryError):
    """A command needs an optional extra (``pip install "gainsurgery[train]"``...) that is not installed."""


class UnsafeInputError(GainSurgeryError):
    """An input file resolves outside its folder, is not a regular file, or lies under /proc, /sys or /dev."""


class OutputError(GainSurgeryError):
    """An output location is unusable: it is, holds or lies inside an input, is protected, or is taken."""


class DomainError(GainSurgeryError):
    """A domain corpus (gainsurgery.corpora) could not be fetched, or is asked for before it was."""
