"""Errors of a training run, importable without the training stack (the CLI catches them)."""


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a dataset the model cannot read); the message says
    at which step and what to do."""
