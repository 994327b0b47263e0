"""What ``zen-node join`` shows while it trains: one line per round, and on a terminal a live status bar.

:class:`RoundProgress` is the trainer's ``on_round`` callback (a sharded trainer's ``on_step``). Every
report it prints the report's line (the caller's ``print_line``, the same line whether or not stdout is
a terminal, so logs and pipes read as before). On a terminal it also keeps one status line at the
bottom, redrawn in place every second from a daemon thread::

    [#########...........] round 9/20 | inner step 12/30 | 5120 tokens/s | eval loss 2.1043 | ...

Given the trainer's :class:`~node.runtime.PhaseClock`, the line shows the inner step and the tokens per
second of the phase running now, and what a long wait waits for ("downloading the swarm's state (14 s)",
"waiting for round 3's group (6 s)"): from the moment the node joins, before the first round too. A
sharded trainer's line shows its step, loss, tokens per second, failovers and bans. Log records (stderr,
usually the same terminal) would land on the status line, so while the bar is live a logging filter clears
the line before each record; the next tick draws it again below. Other lines the CLI prints meanwhile go
through :meth:`RoundProgress.write_line`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO, cast

from node.config import NodeConfig
from node.metrics import NodeMetrics, start_node_metrics

if TYPE_CHECKING:
    from node.runtime import PhaseClock
    from node.sharding.trainer import ShardedTrainer, StepReport
    from node.training.report import RoundReport
    from node.training.trainer import TrainingNode

BAR_WIDTH = 20  # characters of the bar when the number of rounds is known
TICK_SECONDS = 1.0  # how often the status line is redrawn
_CLEAR = "\r\x1b[2K"  # carriage return, erase the whole line


def _megabytes(count: int) -> str:
    return "?" if count < 0 else f"{count / 1e6:.2f} MB"


def print_round(report: RoundReport) -> None:
    """A trainer's permanent line for one round (stdout, flushed)."""
    print(
        f"round {report.round:4d} | {report.mode:7s} | eval loss {report.eval_loss:.4f} | "
        f"train loss {report.train_loss:.4f} | {report.samples_per_second:8.1f} samples/s | "
        f"peers {report.group_size} | busy {report.utilization:4.0%} | sent {_megabytes(report.bytes_sent)}"
        + ("" if report.epsilon is None else f" | epsilon {report.epsilon:.3f}"),
        flush=True,
    )


def print_step(report: StepReport) -> None:
    """A sharded trainer's permanent line for one step (stdout, flushed)."""
    print(
        f"step {report.step:6d} | loss {report.loss:.4f} | {report.tokens_per_second:9.1f} tokens/s | "
        f"stage versions {report.versions} | failovers {report.failovers} | bans {report.bans}"
        + ("" if report.epsilon is None else f" | epsilon {report.epsilon:.3f}"),
        flush=True,
    )


class RoundProgress:
    """Print each round's line; on a terminal, keep a live status line below them.

    Args:
        print_line: prints one report's permanent line (to ``stream``).
        total_rounds: the round the node stops after (0: never), for the bar.
        stream: where the status line goes (sys.stdout if None).
        tty: whether to draw the status line; None asks ``stream.isatty()``.
        phases: the trainer's phase clock: the inner step, tokens/s and what a wait waits for.
        steps_per_round: a sharded trainer's steps per round (its reports are steps); 0 for rounds.
    """

    def __init__(
        self,
        print_line: Callable[[Any], None],
        total_rounds: int = 0,
        stream: TextIO | None = None,
        tty: bool | None = None,
        phases: PhaseClock | None = None,
        steps_per_round: int = 0,
    ):
        self.print_line = print_line
        self.total_rounds = total_rounds
        self.stream = stream if stream is not None else sys.stdout
        self.live = self.stream.isatty() if tty is None else tty
        self.phases = phases
        self.steps_per_round = steps_per_round
        self._last: RoundReport | StepReport | None = None
        self._last_at = time.monotonic()  # when the last report came (or when we started)
        self._drawn = False  # a status line is on the terminal now
        self._lock = threading.RLock()  # reentrant: a log record written while drawing clears the line
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="zen-progress", daemon=True)
        self._filter = _ClearLine(self)

    def start(self) -> RoundProgress:
        """On a terminal: clear the status line before each log record and, given a phase clock, start
        drawing (what the node waits for, before the first round too); return self."""
        if self.live:
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._filter)
            if self.phases is not None:
                self._ticker.start()
        return self

    def __call__(self, report: RoundReport | StepReport) -> None:
        with self._lock:
            self._clear()
            self.print_line(report)
            self._last, self._last_at = report, time.monotonic()
            self._draw()
            if self.live and not self._ticker.is_alive() and not self._stop.is_set():
                self._ticker.start()  # from the first report on: the bar is redrawn every second

    def write_line(self, text: str) -> None:
        """Print ``text`` as a permanent line above the status line."""
        with self._lock:
            self._clear()
            self._write(text + "\n")
            self._draw()

    def status_line(self, now: float | None = None) -> str:
        """The live status line (no newline): the last report, the phase running now and what a wait waits
        for; before the first report only the wait (empty when there is none)."""
        now = time.monotonic() if now is None else now
        report, waiting = self._last, self._waiting()
        if report is None:
            return waiting
        if hasattr(report, "step"):
            return self._step_line(cast("StepReport", report), waiting)
        return self._round_line(cast("RoundReport", report), waiting, now)

    def _round_line(self, report: RoundReport, waiting: str, now: float) -> str:
        """A trainer's line: round, inner step, tokens/s, held-out loss, samples/s, bytes, busy, and a wait."""
        parts = [f"round {report.round}" + (f"/{self.total_rounds}" if self.total_rounds else "")]
        inner = self.phases.inner_progress() if self.phases is not None else None
        if inner is not None:
            parts.append(f"inner step {inner.steps}" + (f"/{inner.total}" if inner.total else ""))
            parts.append(f"{inner.tokens_per_second:.0f} tokens/s")
        if math.isfinite(report.eval_loss):
            parts.append(f"eval loss {report.eval_loss:.4f}")
        parts += [f"{report.samples_per_second:.1f} samples/s", f"sent {report.bytes_sent / 1e6:.2f} MB"]
        since = f"{now - self._last_at:.1f} s into round {report.round + 1}"
        parts += [f"busy {report.utilization:.0%}", waiting or since]
        return self._bar(report.round, self.total_rounds) + " | ".join(parts)

    def _step_line(self, report: StepReport, waiting: str) -> str:
        """A sharded trainer's line: its step (and round), loss, tokens/s, failovers and bans."""
        total = self.total_rounds * self.steps_per_round
        parts = [f"step {report.step}" + (f"/{total}" if total else "")]
        if self.steps_per_round:
            round_no = report.step // self.steps_per_round
            parts.append(f"round {round_no}" + (f"/{self.total_rounds}" if self.total_rounds else ""))
        parts += [f"loss {report.loss:.4f}", f"{report.tokens_per_second:.0f} tokens/s"]
        parts += [f"failovers {report.failovers}", f"bans {report.bans}"]
        parts += ([] if report.epsilon is None else [f"epsilon {report.epsilon:.3f}"]) + ([waiting] if waiting else [])
        return self._bar(report.step, total) + " | ".join(parts)

    @staticmethod
    def _bar(done: int, total: int) -> str:
        if not total:
            return ""
        filled = min(BAR_WIDTH, BAR_WIDTH * done // total)
        return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "

    def _waiting(self) -> str:
        """What the most recently entered phase other than inner steps does, and for how long ("" if none)."""
        phases = self.phases
        running = [a for a in phases.running() if a.phase != "inner"] if phases is not None else []
        if phases is None or not running:
            return ""
        activity = running[-1]
        return f"{activity.detail or activity.phase} ({phases.now() - activity.since:.0f} s)"

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
        if self.live and self._drawn:
            self._write(_CLEAR)
            self._drawn = False

    def _draw(self) -> None:
        if self.live and not self._stop.is_set():
            line = self.status_line()[: max(self._width() - 1, 20)]  # a wrapped line cannot be erased
            if line:
                self._write(line)
                self._drawn = True

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


class JoinDisplay:
    """What ``zen-node join`` shows: the progress line (a live bar on a terminal) and, with a port, the metrics.

    Args:
        config: the node's configuration (``metrics_port``, the rounds, whether the run is sharded).
        cleanup: closes the bar and the metrics endpoint (after the node).
    """

    def __init__(self, config: NodeConfig, cleanup: contextlib.ExitStack):
        sharded = bool(config.run.sharding.stages)
        self.metrics: NodeMetrics | None = start_node_metrics(config.metrics_port, "sharded" if sharded else "trainer")
        if self.metrics is not None:
            cleanup.callback(self.metrics.stop)
            print(f"metrics: {self.metrics.url}", flush=True)
        self.progress = RoundProgress(
            print_step if sharded else print_round,
            config.rounds,
            steps_per_round=config.run.train.inner_steps if sharded else 0,
        )
        cleanup.callback(self.progress.close)

    def start(self, node: TrainingNode | ShardedTrainer) -> None:
        """Watch ``node``'s phases (and a sharded trainer's stage calls); draw from now on."""
        from node.sharding.trainer import ShardedTrainer  # loaded already by the caller, who built one

        self.progress.phases = node.phases
        if self.metrics is not None:
            self.metrics.watch_phases(node.phases)
            if isinstance(node, ShardedTrainer):
                sharded = node

                def stats() -> dict[str, int]:  # the stage client exists once the trainer joined
                    return dict(sharded.remote.stats) if sharded.remote is not None else {}

                def bans() -> int:
                    return len(sharded.remote.bans_published) if sharded.remote is not None else 0

                self.metrics.watch_stage_client(stats, bans)
        self.progress.start()

    def line(self, text: str) -> None:
        """Print ``text`` above the status line."""
        self.progress.write_line(text)

    def on_round(self, report: RoundReport) -> None:
        """The trainer's ``on_round``."""
        self.progress(report)
        if self.metrics is not None:
            self.metrics.observe(report)

    def on_step(self, report: StepReport) -> None:
        """The sharded trainer's ``on_step``."""
        self.progress(report)
        if self.metrics is not None:
            self.metrics.observe_step(report)
