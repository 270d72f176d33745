"""One rank-aware logger for the whole package: `log = get_logger(__name__)`.

Messages go to stderr as plain lines (a CLI's output, not a log file's). Under several processes
only rank 0 speaks at INFO and below, so a 64-GPU job prints each line once; warnings and errors
come from every rank, tagged `[rank N]`, because a problem on one rank is exactly what must not be
hidden. The rank is read from torchrun's environment, so importing this never imports torch.
The handler is installed once on the package's root logger and does not propagate, so an
embedding program's own logging configuration neither doubles nor swallows these lines; it can
still attach handlers to "rega_engine" or raise its level.
"""
from __future__ import annotations

import logging
import os
import sys

ROOT = "rega_engine"


def process_rank() -> int:
    """This process's global rank as torchrun announces it (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def _several_processes() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or process_rank() == 0


class _RankFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING and _several_processes():
            return f"[rank {process_rank()}] {text}"
        return text


class _StderrHandler(logging.StreamHandler):
    """Always writes to the current sys.stderr (pytest and notebooks replace it)."""

    def __init__(self):
        super().__init__()
        self.addFilter(_RankFilter())
        self.setFormatter(_RankFormatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def get_logger(name: str = ROOT) -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        root.addHandler(_StderrHandler())
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")
