"""The speedrun's token-shard format, with numpy only: the trainer, the downloads and the data tools all read and
write shards through this module, so that none of the tools needs torch.

A shard is a header of 256 little-endian int32 (SHARD_MAGIC, SHARD_VERSION, the number of tokens, then zeros)
followed by the tokens as little-endian uint16. Shards are named {prefix}_{split}_{index:06d}.bin (shard_name): the
validation shard is index 0, train shards count from 1.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DISK_FULL_FREE_BYTES = 64 << 20  # a write that fails with less than this left beside it ran out of space
WRITING: set[Path] = set()  # this process's atomic_write temporary files not yet renamed or removed


class DataError(ValueError):
    """Missing, corrupt or too small data; the message names the file and what to do."""


class DiskFullError(OSError):
    """A write that failed because its file system is full; the message says where and how much is free."""


def shard_name(prefix: str, split: str, index: int) -> str:
    """The file name of shard `index` of a corpus: split is "val" (index 0) or "train" (1, 2, ...)."""
    return f"{prefix}_{split}_{index:06d}.bin"


def shard_glob(prefix: str, split: str) -> str:
    """The glob that finds every shard_name(prefix, split, ...)."""
    return f"{prefix}_{split}_*.bin"


def atomic_write(path: str | Path, write) -> None:
    """write(f) into a temporary file beside path, flushed to disk, then renamed over path: a crash leaves either
    the old file or the complete new one, never a partial file under the final name.

    A write that fails for want of space raises DiskFullError. torch.save does not say so (its zip writer reports
    "unexpected pos"), so besides ENOSPC a failure with the file system nearly full, measured while the partial
    file still takes its share, counts as one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    WRITING.add(tmp)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(path.parent).free
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < DISK_FULL_FREE_BYTES:
            raise DiskFullError(errno.ENOSPC, f"cannot write {path}: the disk is full ({free / 2**20:.0f} MiB free "
                                f"in {path.parent}); free some space and run again (nothing was replaced)") from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
        WRITING.discard(tmp)


def remove_partial_writes() -> None:
    """Remove the temporary files of the atomic writes this process has under way, for a process about to end at
    once (os._exit, which runs no finally block): nothing half-written is left, and no final name was touched."""
    for tmp in list(WRITING):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        WRITING.discard(tmp)


def write_shard(path: str | Path, tokens) -> None:
    """Write tokens (ids < 65536) as a shard, atomically (see atomic_write)."""
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
        raise DataError(f"{path}: token ids must fit in uint16 (got {arr.min()}..{arr.max()})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, arr.size)

    def write(f):
        f.write(header.tobytes())
        f.write(arr.astype("<u2", copy=False).tobytes())
    atomic_write(path, write)


def read_shard_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its number of tokens."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from e
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte header; "
                        "it is a partial download: delete it and download again")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: magic number {header[0]} is not {SHARD_MAGIC}; not a token shard in the "
                        "speedrun format")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: shard version {header[1]} is not supported (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if size != expected:
        raise DataError(f"{path}: file is {size} bytes but its header announces {num_tokens} tokens "
                        f"({expected} bytes); it is corrupt or partially downloaded: delete it and download again")
    return num_tokens


def load_shard(path: str | Path) -> np.ndarray:
    """Tokens of a validated shard as a read-only uint16 memory map (to look at a shard without reading it all)."""
    n = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def read_shard(path: str | Path, vocab_size: int | None = None, count: int | None = None) -> np.ndarray:
    """The first count tokens (all by default) of a validated shard, read into memory: a file truncated or replaced
    while the run goes on cannot pull its data from under it (through a memory map that would end the process with
    SIGBUS). With vocab_size, an id the model has no row for is a DataError naming the file and the position."""
    n = read_shard_header(path)
    count = n if count is None else min(n, count)
    try:
        with open(path, "rb") as f:
            f.seek(HEADER_BYTES)
            tokens = np.fromfile(f, dtype="<u2", count=count)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from e
    if tokens.size != count:
        raise DataError(f"{path}: ended after {tokens.size} of its {n} tokens while it was read; it was truncated "
                        "or replaced during the run: download or prepare it again")
    if vocab_size is not None and count and int(tokens.max()) >= vocab_size:
        where = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {int(tokens[where])} at position {where} is outside the vocabulary "
                        f"(ids below {vocab_size}); the shard was made with another tokenizer, or is corrupt")
    return tokens


def read_tokens(files: list[str], n: int, vocab_size: int | None = None) -> np.ndarray:
    """The first n tokens of the shards, in order, in memory (each shard checked as read_shard checks it)."""
    parts, have = [], 0
    for f in files:
        if have >= n:
            break
        parts.append(read_shard(f, vocab_size, n - have))
        have += parts[-1].size
    if have < n:
        raise DataError(f"the shards {', '.join(map(str, files))} hold {have} tokens, fewer than the {n} needed")
    return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, dtype=np.uint16)


def find_shards(data_dir: str, pattern: str, what: str) -> list[str]:
    """The files matching pattern (relative to data_dir unless absolute), sorted; none is a DataError."""
    full = pattern if os.path.isabs(pattern) else os.path.join(data_dir, pattern)
    files = sorted(glob.glob(full))
    if not files:
        hint = ("download FineWeb with `python data/cached_fineweb10B.py 8`" if "fineweb" in full
                else "check --data-dir and the file glob")
        raise DataError(f"no {what} shards match {full}: {hint}")
    return files


PREPARED_MANIFEST, PREPARED_FORMAT = "manifest.json", "nanogpt-speedrun-kit/prepared-corpus"  # what prepare.py writes


def prepared_globs(data_dir: str) -> tuple[str, str] | None:
    """The train and validation globs a directory that data/prepare.py wrote names in its manifest, else None."""
    path = os.path.join(data_dir, PREPARED_MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != PREPARED_FORMAT:
        return None
    train, val = manifest.get("train_files"), manifest.get("val_files")
    return (train, val) if isinstance(train, str) and isinstance(val, str) else None

