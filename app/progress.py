"""Progress on long work, on stderr: a live bar on a terminal, plain periodic lines in logs.

    with Progress("pulling smollm2:135m", total=98_000_000) as bar:
        for n in chunks:
            bar.update(n)            # absolute amount done, not an increment

On a terminal the line is redrawn at most ~10 times a second. When the stream is not a terminal
(a CI log, a pipe) one line is written per 10% done, or every 30 s, whichever comes first, so a
long job never looks hung. `quiet=True` writes nothing. `NO_COLOR` turns colour off.

`stage_progress(...)` adapts this to the runtime's `(stage, done, total)` callback (`ProgressFn`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from types import TracebackType
from typing import TextIO

from llmapp.runtime.files.store import ProgressFn

__all__ = ["Progress", "StageProgress", "stage_progress", "human_bytes", "ProgressFn"]

_REDRAW_S = 0.1
_LOG_EVERY_S = 30.0
_LOG_STEP = 0.1
_FIGURES_ROOM = 48


def human_bytes(n: float) -> str:
    """Decimal units, as download tools and disk sizes show them: 98.0 MB, 1.2 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


def _use_color() -> bool:
    # https://no-color.org: any non-empty value turns colour off
    return not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class Progress:
    """One piece of long work: a bar on a terminal, a line per 10% or 30 s elsewhere.

    `delay` holds the display back until the work has taken that long, so quick work (a model
    that loads in 0.3 s) shows nothing at all.
    """

    def __init__(
        self,
        label: str,
        total: float | None,
        *,
        unit: str = "B",
        quiet: bool = False,
        stream: TextIO | None = None,
        delay: float = 0.0,
    ) -> None:
        self.label = label
        self.total = total if total is None or total > 0 else None
        self.unit = unit
        self.quiet = quiet
        self._stream = stream if stream is not None else sys.stderr
        self._tty = _is_tty(self._stream)
        self._color = self._tty and _use_color()
        self._unicode = "utf" in (getattr(self._stream, "encoding", None) or "").lower()
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._delay = delay
        self._done = 0.0
        self._detail = ""
        self._last_draw = 0.0
        self._last_log_time = self._start
        self._last_log_step = -1
        self._shown = False
        self._closed = False
        if quiet:
            return
        if delay <= 0:
            self._show(self._start)
        if delay > 0 or self.total is None:
            # Work of unknown size may send no update for a long while (a compile): a ticker
            # keeps the elapsed time moving, and starts a held-back display on time.
            threading.Thread(target=self._tick, name="llmapp-progress", daemon=True).start()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # After a failure the error message says enough: just leave the line clean.
        self.close(None if exc_type is None else "")

    def update(self, done: float, detail: str | None = None) -> None:
        """Record the absolute amount done; `detail` is extra text such as a running value."""
        if self.quiet or self._closed:
            return
        with self._lock:
            self._done = done
            if detail is not None:
                self._detail = detail
            now = time.monotonic()
            if not self._shown:
                if now - self._start >= self._delay:
                    self._show(now)
            elif self._tty:
                if now - self._last_draw >= _REDRAW_S or (self.total and done >= self.total):
                    self._draw(now)
            elif self._log_due(now):
                self._log(now)

    def set_total(self, total: float) -> None:
        """Give the size once it is known (work that learns it only after starting)."""
        with self._lock:
            self.total = total if total > 0 else None

    def close(self, message: str | None = None) -> None:
        """End the display: `message` replaces it; None writes a summary; "" writes nothing.

        Work that ended before the display began leaves only an explicit message."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            if self.quiet:
                return
            if message is None:
                message = self._summary(time.monotonic()) if self._shown else ""
            text = "\r\x1b[K" if self._tty and self._shown else ""
            self._write(text + (message + "\n" if message else ""))

    def _show(self, now: float) -> None:
        self._shown = True
        if self._tty:
            self._draw(now)
        else:
            self._log(now)

    # -- terminal ---------------------------------------------------------------------------

    def _draw(self, now: float) -> None:
        self._last_draw = now
        self._write("\r\x1b[K" + self._bar_line(now))

    def _bar_line(self, now: float) -> str:
        elapsed = now - self._start
        right = self._amount() + self._rate(elapsed)
        cols = self._columns() - 1  # the last column would wrap on some terminals
        if self.total:
            frac = min(max(self._done / self.total, 0.0), 1.0)
            if 0 < frac < 1 and elapsed > 0.5:
                right += f"  ETA {_duration(elapsed * (1 - frac) / frac)}"
            right = f" {frac * 100:3.0f}%  {right}" + (f"  {self._detail}" if self._detail else "")
            # A fixed room for the figures keeps the bar from jumping as their length changes.
            width = max(10, min(30, cols - len(self.label) - 1 - _FIGURES_ROOM))
            # Cut by visible length before colour codes are added.
            right = right[: max(0, cols - len(self.label) - 1 - width)]
            return f"{self.label} {self._bar(frac, width)}{right}"
        amount = f"  {right}" if self._done else ""
        line = f"{self.label}{amount}  {_duration(elapsed)}"
        return (line + (f"  {self._detail}" if self._detail else ""))[:cols]

    def _bar(self, frac: float, width: int) -> str:
        filled = int(frac * width)
        if self._color and self._unicode:
            head, tail = "━" * filled, "━" * (width - filled)
            return f"\x1b[32m{head}\x1b[2;37m{tail}\x1b[0m"
        return "#" * filled + "-" * (width - filled)

    def _columns(self) -> int:
        try:
            cols = os.get_terminal_size(self._stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            cols = 0
        return cols if cols >= 20 else 80  # a pty with no size set reports 0

    def _tick(self) -> None:
        while True:
            time.sleep(_REDRAW_S if self._tty or not self._shown else 1.0)
            with self._lock:
                if self._closed or self.quiet:
                    return
                now = time.monotonic()
                if not self._shown:
                    if now - self._start >= self._delay:
                        self._show(now)
                elif self.total is not None:
                    continue  # updates drive a display of known size
                elif self._tty:
                    self._draw(now)
                elif now - self._last_log_time >= _LOG_EVERY_S:
                    self._log(now)

    # -- logs -------------------------------------------------------------------------------

    def _log_due(self, now: float) -> bool:
        if self.total and self._step() > self._last_log_step:
            return True
        return now - self._last_log_time >= _LOG_EVERY_S

    def _step(self) -> int:
        if not self.total:
            return 0
        return int(min(self._done / self.total, 1.0) / _LOG_STEP + 1e-9)

    def _log(self, now: float) -> None:
        first = self._last_log_step < 0
        self._last_log_time = now
        self._last_log_step = self._step()
        elapsed = now - self._start
        if self.total:
            pct = f"{min(self._done / self.total, 1.0) * 100:.0f}%"
            line = f"{self.label}: {pct} ({self._amount()}{self._rate(elapsed)})"
        elif first and not self._done:
            line = f"{self.label} ..."  # the work has just begun (or come into view)
        else:
            amount = f"{self._amount()}, " if self._done else ""
            line = f"{self.label}: {amount}{_duration(elapsed)} elapsed"
        if self._detail:
            line += f" {self._detail}"
        self._write(line + "\n")

    # -- shared -----------------------------------------------------------------------------

    def _amount(self) -> str:
        if self.unit == "B":
            done = human_bytes(self._done)
            return f"{done} of {human_bytes(self.total)}" if self.total else done
        total = f"/{self.total:g}" if self.total else ""
        return f"{self.unit} {self._done:g}{total}" if self.unit else f"{self._done:g}{total}"

    def _rate(self, elapsed: float) -> str:
        if self.unit != "B" or elapsed < 0.5 or self._done <= 0:
            return ""
        return f", {human_bytes(self._done / elapsed)}/s"

    def _summary(self, now: float) -> str:
        took = f"{now - self._start:.1f} s"
        if self.unit == "B" and self._done:
            return f"{self.label}: {human_bytes(self._done)} in {took}"
        return f"{self.label}: done in {took}"

    def _write(self, text: str) -> None:
        if not text:
            return
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            # Progress is a courtesy: a closed or broken stderr must not stop the work itself.
            self.quiet = True


class StageProgress:
    """A `ProgressFn` (stage, done, total) shown as one `Progress` per stage."""

    def __init__(self, label: str = "", *, quiet: bool = False, stream: TextIO | None = None):
        self._label = label
        self._quiet = quiet
        self._stream = stream
        self._stage: str | None = None
        self._current: Progress | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage or self._current is None:
            self._finish_stage()
            self._stage = stage
            label = f"{self._label}: {stage}" if self._label and stage else (stage or self._label)
            self._current = Progress(label, total or None, quiet=self._quiet, stream=self._stream)
        self._current.update(done)

    def _finish_stage(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def close(self, message: str | None = None) -> None:
        """End the current stage's display; `message`, if any, is written last."""
        self._finish_stage()
        if message and not self._quiet:
            stream = self._stream if self._stream is not None else sys.stderr
            try:
                stream.write(message + "\n")
                stream.flush()
            except (OSError, ValueError):
                pass

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._current is not None:
            self._current.close(None if exc_type is None else "")
            self._current = None


def stage_progress(
    label: str = "", *, quiet: bool = False, stream: TextIO | None = None
) -> StageProgress:
    """The runtime's progress callback (`ProgressFn`) drawing through `Progress`; use it as
    `with stage_progress("pull x") as p: store.pull(name, progress=p)`."""
    return StageProgress(label, quiet=quiet, stream=stream)
