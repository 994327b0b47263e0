"""What ``zen-node join`` shows while it trains: one line per round, and on a terminal a live status bar.

:class:`RoundProgress` is the trainer's ``on_round`` callback. Every round it prints the round's
line (the caller's ``print_line``, the same line whether or not stdout is a terminal, so logs and
pipes read as before). On a terminal it also keeps one status line at the bottom, redrawn in place
every second from a daemon thread::

    [#########...........] round 9/20 | eval loss 2.1043 | 812.4 samples/s | sent 3.12 MB | busy 84% | ...

The bar appears with the first round's line (before it, other lines such as "joined run ..." own the
terminal, and the log says what the node waits for). Log records (stderr, usually the same terminal)
would land on the status line, so while the bar is shown a logging filter clears the line before each
record; the next tick draws it again below.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from node.training.report import RoundReport

BAR_WIDTH = 20  # characters of the bar when the number of rounds is known
TICK_SECONDS = 1.0  # how often the status line is redrawn
_CLEAR = "\r\x1b[2K"  # carriage return, erase the whole line


class RoundProgress:
    """Print each round's line; on a terminal, keep a live status line below them.

    Args:
        print_line: prints one round's permanent line (to ``stream``).
        total_rounds: the round the node stops after (0: never), for the bar.
        stream: where the status line goes (sys.stdout if None).
        tty: whether to draw the status line; None asks ``stream.isatty()``.
    """

    def __init__(
        self,
        print_line: Callable[[RoundReport], None],
        total_rounds: int = 0,
        stream: TextIO | None = None,
        tty: bool | None = None,
    ):
        self.print_line = print_line
        self.total_rounds = total_rounds
        self.stream = stream if stream is not None else sys.stdout
        self.live = self.stream.isatty() if tty is None else tty
        self._last: RoundReport | None = None
        self._last_at = time.monotonic()  # when the last report came (or when we started)
        self._lock = threading.RLock()  # reentrant: a log record written while drawing clears the line
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="zen-progress", daemon=True)
        self._filter = _ClearLine(self)

    def start(self) -> RoundProgress:
        """Clear the status line before each log record (on a terminal only); return self."""
        if self.live:
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._filter)
        return self

    def __call__(self, report: RoundReport) -> None:
        with self._lock:
            self._clear()
            self.print_line(report)
            self._last, self._last_at = report, time.monotonic()
            self._draw()
            if self.live and not self._ticker.is_alive() and not self._stop.is_set():
                self._ticker.start()  # from the first round on: the bar is redrawn every second

    def status_line(self, now: float | None = None) -> str:
        """The live status line (no newline): the last report and the time since it; empty before one."""
        elapsed = (time.monotonic() if now is None else now) - self._last_at
        report = self._last
        if report is None:
            return ""
        parts = [f"round {report.round}" + (f"/{self.total_rounds}" if self.total_rounds else "")]
        if math.isfinite(report.eval_loss):
            parts.append(f"eval loss {report.eval_loss:.4f}")
        parts += [f"{report.samples_per_second:.1f} samples/s", f"sent {report.bytes_sent / 1e6:.2f} MB"]
        parts += [f"busy {report.utilization:.0%}", f"{elapsed:.1f} s into round {report.round + 1}"]
        line = " | ".join(parts)
        if self.total_rounds:
            done = min(BAR_WIDTH, BAR_WIDTH * report.round // self.total_rounds)
            line = f"[{'#' * done}{'.' * (BAR_WIDTH - done)}] {line}"
        return line

    def clear(self) -> None:
        """Erase the status line (before someone else writes to the terminal)."""
        with self._lock:
            self._clear()

    def close(self) -> None:
        """Stop redrawing, erase the status line and remove the logging filter (idempotent)."""
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join(timeout=5)
        if self.live:
            self.clear()
            for handler in logging.getLogger().handlers:
                handler.removeFilter(self._filter)

    def _tick(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            with self._lock:
                self._clear()
                self._draw()

    def _clear(self) -> None:
        if self.live and self._last is not None:
            self._write(_CLEAR)

    def _draw(self) -> None:
        if self.live and self._last is not None and not self._stop.is_set():
            self._write(self.status_line()[: max(self._width() - 1, 20)])  # a wrapped line cannot be erased

    def _width(self) -> int:
        """Columns of our terminal (80 when it does not say)."""
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError, AttributeError):
            return shutil.get_terminal_size().columns

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away (or the stream closed): stop drawing
            self.live = False


class _ClearLine(logging.Filter):
    """Erase the status line before a log record is written (it would otherwise share its line)."""

    def __init__(self, progress: RoundProgress):
        super().__init__()
        self._progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self._progress.clear()
        return True
