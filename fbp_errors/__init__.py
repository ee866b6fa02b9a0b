"""The one exception hierarchy of feedback-predictor.

Why a package of its own: every layer raises these -- ``models`` (checkpoints,
state layouts), ``core`` (settings, records, Redis and Kafka), ``stream``,
``trainer`` and the CLI -- and ``models`` must import nothing of the others,
so the root sits below all of them.  It imports nothing.

Catch a subclass where you know what went wrong; catch
:class:`FeedbackPredictorError` at a process boundary (the CLI) to print the
message, which always says what to fix.

* :class:`ConfigError` -- a setting, a command-line option or a model name the
  program refuses to run with.
* :class:`CheckpointError` -- a checkpoint that must not be loaded.
* :class:`DataError` -- bad data: a record, a stored state or a data file.
  A worker never stops for one: records are dead-lettered, states re-derived.
* :class:`InfrastructureError` -- Kafka, Redis or the local stack not doing
  what it must.  The only kind that may stop a worker (fail-stop, exit 75).
"""

from __future__ import annotations


class FeedbackPredictorError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(FeedbackPredictorError, RuntimeError):
    """A configuration the program refuses to run with; the message says what to fix."""


class CheckpointError(FeedbackPredictorError, RuntimeError):
    """A checkpoint that must not be loaded; the message says what to fix."""


class ModelRefused(CheckpointError):
    """A published model version a worker refuses to serve, with why
    (``reason``, a ``fbp_model_swaps_refused_total`` label):
    ``sha256_mismatch``, ``not_published`` or ``unloadable``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class DataError(FeedbackPredictorError, ValueError):
    """Data that cannot be used as it is (a record, a stored state, a data file)."""


class StateMismatch(DataError):
    """A stored user state written by another model family or state layout."""


class InfrastructureError(FeedbackPredictorError, RuntimeError):
    """Kafka, Redis or the local stack is unavailable or misbehaving."""


class StackError(InfrastructureError):
    """The local stack could not be brought to the asked state; the message says why."""


__all__ = [
    "FeedbackPredictorError", "ConfigError", "CheckpointError", "ModelRefused", "DataError",
    "StateMismatch", "InfrastructureError", "StackError",
]
