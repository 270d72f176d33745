"""Progress of a long job (train, distill, eval), readable wherever its stderr goes.

On a terminal: a tqdm bar, redrawn in place. Anywhere else (a redirected log, a cluster's log
collector) a bar's carriage returns make one endless, unreadable line, so there: one plain line
every `every_s` seconds, and one at the end, e.g.

    train: 120/1000 steps (12%), 2.31 steps/s, loss 2.4123, tok/s 5120, elapsed 52s, left 6m21s

`update(n)` and `set_postfix(...)` have tqdm's names, so code written against a tqdm bar (such as
generation.generate's `progress`) takes either. Lines go through the package logger, so under
several processes only rank 0 prints them.
"""
from __future__ import annotations

import sys
import time

from rega_engine.log import get_logger

log = get_logger(__name__)

DEFAULT_EVERY_S = 30.0


def format_seconds(seconds: float) -> str:
    """3.2s, 52s, 6m21s, 2h05m: short enough for a progress line."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """A tqdm bar on a terminal, plain timed lines elsewhere, or nothing (`enabled=False`).

    Use it as a context manager or call close(); `write(text)` prints a message without breaking
    the bar."""

    def __init__(self, total: int, *, desc: str, unit: str, enabled: bool = True,
                 every_s: float | None = None, initial: int = 0, stream=None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.enabled = enabled
        self.every_s = DEFAULT_EVERY_S if every_s is None else float(every_s)
        self.n = self._start_n = self._n_at_line = int(initial)
        self.postfix: dict[str, str] = {}
        self._stream = stream
        self._start = self._last_line = time.monotonic()
        self._bar = None
        self._closed = False
        if enabled and self._is_terminal():
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit,
                             dynamic_ncols=True, file=self._file())

    @property
    def is_bar(self) -> bool:
        return self._bar is not None

    def _file(self):
        return self._stream if self._stream is not None else sys.stderr   # looked up now

    def _is_terminal(self) -> bool:
        isatty = getattr(self._file(), "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:   # a closed stream
            return False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last_line >= self.every_s:
            self._line()

    def set_postfix(self, postfix: dict | None = None, refresh: bool = True, **more) -> None:
        """Short key -> value pairs shown after the count (loss, tok/s)."""
        self.postfix = {str(k): str(v) for k, v in {**(postfix or {}), **more}.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=refresh)

    def write(self, text: str) -> None:
        if self._bar is not None:   # printed above the bar, which stays whole
            self._bar.write(text, file=self._file())
        else:
            log.info(text)

    def line(self) -> str:
        """The plain progress line as it stands now."""
        elapsed = time.monotonic() - self._start
        done = self.n - self._start_n
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total > 0 else "")]
        if done > 0 and elapsed > 0:
            parts.append(f"{done / elapsed:.3g} {self.unit}s/s")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if 0 < done and self.n < self.total:
            parts.append(f"left {format_seconds(elapsed / done * (self.total - self.n))}")
        return ", ".join(parts)

    def _line(self) -> None:
        self._last_line, self._n_at_line = time.monotonic(), self.n
        log.info(self.line())

    def close(self) -> None:
        """Ends the bar; in plain mode, one last line when anything happened since the last."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n > self._n_at_line:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, *, desc: str, unit: str, enabled: bool = True,
             every_s: float | None = None, initial: int = 0) -> Progress:
    """The one call sites use: `with progress(len(items), desc="eval", unit="sample") as bar:
    ... bar.update(k)`. every_s: seconds between plain lines (default DEFAULT_EVERY_S)."""
    return Progress(total, desc=desc, unit=unit, enabled=enabled, every_s=every_s,
                    initial=initial)
