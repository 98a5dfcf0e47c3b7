"""Progress: a bar on a terminal, one plain log line a minute in a batch job's log."""

from __future__ import annotations

import logging

from reglue.progress import LogProgress, duration, progress_bar


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_batch_jobs_log_gets_one_line_a_minute_with_rate_and_eta(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="reglue.progress"):
        with LogProgress(total=10_000, desc="train", unit="step", initial=400, clock=clock) as bar:
            for _ in range(600):  # 600 steps in 59 s: no line yet
                clock.now += 59 / 600
                bar.update(1)
            assert caplog.records == []
            clock.now += 1.0
            bar.set_postfix(loss="0.5123")
            bar.update(1)  # a minute has passed: one line
            for _ in range(100):
                bar.update(1)  # within the next minute: none
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2  # the minute's line and the closing one
    assert lines[0].startswith("train: 1,001/10,000 step (10.0 %), 10 step/s, ETA 14m 58s; loss 0.5123")
    assert lines[1].startswith("train: 1,101/10,000 step (11.0 %)")


def test_without_a_total_the_line_counts_and_nothing_is_logged_for_no_progress(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="reglue.progress"):
        with LogProgress(total=None, desc="verify", unit="B", clock=clock):
            clock.now += 120
        with LogProgress(total=None, desc="verify", unit="B", clock=clock) as bar:
            clock.now += 61
            bar.update(5_000_000)
    assert [r.getMessage() for r in caplog.records] == ["verify: 5,000,000 B, 8.2e+04 B/s"]


def test_progress_bar_is_tqdm_on_a_terminal_plain_lines_elsewhere_and_silent_when_disabled():
    from tqdm.auto import tqdm

    with progress_bar(total=3, desc="x", unit="img", terminal=True) as bar:
        assert isinstance(bar, tqdm)
    assert isinstance(progress_bar(total=3, desc="x", unit="img", terminal=False), LogProgress)
    silent = progress_bar(total=3, desc="x", unit="img", enabled=False, terminal=True)
    silent.update(2)
    silent.set_postfix(loss=1)
    silent.close()
    assert not isinstance(silent, (tqdm, LogProgress))


def test_durations_read_like_a_clock():
    assert [duration(s) for s in (0, 5.4, 65, 7 * 3600 + 29 * 60 + 5, 86_400 + 7 * 3600 + 29 * 60)] == [
        "0s", "5s", "1m 5s", "7h 29m", "1d 7h 29m"]


def test_a_reset_starts_counting_towards_the_planned_total(caplog):
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="reglue.progress"):
        with LogProgress(total=None, desc="verify", unit="B", clock=clock) as bar:
            bar.reset(total=1_000)  # what verify does once it knows the bytes to read
            clock.now += 61
            bar.update(250)
    assert [r.getMessage() for r in caplog.records] == ["verify: 250/1,000 B (25.0 %), 4.1 B/s, ETA 3m 3s"]
