"""Progress of a long loop: a tqdm bar on a terminal, a plain log line every minute elsewhere.

A bar redraws itself about ten times a second; in a batch job's log file (SLURM output, `nohup`)
every redraw stays, which over a week-long run is hundreds of megabytes of bars. So when stderr is
not a terminal, :func:`progress_bar` returns :class:`LogProgress`, which logs one line at most every
``interval_s`` seconds (and one at the end)::

    INFO reglue.progress: train: 12,400/400,000 step (3.1 %), 3.42 step/s, ETA 1d 7h 29m; loss 0.5123

tqdm has no such plain-line mode (on a file it still redraws with carriage returns), hence this class.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)

LOG_EVERY_S = 60.0


def duration(seconds: float) -> str:
    """``'1d 7h 29m'``, ``'7h 29m'``, ``'29m 5s'`` or ``'5s'``."""
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


class LogProgress:
    """The part of tqdm's interface the project uses (update, set_postfix, reset, close, context manager),
    reported as a log line every ``interval_s`` seconds and once when closed."""

    def __init__(self, *, total: int | None, desc: str, unit: str, initial: int = 0,
                 interval_s: float = LOG_EVERY_S, clock=time.monotonic):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.interval_s, self.clock = interval_s, clock
        self.postfix = ""
        self._started = self._last_line = clock()
        self._first = self._n_at_last_line = initial
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self._last_line >= self.interval_s:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def reset(self, total: int | None = None) -> None:
        """Start counting again from 0 towards ``total`` (what is known once the work is planned)."""
        self.total, self.n, self._first = total, 0, 0
        self._n_at_last_line, self._started = 0, self.clock()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._n_at_last_line:  # what the last line did not report yet
                self._line()

    def __enter__(self) -> LogProgress:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _line(self) -> None:
        now = self.clock()
        self._last_line, self._n_at_last_line = now, self.n
        rate = (self.n - self._first) / max(now - self._started, 1e-9)
        done = f"{self.n:,}"
        if self.total:
            done += f"/{self.total:,} {self.unit} ({100 * self.n / self.total:.1f} %)"
            eta = f", ETA {duration((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        else:
            done += f" {self.unit}"
            eta = ""
        log.info("%s: %s, %.3g %s/s%s%s", self.desc, done, rate, self.unit, eta,
                 f"; {self.postfix}" if self.postfix else "")


class _Silent:
    """A progress object that reports nothing (a disabled bar, or another process than the main one)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def reset(self, total: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:  # noqa: PYI034
        return self

    def __exit__(self, *exc_info) -> None:
        pass


def progress_bar(*, total: int | None, desc: str, unit: str, initial: int = 0, enabled: bool = True,
                 unit_scale: bool = False, terminal: bool | None = None):
    """A tqdm bar on a terminal or in a notebook (``terminal``: override the check), else :class:`LogProgress`;
    nothing at all when not ``enabled``. ``unit_scale``: tqdm's k/M/G prefixes (bytes)."""
    if not enabled:
        return _Silent()
    if terminal if terminal is not None else (sys.stderr.isatty() or "ipykernel" in sys.modules):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, dynamic_ncols=True)
    return LogProgress(total=total, desc=desc, unit=unit, initial=initial)
