"""Errors a user can fix. The CLI prints their message as one line, without a traceback."""


class LeapdecodeError(Exception):
    """Base class for every error caused by input, settings or the environment (not by a bug)."""


class ModelNotFoundError(LeapdecodeError):
    """A model path, hub id or preset could not be found or is not installed."""


class IncompatibleDraftError(LeapdecodeError):
    """The draft model cannot draft for the target (e.g. a different tokenizer or vocabulary)."""


class InvalidSettingError(LeapdecodeError, ValueError):
    """A generation setting is out of range (temperature < 0, top_p outside (0, 1], ...)."""


class PromptTooLongError(LeapdecodeError):
    """The prompt (plus the tokens asked for) does not fit in the model's context."""
