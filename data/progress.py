"""Progress bars that suit where they are read: tqdm's own bar on a terminal; anywhere else (a log file, a pipe, a CI
console) a whole line every LOG_INTERVAL_S seconds and at the end, never a carriage-return redraw.

    from data.progress import progress_bar
    with progress_bar(total=n, unit="B", desc="tokenising") as bar:
        bar.update(k)

Imports tqdm only when a bar is made; importing this module has no side effects."""

from __future__ import annotations

import io
import re
import sys

LOG_INTERVAL_S = 30.0  # seconds between progress lines where stderr is not a terminal


class LineStream(io.TextIOBase):
    """A text stream for tqdm that writes each of its redraws as one line: tqdm starts every redraw with a carriage
    return (pads it with spaces, or clears it with them, and moves the cursor between nested bars); here each
    non-blank piece, without escape codes, becomes a line of its own."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # the cursor moves of nested bars
        for piece in re.split(r"[\r\n]", text):
            if piece.strip():
                self.stream.write(piece.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def tqdm_class(stream=None):
    """tqdm itself when `stream` (default: stderr) is a terminal, else a tqdm subclass that writes whole lines, every
    LOG_INTERVAL_S seconds, to that stream. For libraries that take a bar class (huggingface_hub's tqdm_class)."""
    from tqdm import tqdm

    if is_terminal(sys.stderr if stream is None else stream):
        return tqdm

    class LineTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            target = kwargs.pop("file", None) or stream or sys.stderr
            kwargs.update(file=LineStream(target), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S,
                          dynamic_ncols=False, ncols=kwargs.get("ncols") or 100)
            super().__init__(*args, **kwargs)

    return LineTqdm


def progress_bar(**kwargs):
    """A tqdm bar (tqdm's arguments) on stderr, or on kwargs["file"], drawn as tqdm_class decides for that stream."""
    return tqdm_class(kwargs.get("file"))(**kwargs)
