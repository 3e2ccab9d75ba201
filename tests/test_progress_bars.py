"""Progress bars of the data tools and evaluators: tqdm's own on a terminal; whole lines, no carriage returns, in a
log or a pipe."""

from __future__ import annotations

import io

from data import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_and_no_carriage_return(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # a line at every update
    out = io.StringIO()
    with progress.progress_bar(total=4, unit="x", desc="work", file=out) as bar:
        for _ in range(4):
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("work:") for line in lines)
    assert "4/4" in lines[-1]  # the last line is the finished bar
    assert all(line == line.rstrip() for line in lines)  # tqdm's padding is gone


def test_lines_are_spaced_by_the_interval(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 3600.0)
    out = io.StringIO()
    with progress.progress_bar(total=1000, desc="work", file=out) as bar:
        for _ in range(1000):
            bar.update(1)
    assert len(out.getvalue().splitlines()) <= 3  # the start, the end (and at most one in between), not 1,000


def test_a_terminal_keeps_tqdms_own_bar():
    from tqdm import tqdm

    assert progress.tqdm_class(Terminal()) is tqdm
    assert progress.tqdm_class(io.StringIO()) is not tqdm
    out = Terminal()
    with progress.progress_bar(total=2, desc="work", file=out) as bar:
        bar.update(2)
    assert "\r" in out.getvalue()


def test_a_bar_that_clears_itself_leaves_no_blank_line():
    out = io.StringIO()
    with progress.progress_bar(total=2, desc="work", file=out, leave=False) as bar:
        bar.update(2)
    assert all(line.strip() for line in out.getvalue().splitlines())


def test_nested_bars_in_a_log_write_no_cursor_moves(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    out = io.StringIO()
    with progress.progress_bar(total=2, desc="outer", file=out) as outer:
        with progress.progress_bar(total=3, desc="inner", file=out, leave=False) as inner:
            inner.update(3)
        outer.update(2)
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()
    assert {line.split(":")[0] for line in out.getvalue().splitlines()} == {"outer", "inner"}
