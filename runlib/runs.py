"""Run names and locks: a run's id, the checkpoint a resume continues, the locks that keep two runs of one name
apart, and the name a new run may take."""

from __future__ import annotations

import datetime
import os
import re
import uuid
from pathlib import Path

from runlib.checkpoints import check_resumable, load_checkpoint, newest_step_file, resolve_checkpoint
from runlib.errors import CheckpointError, ConfigError
from runlib.processes import broadcast_object
from runlib.stopping import host_path

try:
    import fcntl  # run locks (POSIX); elsewhere runs are not locked
except ImportError:
    fcntl = None


def open_run(resume: str | None, run_name: str | None, checkpoint_dir: str, num_iterations: int,
             preset: str) -> tuple[str, dict | None, Path | None]:
    """The run id and, when resuming, the checkpoint (checked before any model is built) and its path."""
    ckpt, path = None, None
    if resume:
        path = resolve_checkpoint(resume, run_name, checkpoint_dir)
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, path, num_iterations)
    run_id = run_name or (ckpt["run_id"] if ckpt else broadcast_object(new_run_id(preset)))
    if not valid_run_name(run_id):
        raise CheckpointError(f"{path} names its run {run_id!r}, not a plain file name: pass --run-name")
    return run_id, ckpt, path


def valid_run_name(name: str) -> bool:
    """A run name is a single, plain path component, so logs/<run>.txt and checkpoints/<run>/ stay where they are."""
    return bool(re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,199}", name))


def new_run_id(preset: str) -> str:
    return f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{preset}-{uuid.uuid4().hex[:6]}"


class RunLock:
    """An exclusive lock on a run for as long as it trains, so that a second run of the same name is refused instead
    of overwriting its checkpoints or interleaving its log: one lock beside the run's checkpoint directory
    (<checkpoint_dir>/.<run>.lock, what must never be shared) and one beside its log (<log_dir>/.<run>.lock). The
    kernel releases them when the process ends, however it ends (flock), so a killed run can always be resumed.
    Taking them also removes the temporary files that a save interrupted by a kill left behind: no other process of
    this run writes meanwhile."""

    def __init__(self, run_dir: Path, log_dir: Path):
        self.files = []
        try:
            for path, flag in ((run_dir.parent / f".{run_dir.name}.lock", "--checkpoint-dir"),
                               (log_dir / f".{run_dir.name}.lock", "--log-dir")):
                self.files.append(self._take(path, run_dir.name, flag))
        except ConfigError:
            self.release()
            raise
        self.removed = [p for p in run_dir.glob(".step_*.pt.tmp-*") if p.is_file()]
        # the checkpoint root's latest link is shared by all runs: only the leftovers of processes no longer alive
        self.removed += [p for p in run_dir.parent.glob(".latest.tmp-*")
                         if p.is_symlink() and not process_alive(p.name.rpartition("-")[2])]
        for p in self.removed:
            p.unlink(missing_ok=True)

    @staticmethod
    def _take(path: Path, run: str, flag: str):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(path, "a+", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot write in {path.parent} ({e.strerror}): check {flag}") from e
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise ConfigError(f"run {run!r} is already training (process {holder} holds {path}): give this run "
                              "another --run-name, or wait for that one to end") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        return f

    def release(self) -> None:
        for f in self.files:
            f.close()
        self.files = []


def process_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def earlier_log(log_path: Path) -> Path:
    """Where the log of an earlier run of the same name goes when a new run takes the name: beside it, named by the
    time it was last written (logs/NAME.earlier-YYYYmmdd-HHMMSS.txt)."""
    stamp = datetime.datetime.fromtimestamp(log_path.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
    target, n = log_path.with_name(f"{log_path.stem}.earlier-{stamp}{log_path.suffix}"), 1
    while target.exists():
        n += 1
        target = log_path.with_name(f"{log_path.stem}.earlier-{stamp}-{n}{log_path.suffix}")
    return target


def take_name(run_dir: Path, log_path: Path, fresh: bool) -> str:
    """A fresh run may not take the name of a run that has checkpoints (it would overwrite them: resume it, or pick
    another name). The log of an earlier run of the name without checkpoints is kept under earlier_log's name, and
    this run starts a new log; returns the line that says so (empty when there was none). A resumed run appends."""
    if not fresh:
        return ""
    newest = newest_step_file(run_dir)
    if newest is not None:
        raise ConfigError(f"run {run_dir.name!r} already has checkpoints in {host_path(run_dir)} (newest "
                          f"{newest.name}): continue it with --resume {host_path(run_dir)}, or give this run another "
                          "--run-name")
    if not log_path.exists():
        return ""
    kept = earlier_log(log_path)
    os.replace(log_path, kept)
    return (f"{host_path(log_path)} held an earlier run of this name, which saved no checkpoint: kept as "
            f"{host_path(kept)}; this run writes a new {host_path(log_path)}")


def claim_run(run_dir: Path, log_path: Path, rank: int, fresh: bool) -> tuple[RunLock | None, str]:
    """On process 0: lock the run, check that its checkpoints and log can be written, and take its name (take_name).
    Every process raises the same ConfigError when any of it fails (so none waits for the others in a collective).
    Returns the lock (None elsewhere, or where flock does not exist) and take_name's line."""
    lock, problem, note = None, None, ""
    if rank == 0:
        try:
            if fcntl is not None:
                lock = RunLock(run_dir, log_path.parent)
            else:
                log_path.parent.mkdir(parents=True, exist_ok=True)
            try:  # fail now, not at the first save after hours of training
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                usable = (run_dir.is_dir() or not run_dir.exists()) and os.access(run_dir.parent, os.W_OK)
            except OSError:
                usable = False
            if not usable:
                raise ConfigError(f"cannot keep checkpoints in {run_dir} (not a writable directory): check "
                                  "--checkpoint-dir")
            note = take_name(run_dir, log_path, fresh)
        except (ConfigError, OSError) as e:
            problem = str(e) if isinstance(e, ConfigError) else f"cannot write run logs in {log_path.parent} ({e})"
            if lock is not None:
                lock.release()
                lock = None
    problem = broadcast_object(problem)
    if problem:
        raise ConfigError(problem)
    return lock, note
