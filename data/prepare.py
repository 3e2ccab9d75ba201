"""Turn your own text into speedrun shards: GPT-2 tokens in a validation shard and train shards for train_gpt.py.

    python data/prepare.py PATH... --out-dir DIR [--name NAME] [--field text] [--val-tokens N] [--shard-tokens N]
                           [--workers N] [--glob '*.txt,*.md'] [--skip-bad-lines] [--skip-bad-files] [--overwrite]
                           [--quiet]

Inputs (PATH):
  FILE.jsonl  one JSON object per line, the document being the string in --field (default "text"). Blank lines are
              ignored. A line that is not a JSON object with a string --field stops the run with FILE:LINE in the
              message, unless --skip-bad-lines is given (then such lines are skipped and counted). A line is parsed
              whole, so a line over 64 MiB (JSONL_LINE_BYTES) is such a bad line: it is read past in pieces, never
              held whole; save a document that large as a plain-text file, which is read in pieces.
  FILE        any other file is one plain-text document in UTF-8 (a leading byte-order mark is dropped). A file
              that is not UTF-8 stops the run, unless --skip-bad-files is given (then it is left out, with a
              warning).
  DIRECTORY   searched recursively for files whose name matches one of the --glob patterns (comma-separated, case-
              insensitive, matched against the file name; default *.txt,*.md) and for *.jsonl files, which are always
              read as JSONL. Hidden files and directories (.name) are skipped; symbolic links to directories are not
              followed.
A path that is not a regular file (a FIFO, a device, a socket, or a link to one), given or found in a directory, is
skipped with a warning and counted: it could block or never end. A link to a regular file is read.

Order: the PATH arguments in the order given; a directory's files sorted by their path relative to it (compared
directory name by directory name); a file reached twice is read once. Text is taken verbatim. Empty documents are
skipped and counted.

Memory stays bounded whatever the files' size or line lengths: files are read 4 MiB at a time, and a document (a
text file's, or a JSON line's text) is tokenised in pieces of at most 4 Mi characters (PIECE_CHARS), each ending at
the last place where a cut leaves the tokens unchanged: just before a space or a newline that a non-space character
follows (GPT-2's pre-tokeniser starts a piece there; a space joins the word after it). A stretch of 4 Mi characters
with no such place (e.g. base64) is cut after exactly that many, where one merge may differ from reading it whole.

Output, in --out-dir (--name defaults to that directory's name):
  NAME_val_000000.bin           --val-tokens tokens plus one (the last prediction's target): whole documents drawn
                                at random across the corpus (a fixed draw), at about the rate that fills the shard
                                by the end of the input; the document that fills it continues in training as a
                                document of its own, and a shard still short at the end takes the end of the corpus
  NAME_train_000001.bin, ...    the rest, in reading order, at most --shard-tokens tokens per shard
  manifest.json                 the inputs, the counts, the tokenizer and the shards
Without --val-tokens the validation shard takes 5% of the corpus's estimated tokens (its bytes / 4) in multiples of
4,096, at least 4,096 and at most the trainer's 10,485,760.
Each document is token 50256 (<|endoftext|>) followed by its GPT-2 tokens (encode_ordinary: text that looks like a
special token is plain text). The shards are the same for any --workers. They are written to a hidden staging
directory and moved into place once everything has succeeded; the staging directory is removed on every way out
(an error, Ctrl-C, SIGTERM), so a failed or interrupted run leaves the directory as it was. Exit status: 0 done, 2
bad arguments or input, 1 anything else (no tokenizer, disk full), 130 Ctrl-C (SIGINT), 143 SIGTERM.

Then train on them with the commands it prints last, e.g. ./train.sh --local --preset tiny --data-dir DIR
--val-tokens N: the trainer finds the shards of a prepared directory by its manifest. The tiny command validates on
at most a tenth of the 409,600 tokens the tiny preset trains on (40,960, in its 4,096-token chunks; it validates 9
times in its 200 steps), and on no more than the shard holds; the GPU command (--preset auto) on the whole shard,
in whole FlexAttention blocks of 128 tokens.
"""

from __future__ import annotations

import argparse
import codecs
import fnmatch
import itertools
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import stat
import sys
import threading
from collections import deque
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.progress import progress_bar  # noqa: E402
from data.shards import PREPARED_FORMAT as MANIFEST_FORMAT  # noqa: E402
from data.shards import PREPARED_MANIFEST as MANIFEST  # noqa: E402
from data.shards import atomic_write, shard_glob, shard_name, write_shard  # noqa: E402
from data.tokenizer import EOT_ID, TokenizerUnavailable, gpt2_tokenizer  # noqa: E402

VAL_TOKENS = 10_485_760  # the trainer's default --val-tokens: the most a default validation shard takes
VAL_FRACTION = 0.05  # the default validation shard: this share of the corpus's estimated tokens, ...
VAL_MIN_TOKENS = 4096  # ... in multiples of this (the tiny preset's --val-seq-len), at least one
BYTES_PER_TOKEN = 4.0  # GPT-2 tokens of English text take about 4 bytes: the estimate before tokenising
VAL_SPARE = 1.1  # documents are sampled 10% faster than the estimate needs, so that the shard fills in time
VAL_SEED = 0x5EED  # the validation documents' draw
SHARD_TOKENS = 100_000_000  # the FineWeb shards' size
DEFAULT_GLOBS = ("*.txt", "*.md")
MAX_SHARD_TOKENS = 2**31 - 1  # the shard header stores the count as an int32
FLEX_BLOCK = 128  # the trainer's FlexAttention block: on GPUs it validates in chunks of whole blocks
TINY_TRAIN_TOKENS = 200 * 2 * 1024  # the tiny preset's num_iterations x seqs_per_step x train_seq_len (train_gpt.py's
#                                     PRESETS["tiny"]; not imported: data tools import neither torch nor the trainer)
TINY_VAL_SHARE = 0.1  # the printed tiny command validates on at most this share of the tokens its run trains on
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # no glob characters: the trainer finds shards by glob
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")

# Tuning. Module-level so that tests can shrink them to exercise the same paths on a few kilobytes.
READ_BYTES = 1 << 22  # text files are read in blocks of this many bytes, ...
PIECE_CHARS = 1 << 22  # ... and a document longer than this is tokenised in pieces of at most this many (piece_end)
JSONL_LINE_BYTES = 1 << 26  # the longest JSONL line (newline included) read: a JSON document is parsed whole
BATCH_BYTES = 1 << 20  # text goes to the workers in batches of about this many bytes ...
BATCH_ITEMS = 2048  # ... or this many documents, whichever comes first: big enough to amortise the pickling
IN_FLIGHT_PER_WORKER = 4  # batches queued or running per worker: keeps them busy while bounding memory, ...
IN_FLIGHT_BYTES = 1 << 27  # ... and their input bytes at most about this many, however large each batch is

# Kinds of work item.
JSONL = "jsonl"  # a raw JSONL line (parsed in the worker, so that JSON decoding runs in parallel too)
TEXT_START = "text"  # a plain-text document, or its first piece
TEXT_MORE = "text+"  # a further piece of the same document: no BOS before it


class PrepareError(ValueError):
    """A bad argument or input; the message names the flag or the file (and line) and what to do. Exit status 2."""


@dataclass
class InputFile:
    path: Path
    kind: str  # JSONL or TEXT_START
    size: int
    arg: int  # index of the PATH argument that led to it


# ----------------------------------------------------------------------------------------------------------------------
# Finding and reading the inputs


def default_workers() -> int:
    """The CPUs this process may run on (not the machine's count, which a container may not grant), at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _matches(name: str, globs) -> bool:
    lower = name.lower()
    return lower.endswith(".jsonl") or any(fnmatch.fnmatchcase(lower, g.lower()) for g in globs)


def _walk(root: Path, globs) -> list[Path]:
    """Matching files under root, in a fixed order: sorted by relative path, compared part by part, so that the order
    does not depend on the file system's listing order or on the path separator."""
    def fail(e: OSError):
        raise PrepareError(f"{e.filename}: cannot list directory ({e.strerror})")

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames if not f.startswith(".") and _matches(f, globs))
    found.sort(key=lambda p: p.relative_to(root).parts)
    return found


def not_regular(mode: int) -> str | None:
    """What a file of this st_mode is when it is not a regular file (reading a FIFO blocks until something writes to
    it, a device such as /dev/zero never ends), else None."""
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def _shown(path: Path) -> str:
    """path, and where it leads when it is a symbolic link (a link to /dev/zero named notes.txt is not obvious)."""
    return f"{path} (a link to {os.path.realpath(path)})" if path.is_symlink() else str(path)


def collect_inputs(paths, globs, warn=None) -> tuple[list[InputFile], list[dict]]:
    """The input files in reading order, and a summary of each PATH argument for the manifest. Paths that are not
    regular files (or links to one) are left out, each with a warning, and counted in non_regular_files."""
    files, seen, summaries = [], set(), []
    for i, given in enumerate(paths):
        path = Path(given)
        if path.is_dir():
            found, kind = _walk(path, globs), "directory"
            if not found and warn:
                warn(f"{given}: no files match {','.join(globs) or '(no --glob)'} or *.jsonl in this directory")
        elif path.exists():
            found, kind = [path], "file"
        else:
            raise PrepareError(f"{given}: no such file or directory")
        summary = {"path": str(given), "type": kind, "files": 0, "bytes": 0, "documents": 0, "empty_documents": 0,
                   "bad_lines": 0, "non_regular_files": 0}
        for f in found:
            try:
                key, st = f.resolve(), f.stat()
            except OSError as e:
                raise PrepareError(f"{f}: cannot read ({e.strerror})") from None
            if key in seen:
                continue
            seen.add(key)
            what = not_regular(st.st_mode)
            if what is not None:
                if warn:
                    warn(f"{_shown(f)}: {what}, not a regular file; skipped")
                summary["non_regular_files"] += 1
                continue
            files.append(InputFile(f, JSONL if f.name.lower().endswith(".jsonl") else TEXT_START, st.st_size, i))
            summary["files"] += 1
            summary["bytes"] += st.st_size
        summaries.append(summary)
    return files, summaries


def open_regular(path: Path):
    """path opened for reading (binary), or a PrepareError if it is no longer a regular file: collect_inputs checked
    it, but a FIFO put in its place since would block the open for ever. O_NONBLOCK lets that open return at once."""
    nonblock = getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, os.O_RDONLY | nonblock)
    except OSError as e:
        raise PrepareError(f"{path}: cannot read ({e.strerror})") from None
    what = not_regular(os.fstat(fd).st_mode)
    if what is not None:
        os.close(fd)
        raise PrepareError(f"{path}: {what} now, not a regular file; leave it out of the inputs")
    if nonblock:
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


_LAST_CUT = re.compile(r".*[ \n](?=\S)", re.DOTALL)  # .* runs to the end and backs off: finds the last one


def safe_cut(text: str, lo: int = 0, hi: int | None = None) -> int:
    r"""Where text may be cut so that tokenising the two parts separately gives exactly the tokens of the whole: just
    before a space or a newline that a non-space character follows. GPT-2's pre-tokeniser always starts a piece
    there: such a space begins the next word's piece (" word"), such a newline is a piece of its own, a run of
    whitespace before either ends one character early (its \s+(?!\S)), a non-space character's piece stops at
    whitespace, and no pattern looks behind. (Python's \S excludes every character the pattern's \s matches, and
    four more: stricter, never wrong.) Returns the last such position in [lo, hi] (hi: the end), or 0 if none."""
    end = len(text) if hi is None else min(hi + 2, len(text))  # a cut at hi looks at the character after it
    m = _LAST_CUT.match(text, max(lo, 1), end)
    return m.end() - 1 if m else 0


def piece_end(text: str, start: int = 0) -> int:
    """Where the piece of text that starts at `start` ends: at text's end if that is within PIECE_CHARS, else at the
    last safe_cut within PIECE_CHARS, else (PIECE_CHARS characters with no space or newline before a non-space, such
    as base64 or a script written without spaces) after exactly PIECE_CHARS: the one cut that may change a merge."""
    end = start + PIECE_CHARS
    if len(text) <= end:
        return len(text)
    return safe_cut(text, start + 1, end) or end


def decode_block(decoder, block: bytes, offset: int, path: Path) -> str:
    """The text of the next block of a file (offset: where the block starts), or a PrepareError saying where the file
    stops being UTF-8."""
    held = len(decoder.getstate()[0])
    try:
        return decoder.decode(block, final=not block)
    except UnicodeDecodeError as e:
        hint = "decompress it first" if path.name.lower().endswith(COMPRESSED) else \
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8), leave it out, or pass --skip-bad-files"
        raise PrepareError(f"{path}: not UTF-8 text (invalid byte at offset {offset - held + e.start}); "
                           f"{hint}") from None


def utf8_problem(path: Path) -> str | None:
    """The message decode_block gives for a plain-text file that is not UTF-8, or None: one read of the file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open_regular(path) as f:  # outside the try: a file that cannot be opened is an error, not a bad file
        try:
            while block := f.read(READ_BYTES):
                decode_block(decoder, block, offset, path)
                offset += len(block)
            decode_block(decoder, b"", offset, path)
        except PrepareError as e:
            return str(e).split("; ")[0]
        except OSError as e:
            raise PrepareError(f"{path}: cannot read ({e.strerror})") from None
    return None


def text_pieces(path: Path):
    """A plain-text file's document as (piece, bytes it came from), read READ_BYTES at a time: one piece unless it is
    longer than PIECE_CHARS, then pieces of at most PIECE_CHARS ending at piece_end, so that memory stays bounded
    however long the file and its lines are. An empty file gives one empty piece."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, offset, counted, first = "", 0, 0, True
    try:
        with open_regular(path) as f:
            while True:
                block = f.read(READ_BYTES)
                pending += decode_block(decoder, block, offset, path)
                offset += len(block)
                if first and pending:
                    pending, first = pending.removeprefix("\ufeff"), False
                while len(pending) > PIECE_CHARS:
                    cut = piece_end(pending)
                    piece, pending = pending[:cut], pending[cut:]
                    size = len(piece.encode("utf-8"))
                    counted += size
                    yield piece, size
                if not block:
                    break
    except OSError as e:
        raise PrepareError(f"{path}: cannot read ({e.strerror})") from None
    yield pending, max(offset - counted, 0)


def jsonl_lines(path: Path):
    """(line number, raw line, its bytes) of a JSONL file, the lines parsed by the workers. A line longer than
    JSONL_LINE_BYTES comes as None: its rest is read past, JSONL_LINE_BYTES at a time, never held whole."""
    try:
        with open_regular(path) as f:
            for line_no in itertools.count(1):
                line = f.readline(JSONL_LINE_BYTES)
                if not line:
                    return
                size = len(line)
                if size == JSONL_LINE_BYTES and not line.endswith(b"\n"):
                    rest = f.readline(JSONL_LINE_BYTES)  # empty: the line was exactly the limit, at the end
                    line = None if rest else line
                    while rest:
                        size += len(rest)
                        rest = b"" if rest.endswith(b"\n") else f.readline(JSONL_LINE_BYTES)
                yield line_no, line, size
    except OSError as e:
        raise PrepareError(f"{path}: cannot read ({e.strerror})") from None


def work_items(files: list[InputFile]):
    """(file index, line number, kind, payload, bytes) for every document or piece, in reading order."""
    carry = 0  # bytes of blank lines, counted with the next item for the progress bar
    for fi, f in enumerate(files):
        if f.kind == JSONL:
            for line_no, line, size in jsonl_lines(f.path):
                if line is not None and not line.strip():
                    carry += size
                    continue
                yield fi, line_no, JSONL, line, size + carry
                carry = 0
        else:
            kind = TEXT_START
            for piece, size in text_pieces(f.path):
                yield fi, 0, kind, piece, size + carry
                kind, carry = TEXT_MORE, 0


def batches(items):
    """Items grouped for the workers: (work, meta, bytes) with work = [(kind, payload)] and meta = [(file index, line
    number, kind)], which stays in this process to turn the results into counts and messages."""
    work, meta, size = [], [], 0
    for fi, line_no, kind, payload, nbytes in items:
        work.append((kind, payload))
        meta.append((fi, line_no, kind))
        size += nbytes
        if size >= BATCH_BYTES or len(work) >= BATCH_ITEMS:
            yield work, meta, size
            work, meta, size = [], [], 0
    if work:
        yield work, meta, size


# ----------------------------------------------------------------------------------------------------------------------
# Tokenising (in the worker processes)

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def json_text(line: bytes | None, field: str) -> tuple[str | None, str | None]:
    """(document text, None) from a JSONL line, or (None, what is wrong with the line); line None: jsonl_lines found
    it longer than JSONL_LINE_BYTES."""
    if line is None:
        return None, (f"longer than {JSONL_LINE_BYTES:,} bytes, the longest JSON line read (a JSON document is parsed "
                      "whole; a plain-text file is read in pieces, so save a document that long as one)")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    except (ValueError, RecursionError) as e:
        return None, f"not valid JSON ({type(e).__name__})"
    if not isinstance(obj, dict):
        return None, f"the line is {_JSON_TYPES.get(type(obj), 'not an object')}, not a JSON object"
    if field not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
        return None, f"no {field!r} field (its fields: {keys}); choose the field with --field"
    text = obj[field]
    if not isinstance(text, str):
        return None, f"field {field!r} is {_JSON_TYPES.get(type(text), 'not a string')}, not a string"
    return text, None


_BOS = np.array([EOT_ID], dtype=np.uint16)


def encoded(enc, text: str):
    """text's GPT-2 ids as uint16 arrays, PIECE_CHARS characters at a time (cut at piece_end): a long JSON document
    never becomes one long list of Python ints, about 36 bytes a token."""
    start = 0
    while start < len(text):
        end = piece_end(text, start)
        yield np.array(enc.encode_ordinary(text[start:end]), dtype=np.uint16)
        start = end


def tokenise_batch(work, field: str) -> tuple[np.ndarray, list]:
    """Tokens of a batch (all its documents, each after a BOS, concatenated) and one outcome per item: its number of
    tokens, None for an empty document, or a message for a bad JSONL line."""
    enc = gpt2_tokenizer()[0]
    parts, outcomes = [], []
    for kind, payload in work:
        if kind == JSONL:
            text, problem = json_text(payload, field)
            if problem is not None:
                outcomes.append(problem)
                continue
        else:
            text = payload
        if not text:
            outcomes.append(None)
            continue
        first = len(parts)
        if kind != TEXT_MORE:
            parts.append(_BOS)
        parts.extend(encoded(enc, text))
        outcomes.append(sum(p.size for p in parts[first:]))
    return (np.concatenate(parts) if parts else np.empty(0, dtype=np.uint16)), outcomes


def _init_worker() -> None:
    """Ctrl-C is the main process's to handle (it stops the pool), and SIGTERM (the pool's own way of stopping a
    worker) ends a worker at once, without the main process's handler that a fork inherits; the tokenizer is loaded
    once per worker (a fork inherits the parent's)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    gpt2_tokenizer()


def tokenised(batch_iter, workers: int, field: str):
    """(tokens, outcomes, meta, bytes) for each batch, in input order whatever the number of workers. With several,
    at most workers x IN_FLIGHT_PER_WORKER batches, and about IN_FLIGHT_BYTES of input, are out at a time (Pool.imap
    would keep reading ahead and let results pile up while a slow document holds back the ones after it)."""
    if workers == 1:
        for work, meta, size in batch_iter:
            yield (*tokenise_batch(work, field), meta, size)
        return
    pool = multiprocessing.Pool(workers, initializer=_init_worker)
    finished = False
    try:
        window: deque = deque()
        out_bytes = 0
        for work, meta, size in batch_iter:
            window.append((pool.apply_async(tokenise_batch, (work, field)), meta, size))
            out_bytes += size
            while len(window) >= workers * IN_FLIGHT_PER_WORKER or out_bytes > IN_FLIGHT_BYTES:
                result, meta_, size_ = window.popleft()
                out_bytes -= size_
                yield (*result.get(), meta_, size_)
        while window:
            result, meta_, size_ = window.popleft()
            yield (*result.get(), meta_, size_)
        finished = True
    finally:
        if finished:  # every result is in: the workers end when they find the queue closed
            pool.close()
        else:  # an error, a bad line or a signal: drop the queued work
            pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------------------------------------------------
# Writing shards


def default_val_tokens(input_bytes: int) -> int:
    """The validation shard's size when --val-tokens is not given: VAL_FRACTION of the corpus's estimated tokens in
    whole VAL_MIN_TOKENS, at least one of them and at most VAL_TOKENS (FineWeb's, for a corpus of FineWeb's size)."""
    share = int(input_bytes / BYTES_PER_TOKEN * VAL_FRACTION) // VAL_MIN_TOKENS * VAL_MIN_TOKENS
    return min(VAL_TOKENS, max(VAL_MIN_TOKENS, share))


def with_bos(tokens: np.ndarray) -> np.ndarray:
    """tokens as a document: BOS first (added when missing)."""
    if tokens.size and tokens[0] == EOT_ID:
        return tokens
    return np.concatenate([np.array([EOT_ID], dtype=np.uint16), tokens])


def sampled(ordinal: int, rate: float) -> bool:
    """Whether document number `ordinal` (in reading order) goes to validation at this rate: a fixed pseudo-random
    draw per document (splitmix64 of its number), so that a corpus splits the same way for any --workers."""
    mask = (1 << 64) - 1
    z = (ordinal + VAL_SEED) * 0x9E3779B97F4A7C15 & mask
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask
    return (z ^ (z >> 31)) < rate * 2.0**64


class ShardWriter:
    """Splits a stream of documents (each starts with BOS) into a validation shard of val_tokens + 1 tokens (the
    last prediction needs its target) made of documents sampled across the corpus, and train shards of shard_tokens
    holding the rest, each written as soon as it is full. Memory holds one train shard, the validation shard and
    the last val_tokens + 1 train tokens.

    Before each batch the sampling rate is what is left to fill over what the rest of the input should hold (its
    bytes at the tokens per byte seen so far), VAL_SPARE faster. A sampled document that fills the shard goes on in
    training as a document of its own (a BOS before its rest). Should the input end first, the shard is completed
    from the end of the training stream, from the latest document start that gives enough (else with a BOS before
    the last tokens): every validation and train document starts with BOS."""

    def __init__(self, directory: Path, name: str, val_tokens: int, shard_tokens: int, input_bytes: int):
        self.directory, self.name, self.shard_tokens, self.input_bytes = directory, name, shard_tokens, input_bytes
        self.val = np.empty(val_tokens + 1, dtype=np.uint16)
        self.val_fill = 0
        self.buf = np.empty(0, dtype=np.uint16)  # the train shard being filled (allocated on first use)
        self.fill, self.index, self.total, self.bytes_done = 0, 1, 0, 0
        self.held: deque = deque()  # the latest train tokens, up to val_tokens + 1, not yet in a shard
        self.held_n = 0
        self.doc, self.to_val, self.cut, self.rate = -1, False, False, 0.0
        self.val_documents, self.val_tail_tokens = 0, 0
        self.written: list[tuple[str, int]] = []  # (file name, tokens) of the train shards so far

    def add(self, tokens: np.ndarray, nbytes: int = 0) -> None:
        """One batch's tokens (documents or pieces of them, in order) and the input bytes they came from."""
        need = self.val.size - self.val_fill
        left = self.input_bytes - self.bytes_done
        expected = left * (self.total / self.bytes_done if self.bytes_done else 1 / BYTES_PER_TOKEN)
        self.rate = 1.0 if expected <= need else min(1.0, VAL_SPARE * need / expected)
        starts = np.flatnonzero(tokens == EOT_ID).tolist()
        for a, b in zip([0, *starts], [*starts, tokens.size]):
            if b > a:
                self._route(tokens[a:b], starts_document=bool(tokens[a] == EOT_ID))
        self.total += tokens.size
        self.bytes_done += nbytes

    def _route(self, piece: np.ndarray, starts_document: bool) -> None:
        if starts_document:
            self.doc += 1
            self.to_val, self.cut = self.val_fill < self.val.size and sampled(self.doc, self.rate), False
            self.val_documents += self.to_val
        elif self.cut:  # the rest of the document that filled the validation shard: a document of its own
            piece, self.cut = with_bos(piece), False
        if not self.to_val:
            self._train(piece)
            return
        take = min(piece.size, self.val.size - self.val_fill)
        self.val[self.val_fill:self.val_fill + take] = piece[:take]
        self.val_fill += take
        if self.val_fill == self.val.size:
            self.to_val, self.cut = False, True
            if take < piece.size:
                self._route(piece[take:], starts_document=False)

    def _train(self, tokens: np.ndarray) -> None:
        self.held.append(tokens)
        self.held_n += tokens.size
        while self.held_n > self.val.size:  # keep the last val_tokens + 1 back, for completing the validation shard
            first = self.held[0]
            out = min(first.size, self.held_n - self.val.size)
            self._to_shard(first[:out])
            if out == first.size:
                self.held.popleft()
            else:
                self.held[0] = first[out:]
            self.held_n -= out

    def _to_shard(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < tokens.size:
            if self.buf.size == 0:  # np.empty commits no memory until written, so a big --shard-tokens costs nothing
                self.buf = np.empty(self.shard_tokens, dtype=np.uint16)
            take = min(tokens.size - pos, self.buf.size - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill, pos = self.fill + take, pos + take
            if self.fill == self.buf.size:
                self._write_train()

    def _write_train(self) -> None:
        if self.fill:
            self._write(shard_name(self.name, "train", self.index), self.buf[:self.fill])
            self.index, self.fill = self.index + 1, 0

    def _write(self, name: str, tokens: np.ndarray) -> None:
        try:
            write_shard(self.directory / name, tokens)
        except OSError as e:
            raise OSError(f"{self.directory / name}: cannot write the shard ({e.strerror or e})") from e
        self.written.append((name, tokens.size))

    def finish(self) -> None:
        """Complete the validation shard from the end of the training stream if need be, then write what is left:
        the last train shard, then the validation shard (listed first in `written`). For a corpus of at least twice
        val_tokens + 1 tokens (_check_corpus) the held tail covers what the validation shard lacks."""
        need = self.val.size - self.val_fill
        tail = np.concatenate(list(self.held)) if self.held else np.empty(0, dtype=np.uint16)
        if need:
            starts = np.flatnonzero(tail[:tail.size - need + 1] == EOT_ID)
            cut = int(starts[-1]) if starts.size else tail.size - need + 1
            self.val[self.val_fill:] = tail[cut:cut + need] if starts.size else with_bos(tail[cut:])
            self.val_tail_tokens = need
            rest = tail[cut + need:]
            tail = np.concatenate([tail[:cut], with_bos(rest)]) if rest.size else tail[:cut]
        self._to_shard(tail)
        self._write_train()
        self._write(shard_name(self.name, "val", 0), self.val)
        self.written.insert(0, self.written.pop())


def existing_shards(out: Path, name: str) -> list[Path]:
    """Shards of this corpus name in out (exactly NAME_val_NNNNNN.bin / NAME_train_NNNNNN.bin, so that corpus "a"
    never claims corpus "a_val"'s files)."""
    pattern = re.compile(rf"^{re.escape(name)}_(val|train)_\d{{6}}\.bin$")
    return sorted(p for p in out.iterdir() if pattern.match(p.name)) if out.is_dir() else []


def _remove_abandoned_staging(out: Path, name: str) -> None:
    """Staging directories of this name left by runs that were killed (their process is gone): they may be large."""
    if os.name != "posix":
        return
    for d in out.glob(f".{name}.partial-*"):
        try:
            os.kill(int(d.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


# ----------------------------------------------------------------------------------------------------------------------
# The whole job


def _check_arguments(name, field, val_tokens, shard_tokens, workers) -> None:
    problems = []
    if not NAME_PATTERN.match(name):
        problems.append(f"the corpus name {name!r} (from --name, or else the --out-dir's name) must be letters, "
                        "digits, '.', '_' or '-', starting with a letter or digit: pass --name")
    if not field:
        problems.append("--field must not be empty")
    for flag, value in (("--val-tokens", val_tokens), ("--shard-tokens", shard_tokens)):
        if not 1 <= value <= MAX_SHARD_TOKENS:
            problems.append(f"{flag} must be between 1 and {MAX_SHARD_TOKENS}, got {value}")
    if workers < 1:
        problems.append(f"--workers must be at least 1, got {workers}")
    if problems:
        raise PrepareError("; ".join(problems))


def _check_output(out: Path, name: str, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out-dir {out} exists and is not a directory")
    if overwrite:
        return
    found = [p.name for p in existing_shards(out, name)]
    if (out / MANIFEST).is_file():
        found.append(MANIFEST)
    if found:
        listed = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise PrepareError(f"{out} already holds a prepared corpus ({listed}); pass --overwrite to replace it, or "
                           "choose another --out-dir")


def prepare(paths, out_dir, name: str | None = None, field: str = "text", val_tokens: int | None = None,
            shard_tokens: int = SHARD_TOKENS, workers: int | None = None, globs=DEFAULT_GLOBS,
            skip_bad_lines: bool = False, skip_bad_files: bool = False, overwrite: bool = False,
            quiet: bool = False) -> dict:
    """Tokenise the documents under paths into shards in out_dir (see the module docstring); returns the manifest,
    plus out_dir. Raises PrepareError for bad arguments or input, before anything in out_dir has changed.
    val_tokens None: default_val_tokens of the input's size."""
    # Check everything that can be checked before out_dir is touched, so that a mistake costs nothing.
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out = Path(out_dir)
    name = out.resolve().name if name is None else name
    workers = default_workers() if workers is None else int(workers)
    globs = tuple(globs)
    _check_arguments(name, field, VAL_MIN_TOKENS if val_tokens is None else val_tokens, shard_tokens, workers)
    if not paths:
        raise PrepareError("no input paths given")
    files, summaries, bad_files = _find_inputs(paths, globs, quiet, skip_bad_files)
    input_bytes = sum(f.size for f in files)
    val_tokens = default_val_tokens(input_bytes) if val_tokens is None else val_tokens
    _check_output(out, name, overwrite)
    enc_source = gpt2_tokenizer()[1]  # loaded before the pool starts, so that forked workers inherit it

    # Tokenise into a staging directory and move the shards into place only once all of them are written: a failed or
    # interrupted run leaves out_dir as it was.
    staging = _make_staging(out, name)
    try:
        writer = ShardWriter(staging, name, val_tokens, shard_tokens, input_bytes)
        counts = _tokenise_all(files, summaries, writer, field, workers, skip_bad_lines, quiet)
        _check_corpus(counts, writer.total, len(files), val_tokens)
        writer.finish()
        manifest = {
            "format": MANIFEST_FORMAT, "version": 2, "name": name, "tokenizer": enc_source, "bos_id": EOT_ID,
            "inputs": summaries, "globs": list(globs), "field": field, "skip_bad_lines": skip_bad_lines,
            "skip_bad_files": skip_bad_files, "files": len(files), "bad_files": bad_files,
            "non_regular_files": sum(s["non_regular_files"] for s in summaries),
            "bytes": input_bytes, **counts, "tokens": writer.total, "val_tokens": val_tokens,
            "val_documents": writer.val_documents, "val_tail_tokens": writer.val_tail_tokens,
            "train_tokens": sum(k for _, k in writer.written[1:]),
            "shard_tokens": shard_tokens, "shards": [n for n, _ in writer.written],
            "shard_sizes": [k for _, k in writer.written],
            "train_files": shard_glob(name, "train"), "val_files": shard_glob(name, "val"),
        }
        _move_into_place(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not quiet:
        _print_summary(out, manifest)
    return dict(manifest, out_dir=str(out))


def _find_inputs(paths, globs, quiet: bool, skip_bad_files: bool) -> tuple[list[InputFile], list[dict], int]:
    """collect_inputs, with its warnings on stderr unless quiet; an error when no PATH yields any file to read (a
    directory with no match, or a path that is not a regular file, is only a warning, as long as another PATH has
    files). With skip_bad_files, plain-text files that are not UTF-8 are left out, each with a warning (a read of
    every text file before tokenising)."""
    def warn(message: str) -> None:
        if not quiet:
            print(f"prepare.py: warning: {message}", file=sys.stderr, flush=True)

    files, summaries = collect_inputs(paths, globs, warn)
    bad = 0
    if skip_bad_files:
        kept = []
        for f in files:
            problem = utf8_problem(f.path) if f.kind == TEXT_START else None
            if problem is None:
                kept.append(f)
                continue
            warn(f"{problem}; skipped (--skip-bad-files)")
            bad += 1
            summaries[f.arg]["files"] -= 1
            summaries[f.arg]["bytes"] -= f.size
            summaries[f.arg]["bad_files"] = summaries[f.arg].get("bad_files", 0) + 1
        files = kept
    if not files:
        non_regular = sum(s["non_regular_files"] for s in summaries)
        skipped = [f"{bad} not UTF-8"] * bool(bad) + [f"{non_regular} not a regular file"] * bool(non_regular)
        raise PrepareError(f"no input files in {', '.join(map(str, paths))}: a directory is searched for "
                           f"{','.join(globs) or '(no --glob)'} and *.jsonl files; check the paths or --glob"
                           + (f" ({' and '.join(skipped)}, skipped)" if skipped else ""))
    return files, summaries, bad


def _make_staging(out: Path, name: str) -> Path:
    """Create out (if need be) and, inside it, this run's hidden staging directory: on the same file system as the
    final shards, so that moving them into place is a rename. Named after this process, so that a later run can tell
    when its owner is gone and remove it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"--out-dir {out}: cannot create it ({e.strerror})") from None
    _remove_abandoned_staging(out, name)
    staging = out / f".{name}.partial-{os.getpid()}"
    staging.mkdir()
    return staging


def _check_corpus(counts: dict, tokens: int, num_files: int, val_tokens: int) -> None:
    """After tokenising, before any shard is moved into place: the corpus must have documents, and enough tokens
    for the validation shard and at least as many to train on."""
    if counts["documents"] == 0:
        raise PrepareError(f"no documents: the {num_files} input files hold only empty documents"
                           + (" and bad lines" if counts["bad_lines"] else ""))
    if tokens < 2 * val_tokens + 1:
        suggest = tokens // 2 // 1024 * 1024 or tokens // 2
        raise PrepareError(
            f"the corpus has {tokens:,} tokens, fewer than twice --val-tokens {val_tokens:,} (the "
            f"validation shard takes {val_tokens:,}; training needs at least as many): lower "
            f"--val-tokens (e.g. --val-tokens {suggest}; the trainer's --val-tokens must then be a multiple of its "
            "--val-seq-len and below the shard's size) or add text")


def _move_into_place(staging: Path, out: Path, manifest: dict) -> None:
    """Replace out's shards of this corpus name with the staged ones, then write the manifest, last: its presence
    says the shards are complete."""
    new = set(manifest["shards"])
    for old in existing_shards(out, manifest["name"]):  # only with --overwrite: a smaller corpus leaves no stale shards
        if old.name not in new:
            old.unlink()
    for n in manifest["shards"]:
        os.replace(staging / n, out / n)
    atomic_write(out / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=1) + "\n").encode("utf-8")))


def _tokenise_all(files, summaries, writer: ShardWriter, field, workers, skip_bad_lines, quiet) -> dict:
    """Run the documents through the workers into the writer; returns the document counts. The progress bar redraws
    itself on a terminal and writes whole lines elsewhere (data/progress.py)."""
    counts = {"documents": 0, "empty_documents": 0, "bad_lines": 0}
    total = sum(f.size for f in files)
    bar = progress_bar(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenising", disable=quiet,
                       dynamic_ncols=True)
    try:
        with closing(tokenised(batches(work_items(files)), workers, field)) as results:
            for tokens, outcomes, meta, nbytes in results:
                for outcome, (fi, line_no, kind) in zip(outcomes, meta):
                    summary = summaries[files[fi].arg]
                    if outcome is None:
                        key = "empty_documents"
                    elif isinstance(outcome, str):
                        if not skip_bad_lines:
                            raise PrepareError(f"{files[fi].path}:{line_no}: {outcome}. Fix or remove the line, or "
                                               "pass --skip-bad-lines to skip such lines")
                        key = "bad_lines"
                    elif kind != TEXT_MORE:
                        key = "documents"
                    else:
                        continue
                    counts[key] += 1
                    summary[key] += 1
                writer.add(tokens, nbytes)
                bar.update(min(nbytes, total - bar.n))
                bar.set_postfix_str(f"{writer.total:,} tokens", refresh=False)
    finally:
        bar.close()
    return counts


def tiny_val_tokens(val_tokens: int) -> int:
    """The tiny command's --val-tokens for a validation shard of val_tokens: at most TINY_VAL_SHARE of the tokens the
    tiny run trains on (it validates on all of them 9 times in its 200 steps), in whole VAL_MIN_TOKENS chunks, at
    least one, and no more than the shard holds (0 when it holds less than one chunk)."""
    most = max(VAL_MIN_TOKENS, int(TINY_TRAIN_TOKENS * TINY_VAL_SHARE) // VAL_MIN_TOKENS * VAL_MIN_TOKENS)
    return min(val_tokens, most) // VAL_MIN_TOKENS * VAL_MIN_TOKENS


def train_commands(out: Path, val_tokens: int) -> list[tuple[str, str]]:
    """(what for, command) for training on the corpus, each runnable as printed: the trainer finds the shards by the
    manifest, and --val-tokens is a multiple of what the preset validates in (the tiny preset's 4,096-token chunks,
    tiny_val_tokens of them; on GPUs, --preset auto's chunks, multiples of FlexAttention's 128-token blocks, the whole
    shard)."""
    where = shlex.quote(str(out))
    tiny = tiny_val_tokens(val_tokens)
    flags = f"--val-tokens {tiny}" if tiny else f"--val-tokens {val_tokens} --val-seq-len {val_tokens}"
    commands = [("the tiny model, minutes on a CPU", f"./train.sh --local --preset tiny --data-dir {where} {flags}"),
                ("the same without the wrapper", f"python train_gpt.py --preset tiny --data-dir {where} {flags}")]
    if val_tokens >= FLEX_BLOCK:
        commands.append(("GPUs: the record's recipe fitted to them",
                         f"./train.sh --data-dir {where} --val-tokens {val_tokens // FLEX_BLOCK * FLEX_BLOCK}"))
    return commands


def _print_summary(out: Path, m: dict) -> None:
    train = len(m["shards"]) - 1
    skipped = [f"{m['empty_documents']:,} empty documents"] if m["empty_documents"] else []
    skipped += [f"{m['bad_lines']:,} bad lines"] if m["bad_lines"] else []
    skipped += [f"{m['bad_files']:,} non-UTF-8 file{'s' * (m['bad_files'] != 1)}"] if m["bad_files"] else []
    n = m["non_regular_files"]
    skipped += [f"{n:,} non-regular file{'s' * (n != 1)}"] if n else []
    print(f"prepared {m['name']!r} in {out}: {m['documents']:,} documents from {m['files']:,} files "
          f"({m['bytes'] / 2**20:,.1f} MiB), {m['tokens']:,} tokens"
          + (f"; skipped {' and '.join(skipped)}" if skipped else ""))
    tail = f", the last {m['val_tail_tokens']:,} from the end of the corpus" if m["val_tail_tokens"] else ""
    print(f"  {m['shards'][0]}: {m['val_tokens']:,} validation tokens (plus the last one's target) from "
          f"{m['val_documents']:,} document{'s' * (m['val_documents'] != 1)} sampled across the corpus{tail}")
    print(f"  {m['train_files']}: {m['train_tokens']:,} train tokens in {train} shard{'s' * (train != 1)}")
    tiny = tiny_val_tokens(m["val_tokens"])
    print("train on it:" if tiny in (0, m["val_tokens"]) else
          f"train on it (the tiny run validates on {tiny:,} of the {m['val_tokens']:,} validation tokens: at most a "
          f"tenth of the {TINY_TRAIN_TOKENS:,} it trains on):")
    commands = train_commands(out, m["val_tokens"])
    width = max(len(what) for what, _ in commands)
    for what, command in commands:
        print(f"  {what + ':':<{width + 1}}  {command}")
    sys.stdout.flush()


class Terminated(BaseException):
    """SIGTERM, raised in the main thread as Ctrl-C raises KeyboardInterrupt, so that the way out removes the staging
    directory. A BaseException, as KeyboardInterrupt is: no `except Exception` swallows it."""


_MAIN_PID = [0]  # the process that installed _stop: a worker forked before it resets its handlers is not it


def _stop(signum, frame) -> None:
    """SIGINT or SIGTERM: the first one stops the run; the ones after it are ignored, so that nothing interrupts the
    removal of the staging directory on the way out (SIGKILL still ends the process). In a worker just forked, whose
    initializer has not reset the handlers yet, it ends the worker there: raised, it would climb out of the fork into
    the copy of the caller's code."""
    if os.getpid() != _MAIN_PID[0]:
        os._exit(128 + signum)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


def _handle_stops() -> dict:
    """Install _stop for SIGINT and SIGTERM, but not for one the process was started ignoring (a shell's `cmd &`
    without job control ignores SIGINT); returns the handlers it replaced. Only the main thread may install
    handlers: elsewhere, none."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _MAIN_PID[0] = os.getpid()
    return {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(s) is not signal.SIG_IGN}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="prepare.py", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", metavar="PATH", help="text files, JSONL files or directories of them")
    ap.add_argument("--out-dir", required=True, metavar="DIR", help="directory for the shards and manifest.json")
    ap.add_argument("--name", metavar="NAME", help="corpus name, the shards' prefix (default: the --out-dir's name)")
    ap.add_argument("--field", default="text", metavar="FIELD",
                    help="JSONL field holding the document (default: %(default)s)")
    ap.add_argument("--val-tokens", type=int, default=None, metavar="N",  # help: %% for %, as argparse %-formats it
                    help=f"tokens in the validation shard, documents sampled across the corpus (default: "
                         f"{VAL_FRACTION * 100:.0f}%% of the corpus's estimated tokens in multiples of "
                         f"{VAL_MIN_TOKENS:,}, at most {VAL_TOKENS:,}, the trainer's default)")
    ap.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, metavar="N",
                    help="most tokens in one train shard (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=None, metavar="N",
                    help=f"tokenising processes (default: the usable CPUs, at most 8; here {default_workers()})")
    ap.add_argument("--glob", action="append", metavar="PATTERNS",
                    help="comma-separated file-name patterns searched for in directories, may be repeated "
                         f"(default: {','.join(DEFAULT_GLOBS)}; *.jsonl is always included)")
    ap.add_argument("--skip-bad-lines", action="store_true",
                    help="skip (and count) JSONL lines that are not an object with a string --field")
    ap.add_argument("--skip-bad-files", action="store_true",
                    help="skip (with a warning, and count) plain-text files that are not UTF-8; each text file is "
                         "then read once more, before tokenising")
    ap.add_argument("--overwrite", action="store_true", help="replace a corpus already in --out-dir")
    ap.add_argument("--quiet", action="store_true", help="no progress bar, warnings or summary")
    args = ap.parse_args(argv)
    globs = DEFAULT_GLOBS if args.glob is None else \
        tuple(g.strip() for spec in args.glob for g in spec.split(",") if g.strip())
    replaced = _handle_stops()
    try:
        prepare(args.paths, args.out_dir, name=args.name, field=args.field, val_tokens=args.val_tokens,
                shard_tokens=args.shard_tokens, workers=args.workers, globs=globs,
                skip_bad_lines=args.skip_bad_lines, skip_bad_files=args.skip_bad_files, overwrite=args.overwrite,
                quiet=args.quiet)
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    except (TokenizerUnavailable, OSError) as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare.py: interrupted (SIGINT); the output directory was left as it was", file=sys.stderr)
        return 130
    except Terminated:
        print("prepare.py: stopped by SIGTERM; the output directory was left as it was", file=sys.stderr)
        return 143
    finally:
        for s, handler in replaced.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
