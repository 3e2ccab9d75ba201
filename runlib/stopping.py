"""Stopping: SIGINT and SIGTERM as a run hears them, the flags every process acts on at the same step, and the
commands a stopped run prints to go on: the one that resumes it the way it was started, or starts it again."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from data.shards import remove_partial_writes
from runlib.checkpoints import newest_step_file
from runlib.errors import Interrupted


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM for the whole run. While nothing new could be saved (start-up, data, compile
    warm-up, the summary after the last checkpoint) a signal stops at once: the handler raises Interrupted, whose
    message says what is on disk (`state()`) and how to go on. While the loop trains (`deferred`) the first signal is
    a request: `asked` turns true and the loop stops at the end of the step (or of the validation chunk), saving a
    checkpoint. A second signal then ends the process at once, without saving: one line, the temporary files of saves
    under way removed, exit 128 + the signal. Under torchrun the terminal's Ctrl-C reaches every process and torchrun
    forwards one more: a second signal within GRACE_S of the first is the same request. The handlers before are
    restored on exit; outside the main thread nothing is installed."""

    GRACE_S = 3.0
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, prog: str | None = None):
        self.prog = prog or program_name()
        self.signal: str | None = None
        self.deferred = False  # True while a stop can wait for the end of the step
        self.where = "while starting"  # what the run was doing, for an immediate stop's message
        self.state = lambda: "nothing was saved"  # what is on disk and how to go on (set as the run goes)
        self.log = None  # writes a line to the run's log once there is one
        self.exit = os._exit  # the second signal's way out: no finally block can wait for anything
        self._at = 0.0
        self._before = {}

    @property
    def asked(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> "StopRequest":
        # a signal ignored from the start stays ignored (a script's background job: the terminal's Ctrl-C is not
        # meant for it)
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            self._before = {s: signal.signal(s, self._handle)
                            for s in self.SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._before.items():
            signal.signal(s, handler)
        self._before = {}

    def say(self, message: str) -> None:
        """The message on process 0's terminal (stderr) and in the run's log, if it has one."""
        if int(os.environ.get("RANK", 0)) != 0:
            return
        print(f"{self.prog}: {message}", file=sys.stderr, flush=True)
        if self.log is not None:
            try:
                self.log(message, console=False)
            except OSError:
                pass

    def _handle(self, signum, frame) -> None:
        name, code = signal.Signals(signum).name, 128 + signum
        if os.getpid() != self._pid:  # a child forked with these handlers (a worker pool): it ends there
            os._exit(code)
        if self.signal is None:
            self.signal, self._at = name, time.monotonic()
            if not self.deferred:
                message = f"stopped by {name} {self.where}; {self.state()}"
                self.say(message)
                raise Interrupted(message, code)
            self.say(f"{name}: stopping at the end of this step or validation chunk (again to stop at once, "
                     "without saving)")
        elif time.monotonic() - self._at > self.GRACE_S:
            self.say(f"{name} again: stopped at once, without saving; {self.state()}")
            remove_partial_writes()
            sys.stdout.flush()
            self.exit(code)


def stopping_at_once(prog: str, where: str, state: str, work) -> int:
    """work()'s exit status, a SIGINT or SIGTERM meanwhile ending it at once with one line ("PROG: stopped by SIGINT
    WHERE; STATE") and 128 + the signal: for programs whose stop can leave nothing half-done (sampling, scoring)."""
    with StopRequest(prog) as stop:
        stop.where, stop.state = where, lambda: state
        try:
            return work()
        except Interrupted as e:
            return e.code


def program_name() -> str:
    """This program's name for messages: the script that was started (train_gpt.py when it is not a script)."""
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "train_gpt.py"


def python_command() -> str:
    """How to name this interpreter in a command to type: python when that is the one PATH finds, else its path."""
    found = shutil.which("python")
    return "python" if found and os.path.abspath(found) == os.path.abspath(sys.executable) else sys.executable


def launched_as() -> list[str]:
    """The words that started this program, less its own arguments: the wrapper and its runtime flags
    ($KIT_LAUNCH, set by train.sh), torchrun with its process counts, or python and the script."""
    if os.environ.get("KIT_LAUNCH"):
        return shlex.split(os.environ["KIT_LAUNCH"])
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else program_name()
    if "LOCAL_WORLD_SIZE" not in os.environ:
        return [python_command(), script]
    per_node, world = os.environ["LOCAL_WORLD_SIZE"], os.environ.get("WORLD_SIZE", os.environ["LOCAL_WORLD_SIZE"])
    if per_node == world:
        return ["torchrun", "--standalone", f"--nproc_per_node={per_node}", script]
    nodes = int(world) // max(1, int(per_node))
    return ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={per_node}", "--node_rank=RANK_OF_THIS_NODE",
            f"--master_addr={os.environ.get('MASTER_ADDR', 'HOST')}",
            f"--master_port={os.environ.get('MASTER_PORT', '29500')}", script]


def host_path(path: Path | str) -> str:
    """A path of this process as the person who started the run types it. Under a wrapper ($KIT_HOST_ROOT, the
    repository on the host, and $KIT_HOST_CWD, where the wrapper was started) this process runs in the repository
    root, in Docker a mount of it: a path under it is shown from the host's current directory, any other as it is."""
    path = Path(path)
    root, cwd = os.environ.get("KIT_HOST_ROOT"), os.environ.get("KIT_HOST_CWD")
    if not (root and cwd):
        return str(path)
    here = Path.cwd()
    full = path if path.is_absolute() else here / path
    try:
        full = Path(root) / full.relative_to(here)
    except ValueError:
        return str(path)
    rel = os.path.relpath(full, cwd)
    return rel if not rel.startswith("..") else str(full)


def command_line(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


def resume_command(target: Path, run_name: str | None = None) -> str:
    """The one command that resumes from target (a run directory or checkpoint file) the way the run was started."""
    words = [*launched_as(), "--resume", host_path(target)]
    if run_name is not None and target.name != run_name:  # a checkpoint of another run, continued under this name
        words += ["--run-name", run_name]
    return command_line(words)


def restart_command() -> str:
    """The command that started this run, to start it again ($KIT_COMMAND under a wrapper)."""
    if os.environ.get("KIT_COMMAND"):
        return os.environ["KIT_COMMAND"]
    return command_line([*launched_as(), *sys.argv[1:]])


def on_disk(run_dir: Path | None, run_name: str | None, resumed_from: Path | None) -> str:
    """What a stopped run leaves to go on from, and the command that does: its newest checkpoint, else the one it
    resumed from, else nothing (the command that started it)."""
    newest = newest_step_file(run_dir) if run_dir is not None else None
    if newest is not None:
        return f"its newest checkpoint is {host_path(newest)}. Resume with: {resume_command(run_dir, run_name)}"
    if resumed_from is not None:
        return (f"the checkpoint it resumed from is unchanged, {host_path(resumed_from)}. Resume with: "
                f"{resume_command(resumed_from, run_name)}")
    return f"nothing was saved (no step had finished). Start again with: {restart_command()}"


class RunFlags:
    """What every process must act on at the same step: a stop asked (a signal to any process), a rolling checkpoint
    due (process 0's clock) and the run log failing (process 0 writes it). Alone, the flags are read as they are.
    Distributed, each step's flags are combined (one all-reduce of three numbers) and, on GPUs, read LAG steps later:
    no step then waits for the device to finish the one before, and every process reads the same step's result."""

    LAG = 2

    def __init__(self, device: torch.device, world_size: int):
        self.device, self.world_size = device, world_size
        self.lag = self.LAG if device.type == "cuda" else 0
        self.pending: deque = deque()  # (exchange number, device tensor) not read yet
        self.sent = 0
        self.rolling_from = 0  # rolling requests of exchanges before this one are stale: a save came since

    def exchange(self, stop: bool, rolling: bool = False, log_failed: bool = False,
                 now: bool = False) -> tuple[bool, bool, bool]:
        """(stop, rolling, log_failed) as every process takes them at this step; now: all that was sent, at once."""
        if self.world_size == 1:
            return stop, rolling, log_failed
        flags = torch.zeros(3, dtype=torch.int32, device=self.device)
        for i, value in enumerate((stop, rolling, log_failed)):
            if value:
                flags[i] = 1  # a fill on the device: no copy from the host
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.pending.append((self.sent, flags))
        self.sent += 1
        ready = len(self.pending) if now else len(self.pending) - self.lag
        out = [False, False, False]
        for _ in range(max(0, ready)):
            number, values = self.pending.popleft()
            for i, v in enumerate(values.tolist()):
                out[i] = out[i] or (bool(v) and (i != 1 or number >= self.rolling_from))
        return out[0], out[1], out[2]

    def saved(self) -> None:
        """A checkpoint was just written: rolling requests sent before now are answered."""
        self.rolling_from = self.sent
