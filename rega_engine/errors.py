"""One error family for everything a user can get wrong or a run can hit.

Every error the package raises on purpose is a `RegaError`; the CLI turns each into one line on
stderr and a non-zero exit (2 for a bad configuration or input, 1 for a run that cannot go on).
Importable without torch, so that the CLI and data boxes can catch them cheaply. The kinds also
derive from the builtin a caller would have caught before (ValueError, RuntimeError), so code
written against those keeps working.
"""
from __future__ import annotations


class RegaError(Exception):
    """Base of every deliberate rega-engine error; the message says what, where and what to do."""

    exit_code = 1


class ConfigError(RegaError, ValueError):
    """A configuration problem (run TOML, an override, a model's config.json); the message names
    the file and key."""

    exit_code = 2


class DataError(RegaError, ValueError):
    """Bad input data; the message is `path:line: reason` (or names the file for file errors)."""

    exit_code = 2

    def __init__(self, message: str, reason: str = "", path: str = "", line: int = 0):
        super().__init__(message)
        self.reason, self.path, self.line = reason, path, line


class RenderError(RegaError, ValueError):
    """A conversation that cannot be rendered with this tokenizer and template; `reason` is a short
    category for counting, the message says what to do."""

    exit_code = 2

    def __init__(self, message: str, reason: str = "cannot render"):
        super().__init__(message)
        self.reason = reason


class CheckpointError(RegaError, ValueError):
    """A checkpoint or model directory that is missing, unreadable or does not match the model."""

    exit_code = 2


class TrainingError(RegaError, RuntimeError):
    """The run cannot go on (a non-finite loss, a dataset the model cannot read); the message says
    at which step and what to do."""
