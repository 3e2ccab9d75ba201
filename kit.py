"""What train_gpt.py and generate.py share around the model: errors, devices and processes, checkpoint files,
run names and locks, the run log, the environment report and wandb. Nothing here knows the model's arithmetic.

Importing this module has no side effects."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import errno
import inspect
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from data.shards import DataError, DiskFullError, atomic_write, remove_partial_writes

try:
    import fcntl  # run locks (POSIX); elsewhere runs are not locked
except ImportError:
    fcntl = None

if TYPE_CHECKING:
    from train_gpt import GPTConfig, Hyperparameters


# ----------------------------------------------------------------------------------------------------------------------
# Track targets

TRACK1_TARGET = 3.28
TRACK2_TARGET = 2.92  # train_gpt_medium.py's
# The record targets hold for this validation set only: the first 10,485,760 tokens of FineWeb's validation shard.
TRACK_VAL_FILES, TRACK_VAL_TOKENS = "fineweb_val_*.bin", 10_485_760
# dense bf16 TFLOP/s of one GPU, by a part of its name, for MFU (the H100's as measured, records/h100-2026-11-24.md)
PEAK_TFLOPS = {"H100": 800.0, "H200": 800.0, "A10": 125.0}


def target_comparable(target: float, val_files: str, val_tokens: int) -> bool:
    """Whether a run's final val loss can be compared with its target: any target of one's own, but a track's record
    target (3.28, 2.92) only on the track's validation set; a loss on other text says nothing about it."""
    if target <= 0:
        return False
    return target not in (TRACK1_TARGET, TRACK2_TARGET) or (
        Path(val_files).name == TRACK_VAL_FILES and val_tokens == TRACK_VAL_TOKENS)


# ----------------------------------------------------------------------------------------------------------------------
# Errors


class ConfigError(ValueError):
    """A bad flag value or combination; main() prints it without a traceback."""


class DeviceError(ConfigError):
    """A device problem of one process (its GPU is missing or too old): every process reports its own."""


class CheckpointError(ValueError):
    """A missing, unreadable or incompatible checkpoint."""


class Interrupted(BaseException):
    """The run stopped at a signal (or because its log cannot be written): the message, said already on the terminal
    and in the log, tells what was saved and the command that goes on. A BaseException, so that nothing on the way
    up (torch.compile wraps the exceptions of the code it traces) takes it for a failure."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class DivergedError(RuntimeError):
    """Training produced a non-finite loss or state; the run stops without saving it (main() exits with 3)."""


# ----------------------------------------------------------------------------------------------------------------------
# Devices and processes

MIN_TRAIN_CAPABILITY = (8, 0)  # bfloat16 tensor cores and FlexAttention's Triton kernels: A100, A10, 3090 and newer


def has_bf16(device: torch.device) -> bool:
    """Whether the device computes in bfloat16 natively (CPU: not used; GPUs: compute capability >= 8.0)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_TRAIN_CAPABILITY


def resolve_device(spec: str | None, local_rank: int = 0, train: bool = True) -> torch.device:
    """The device of --device (auto or None: CUDA when there is a GPU, else the CPU; cuda: this process's GPU by
    LOCAL_RANK). For training, the GPU is made current and must be able to train; sampling runs on any GPU."""
    if spec in (None, "auto"):
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", spec):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but no CUDA GPU is visible (use --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            who = f"process {local_rank} needs" if train else "--device asks for"
            raise DeviceError(f"{who} GPU {device.index} but only {torch.cuda.device_count()} are visible")
        if not train:
            return device
        torch.cuda.set_device(device)
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_TRAIN_CAPABILITY:
            raise DeviceError(
                f"GPU {device.index} ({torch.cuda.get_device_name(device)}) has compute capability {cap[0]}.{cap[1]}; "
                f"training needs {MIN_TRAIN_CAPABILITY[0]}.{MIN_TRAIN_CAPABILITY[1]} or newer for bfloat16 and "
                "FlexAttention (A100, A10, L4, RTX 3090/4090, H100). generate.py still samples on it in fp32; "
                "--device cpu trains slowly")
    return device


def busy_cores(interval_s: float = 0.25) -> float | None:
    """How many of this machine's cores other processes keep busy now, from two reads of /proc/stat interval_s apart
    (None where there is no /proc/stat). This process sleeps meanwhile, so it counts nothing of its own."""
    def ticks() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # all, idle and waiting for I/O

    try:
        (total0, idle0), _, (total1, idle1) = ticks(), time.sleep(interval_s), ticks()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def choose_cpu_threads(cores: int) -> tuple[int, str]:
    """torch's thread count for training on the CPU, and why: OMP_NUM_THREADS when set, else this process's cores
    (its affinity) less those other processes keep busy now. Threads that share a core with other work wait for each
    other at every operation: on 2 cores with the other one busy, 1 thread ran the tiny preset 2.5 times faster than
    2. Thread counts change fp32 summation order: OMP_NUM_THREADS fixes the count for runs to compare bit for bit."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    busy = busy_cores()
    if busy is None:
        return torch.get_num_threads(), "torch's default"
    threads = max(1, min(cores, round(cores - busy)))
    return threads, (f"{cores} core(s), {busy:.1f} busy with other work; OMP_NUM_THREADS=N chooses" if threads < cores
                     else f"{cores} core(s) free; OMP_NUM_THREADS=N chooses")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------------------------------------------------
# The GPUs at hand and what fits on them (--preset auto)


@dataclasses.dataclass(frozen=True)
class GPUInfo:
    name: str
    total_gib: float
    free_gib: float
    capability: tuple[int, int]

    def __str__(self) -> str:
        return f"{self.name} ({self.free_gib:.1f} GiB free)"


def visible_gpus(index: int | None = None) -> list[GPUInfo]:
    """The GPUs this process sees (or only GPU `index`), with their free memory now. Asking for free memory opens a
    CUDA context on each GPU asked about: a training process asks about its own GPU only."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()) if index is None else [index]:
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        out.append(GPUInfo(props.name, total / 2**30, free / 2**30, (props.major, props.minor)))
    return out


# The track-1 model's peak allocated memory in one process, measured on an H100 (records/h100-2026-11-24.md): eager
# 57.7 GiB with 49,152-token sequences and 17.47 GiB with 12,288, so 4.06 GiB that does not grow with the sequence
# (weights, gradients, optimiser states) and 1.091 MiB per token; compiled 39.11 GiB at 49,152, 0.730 MiB per token.
PEAK_FIXED_GIB = 4.06
PEAK_PER_TOKEN_GIB = {"compiled": (39.11 - 4.06) / 49152, "eager": (57.7 - 17.47) / (49152 - 12288)}
PEAK_MARGIN, PEAK_RESERVE_GIB = 1.10, 1.0  # the allocator's cache and fragmentation; CUDA context and workspaces


def peak_gib(seq_len: int, compiled: bool) -> float:
    """The estimated peak allocated GiB of a track-1 process training on seq_len-token sequences."""
    return PEAK_FIXED_GIB + PEAK_PER_TOKEN_GIB["compiled" if compiled else "eager"] * seq_len


def fits(seq_len: int, compiled: bool, free_gib: float) -> bool:
    return peak_gib(seq_len, compiled) * PEAK_MARGIN + PEAK_RESERVE_GIB <= free_gib


def sequence_shapes(global_batch: int, world_size: int, max_len: int, block: int, min_len: int = 1024) -> list:
    """(seq_len, seqs): global_batch split into seqs equal sequences, a multiple of world_size of them, each a
    multiple of `block` tokens from min_len to max_len. Halvings of max_len come first (the shapes of the measured
    presets), longest first, then the other splits, longest first (for process counts that do not divide 8)."""
    shapes = [(global_batch // k, k) for k in range(world_size, global_batch // min_len + 1, world_size)
              if global_batch % k == 0 and (global_batch // k) % block == 0 and global_batch // k <= max_len]
    halving = [s for s in shapes if max_len % s[0] == 0 and (max_len // s[0]).bit_count() == 1]
    return halving + [s for s in shapes if s not in halving]


FIT_FIELDS = ("train_seq_len", "seqs_per_step", "val_seq_len")  # 0: fit_to_gpus chooses


def fit_to_gpus(hp: Hyperparameters, gpus: list[GPUInfo], world_size: int, record: Hyperparameters, tiny: dict,
                block: int) -> tuple[Hyperparameters, str]:
    """The settings with every FIT_FIELDS 0 chosen for these GPUs, one per process, and why. The global batch stays
    the record's (393,216 tokens, or seqs_per_step x train_seq_len when both are given), split into the longest
    sequences whose estimated peak memory (peak_gib) fits the GPU with the least free memory; validation chunks
    shrink with them. A value given is kept even when it does not fit. Without GPUs: the `tiny` values wherever the
    settings still hold the record's."""
    if all(getattr(hp, n) for n in FIT_FIELDS):
        return hp, ""
    if not gpus:  # named for what it runs (a run id, a log's preset line): tiny, not auto
        tiny = {k: v for k, v in tiny.items() if getattr(hp, k) in (getattr(record, k), 0)}
        return dataclasses.replace(hp, preset="tiny", **tiny), "no GPU: the tiny preset's settings, on the CPU"
    gpu = min(gpus, key=lambda g: g.free_gib)
    if gpu.capability < MIN_TRAIN_CAPABILITY:
        raise DeviceError(f"{gpu.name} has compute capability {gpu.capability[0]}.{gpu.capability[1]}; training "
                          "needs 8.0 or newer (bfloat16); --device cpu --preset tiny trains on the CPU")
    batch = (hp.train_seq_len * hp.seqs_per_step) or record.global_batch_tokens
    longest = max(record.train_seq_len, hp.train_seq_len)
    shapes = [(n, k) for n, k in sequence_shapes(batch, world_size, longest, block)
              if hp.train_seq_len in (0, n) and hp.seqs_per_step in (0, k)]
    if not shapes:
        raise ConfigError(f"no sequence length splits a global batch of {batch:,} tokens over {world_size} "
                          f"process(es) in multiples of {block} tokens; give --train-seq-len")
    seq_len, seqs = next((s for s in shapes if fits(s[0], hp.compile, gpu.free_gib)), shapes[-1])
    val_len = record.val_seq_len * seq_len // record.train_seq_len  # validation chunks shrink with the sequences
    val_seq_len = hp.val_seq_len or max([c for c in range(block, val_len + 1, block) if hp.val_tokens % c == 0]
                                        or [seq_len])
    fp8 = "off" if not hp.fp8 else "on" if gpu.capability >= (8, 9) else \
        "off (compute capability {}.{})".format(*gpu.capability)
    why = (f"{len(gpus)} x {gpu}: {seq_len:,}-token sequences, {seqs // world_size} micro-step(s) per step "
           f"({seqs} sequences of the {batch:,}-token batch), validation in {val_seq_len:,}-token chunks, FP8 {fp8}; "
           f"estimated peak {peak_gib(seq_len, hp.compile):.1f} GiB {'compiled' if hp.compile else 'eager'}"
           + ("" if fits(seq_len, hp.compile, gpu.free_gib) else ", more than fits: expect out-of-memory"))
    return dataclasses.replace(hp, train_seq_len=seq_len, seqs_per_step=seqs, val_seq_len=val_seq_len), why


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint files

CHECKPOINT_FORMAT = "nanogpt-speedrun-kit/checkpoint"
CHECKPOINT_VERSION = 2  # 2: record-28 model (attention gate, c_fc as (dim, 4 dim)) and per-shard loader state


STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def nonfinite_tensors(state, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a nested dict/list that hold a NaN or an infinity."""
    if isinstance(state, Tensor):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    return [name for k, v in items for name in nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))]


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same directory, flushed, then renamed over the target."""
    atomic_write(path, lambda f: torch.save(obj, f))


def point_latest(checkpoint_dir: Path, target: Path) -> None:
    """Make checkpoint_dir/latest a relative symlink to target, replaced atomically."""
    link = checkpoint_dir / "latest"
    tmp = checkpoint_dir / f".latest.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, checkpoint_dir), tmp)
    os.replace(tmp, link)


def newest_step_file(run_dir: Path) -> Path | None:
    best = None
    for p in run_dir.iterdir() if run_dir.is_dir() else []:
        m = STEP_FILE.match(p.name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return best[1] if best else None


def resolve_checkpoint(spec: str, run_name: str | None = None, checkpoint_dir: str = "checkpoints") -> Path:
    """A checkpoint file from a file, a run directory (its newest step) or "auto" (latest of run_name, or latest)."""
    root = Path(checkpoint_dir)
    if spec == "auto":
        if run_name:
            found = newest_step_file(root / run_name)
            if found is None:
                runs = sorted(d.name for d in root.iterdir() if d.is_dir() and newest_step_file(d)) \
                    if root.is_dir() else []
                raise CheckpointError(f"no checkpoint of run {run_name!r} in {root / run_name}; "
                                      + (f"runs with checkpoints there: {', '.join(runs)}" if runs else
                                         f"no run in {root} has one"))
            return found
        spec = str(root / "latest")
    path = Path(spec)
    if path.is_dir():
        found = newest_step_file(path)
        if found is None:
            raise CheckpointError(f"{path} holds no step_*.pt checkpoint")
        return found
    if not path.exists():
        if path.name == "latest" and path.is_symlink():
            runs = sorted(d.name for d in path.parent.iterdir() if d.is_dir() and newest_step_file(d))
            raise CheckpointError(
                f"{path} points at {os.readlink(path)}, which no longer exists; "
                + (f"runs with checkpoints in {path.parent}: {', '.join(runs)} (resume one with --resume "
                   f"{path.parent / runs[0]})" if runs else f"no run in {path.parent} has a checkpoint"))
        raise CheckpointError(f"checkpoint {path} does not exist" +
                              ("; no run has saved one yet (train with --save-every or let a run finish)"
                               if path.name == "latest" else ""))
    return path.resolve()


def load_checkpoint(path: Path) -> dict:
    """Load with weights_only=True: a checkpoint holds tensors and plain data, never code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, not a file at all
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was not written by this trainer (no {CHECKPOINT_FORMAT!r} marker)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')}; this trainer reads "
                              f"version {CHECKPOINT_VERSION}")
    return ckpt


RESUME_KEYS = {"run_id": str, "step": int, "train_time_ms": (int, float), "model_config": dict,
               "hyperparameters": dict, "model": dict, "optimizers": dict, "rng": dict}


def check_resumable(ckpt: dict, path: Path, hp: Hyperparameters) -> None:
    """Everything a resume reads is there and has the right type, and the run has steps left: checked before the
    model is built, so a hollow checkpoint costs a line, not a compile and a traceback."""
    problems = [f"{key} ({kind.__name__ if isinstance(kind, type) else kind[0].__name__} expected)"
                for key, kind in RESUME_KEYS.items() if not isinstance(ckpt.get(key), kind)]
    if not isinstance(ckpt.get("loader"), dict) or not {"shard", "pos", "epoch", "files"} <= set(ckpt["loader"]):
        problems.append("loader (the data position)")
    if problems:
        raise CheckpointError(f"{path} cannot be resumed: it lacks or mangles {', '.join(problems)}")
    if hp.num_iterations < ckpt["step"]:
        raise ConfigError(f"{path} is at step {ckpt['step']}, past --num-iterations {hp.num_iterations}: resume "
                          f"with --num-iterations {ckpt['step']} or more")


def check_model_config(ckpt: dict, cfg: GPTConfig, path: Path) -> None:
    saved = ckpt["model_config"]
    diffs = [f"{k}={saved.get(k)} (this run: {v})" for k, v in asdict(cfg).items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} holds a different model: " + ", ".join(diffs) +
                              "; resume with the same --preset and model sizes as the run that wrote it")


def load_weights(model: nn.Module, ckpt: dict, path: Path) -> None:
    try:
        with torch.no_grad():
            model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # torch lists the problems one per line after a heading: name the first
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(f"{path}: its weights do not fit this model ({lines[min(1, len(lines) - 1)]})") from e


def optimizer_state(ckpt: dict, name: str, opt, model: nn.Module, path: Path) -> dict:
    """The saved full state of optimiser `name`, checked against the model's parameters and opt.STATE_KEYS."""
    saved = ckpt["optimizers"].get(name)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} has no {name} optimiser state")
    params = dict(model.named_parameters())
    for pname, entry in saved.items():
        p = params.get(pname)
        if (p is None or not isinstance(entry, dict) or set(entry) != set(opt.STATE_KEYS)
                or any(entry[key].shape != p.shape for key in opt.STATE_KEYS if key != "step")):
            raise CheckpointError(f"{path}: its {name} state for {pname!r} does not fit this model")
    return saved


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """Weights without torch.compile's _orig_mod prefix, on the CPU."""
    base = getattr(model, "_orig_mod", model)
    return {k: v.detach().cpu().clone() for k, v in base.state_dict().items()}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, path: Path | None = None) -> None:
    try:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its random-number state is unusable ({e})") from e


# ----------------------------------------------------------------------------------------------------------------------
# Stopping: signals, and the commands that go on from a stop


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


def checkpoint_kind(hp: Hyperparameters, step: int, start_step: int, rolling: bool) -> str | None:
    """The checkpoint the loop writes on reaching step: "kept" (the final one, every --save-every steps), "rolling"
    (when the clock asks for one; the next save of any kind replaces it) or None. None at the step a run starts or
    resumes at: that state is on disk already."""
    last = step == hp.num_iterations
    if step <= start_step:
        return None
    if (last and hp.save_final) or (hp.save_every > 0 and step % hp.save_every == 0):
        return "kept"
    return "rolling" if not last and rolling else None


def save_checkpoint(state: dict, ckpt_root: Path, run_id: str, step: int, kind: str,
                    rolling: Path | None) -> tuple[Path, Path | None]:
    """Write step's checkpoint atomically, point latest at it and delete the rolling checkpoint it supersedes;
    returns (its path, the rolling checkpoint now on disk)."""
    path = ckpt_root / run_id / f"step_{step:06d}.pt"
    atomic_save(state, path)
    point_latest(ckpt_root, path)
    if rolling is not None and rolling != path:
        rolling.unlink(missing_ok=True)
    return path, path if kind == "rolling" else None


# ----------------------------------------------------------------------------------------------------------------------
# Run names and locks


def open_run(hp: Hyperparameters) -> tuple[str, dict | None, Path | None]:
    """The run id and, when resuming, the checkpoint (checked before any model is built) and its path."""
    ckpt, path = None, None
    if hp.resume:
        path = resolve_checkpoint(hp.resume, hp.run_name, hp.checkpoint_dir)
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, path, hp)
    run_id = hp.run_name or (ckpt["run_id"] if ckpt else broadcast_object(new_run_id(hp)))
    if not valid_run_name(run_id):
        raise CheckpointError(f"{path} names its run {run_id!r}, not a plain file name: pass --run-name")
    return run_id, ckpt, path


def valid_run_name(name: str) -> bool:
    """A run name is a single, plain path component, so logs/<run>.txt and checkpoints/<run>/ stay where they are."""
    return bool(re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,199}", name))


def new_run_id(hp: Hyperparameters) -> str:
    return f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{hp.preset}-{uuid.uuid4().hex[:6]}"


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


# ----------------------------------------------------------------------------------------------------------------------
# Run log, environment, wandb


class RunLog:
    """Prints on process 0 and appends to logs/<run_id>.txt. A write that fails (a full disk, a file system gone)
    is not an exception in the middle of a step: the log keeps the first problem in `failed`, stops writing to the
    file, and the loop stops the run at the end of the step with a checkpoint (run_steps)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.failed: str | None = None  # why the file could not be written, once it could not
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, text: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(text, flush=True)
        if self.failed is not None:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as e:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            self.failed = (f"the run log {host_path(self.path)} cannot be written "
                           f"({'its disk is full' if full else e.strerror or type(e).__name__})")


def environment_report(device: torch.device) -> str:
    lines = [f"python {platform.python_version()} ({platform.python_implementation()})",
             f"platform {platform.platform()}",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
             f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}"]
    if device.type == "cuda":
        n = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(n)]
        lines.append(f"gpus {n}: {', '.join(names)}")
        if shutil.which("nvidia-smi"):
            try:
                lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
            except (OSError, subprocess.TimeoutExpired) as e:
                lines.append(f"nvidia-smi failed: {e}")
    else:
        lines.append(f"cpu threads {torch.get_num_threads()}")
    return "\n".join(lines)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved")
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB max resident (process)"


class WandbLogger:
    def __init__(self, hp: Hyperparameters, run_id: str, resumed: bool):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("--wandb needs the wandb package: pip install wandb") from e
        self.wandb = wandb
        self.run = wandb.init(project=hp.wandb_project, name=run_id, id=re.sub(r"[^A-Za-z0-9_-]", "-", run_id),
                              resume="allow" if resumed else None, config=asdict(hp), dir=hp.log_dir)

    def log(self, metrics: dict, step: int) -> None:
        self.wandb.log(metrics, step=step)

    def finish(self, log_path: Path | None) -> None:
        if log_path is not None and log_path.exists():
            art = self.wandb.Artifact(f"log-{self.run.id}", type="run-log")
            art.add_file(str(log_path))
            self.run.log_artifact(art)
        self.run.finish()


class Checkpointer:
    """The run's checkpoints: which step gets one ("kept": the final one and every --save-every steps; "rolling":
    every --save-every-minutes, replaced by the next save), written only from a finite state, then latest pointed
    at it. Saving is collective (the optimiser state is gathered); process 0 writes."""

    def __init__(self, hp: Hyperparameters, run_id: str, start_step: int, device: torch.device, rank: int,
                 world_size: int, resumed_from: Path | None = None):
        self.hp, self.run_id, self.start_step = hp, run_id, start_step
        self.device, self.rank, self.world_size = device, rank, world_size
        self.root = Path(hp.checkpoint_dir)
        self.run_dir = self.root / run_id
        self.resumed_from = resumed_from
        self.rolling: Path | None = None  # the rolling checkpoint on disk
        self.saved_step = start_step  # the newest step whose state is on disk
        self.last_save = time.monotonic()
        self.flags: RunFlags | None = None  # the loop's, told of every save

    def rolling_due(self) -> bool:
        """Whether --save-every-minutes have passed since the last save, by this process's clock (process 0's decides
        for all: RunFlags)."""
        return self.hp.save_every_minutes > 0 and time.monotonic() - self.last_save >= 60 * self.hp.save_every_minutes

    def on_disk(self) -> str:
        """What the run has saved and the command that goes on from it (kit.on_disk)."""
        return on_disk(self.run_dir, self.run_id, self.resumed_from)

    def stopped(self, trainer, step: int, log: RunLog, signal_name: str | None, log_problem: str | None = None
                ) -> Interrupted:
        """Save at a stop (unless this step's state is on disk already) and say what was saved and how to resume:
        for a signal (exit 128 + its number) or for a run log that cannot be written (exit 2)."""
        at = f"at step {step} of {self.hp.num_iterations}"
        why = f"stopped by {signal_name} {at}" if log_problem is None else f"stopped {at}: {log_problem}"
        then = self.on_disk()
        if step > self.saved_step:
            try:
                self.save(trainer, step, "kept", log)
                then = (f"saved {host_path(self.run_dir / f'step_{step:06d}.pt')}. Resume with: "
                        f"{resume_command(self.run_dir, self.run_id)}")
            except DiskFullError as e:
                if log_problem is None:
                    raise
                then = f"no checkpoint of step {step} could be saved either ({e.strerror}); {then}"
        how = f"{why}; {then}"
        if self.rank == 0:
            print(f"{program_name()}: {how}", file=sys.stderr, flush=True)
            log.write(how, console=False)
        code = 2 if log_problem is not None else 130 if signal_name == "SIGINT" else 143
        return Interrupted(how, code)

    def check(self, trainer, log: RunLog, val_loss: float | None = None, state: dict | None = None) -> None:
        """DivergedError (also written to the log) when a training loss so far, the validation loss or the state
        about to be saved is not finite: nothing is saved from such a state, and latest keeps pointing at the last
        good checkpoint."""
        try:
            trainer.check_finite()
            if val_loss is not None and not math.isfinite(val_loss):
                raise DivergedError(f"the validation loss at step {trainer.step} is {val_loss}")
            bad = nonfinite_tensors({k: state[k] for k in ("model", "optimizers")}) if state is not None else []
            if bad:
                more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                raise DivergedError(f"the state after step {trainer.step} holds non-finite values "
                                    f"({', '.join(bad[:3])}{more})")
        except DivergedError as e:
            newest = newest_step_file(self.run_dir)
            last_good = f"the run's last checkpoint is {newest}" if newest else "the run has no checkpoint"
            message = (f"training diverged: {e}; nothing was saved from it and {last_good} (resume from a "
                       "checkpoint with lower learning rates)")
            log.write(f"stopped: {message}", console=False)
            raise DivergedError(message) from None

    def save(self, trainer, step: int, kind: str, log: RunLog) -> None:
        self.check(trainer, log)
        state = trainer.state_dict(self.run_id)
        self.check(trainer, log, state=state)
        full = None  # a disk-full message, which every process raises (none waits for the others in vain)
        if self.rank == 0:
            try:
                path, self.rolling = save_checkpoint(state, self.root, self.run_id, step, kind, self.rolling)
                log.write(f"saved checkpoint {path}" + (" (rolling: replaced by the next save)" if kind == "rolling"
                                                       else ""))
            except DiskFullError as e:
                full = e.strerror
        del state
        full = broadcast_object(full)  # also the barrier: no process runs ahead of the write
        if full is not None:
            raise DiskFullError(errno.ENOSPC, full)
        self.saved_step, self.last_save = step, time.monotonic()
        if self.flags is not None:
            self.flags.saved()


def duration(seconds: float) -> str:
    """3h04m, 12m05s or 42s."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class RunReport:
    """What a run tells: its log file (process 0; a new one begins with the trainer's source), the console, wandb
    when asked for, and the closing summary."""

    RULE = "=" * 100

    def __init__(self, hp: Hyperparameters, run_id: str, rank: int, resumed: bool):
        self.hp, self.run_id = hp, run_id
        self.log = RunLog(Path(hp.log_dir) / f"{run_id}.txt" if rank == 0 else None)
        self.wandb = WandbLogger(hp, run_id, resumed) if hp.wandb and rank == 0 else None
        self.peak_flops: float | None = None  # the processes' summed peak FLOP/s and
        self.flops_per_token: float | None = None  # the model's training FLOPs per token, for MFU (set_throughput)
        self.last_train_loss: float | None = None

    def set_throughput(self, device: torch.device, world_size: int, flops_per_token: float) -> None:
        """What the terminal's MFU needs: the GPU's peak, where PEAK_TFLOPS knows it, and the model's FLOPs."""
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        self.peak_flops = peak * 1e12 * world_size if peak else None
        self.flops_per_token = flops_per_token

    def progress(self, step: int, elapsed_ms: float, done_steps: int) -> str:
        """For the terminal: percentage, tokens/s, MFU where known and the time the remaining steps take at this
        session's pace (done_steps steps in elapsed_ms of this session)."""
        hp = self.hp
        if done_steps <= 0 or elapsed_ms <= 0:
            return f" ({100 * step / hp.num_iterations:.0f}%)"
        tokens_per_s = done_steps * hp.global_batch_tokens / (elapsed_ms / 1000)
        eta_s = (hp.num_iterations - step) * elapsed_ms / done_steps / 1000
        mfu = (f" MFU {tokens_per_s * self.flops_per_token / self.peak_flops:.1%}"
               if self.peak_flops and self.flops_per_token else "")
        return (f" ({100 * step / hp.num_iterations:.0f}%) {tokens_per_s:,.0f} tokens/s{mfu} ETA "
                f"{duration(eta_s)}")

    def write(self, text: str, console: bool = True) -> None:
        self.log.write(text, console)

    def start(self, source, device: torch.device, resumed_from: str | None, removed: int, note: str = "") -> None:
        """source: the trainer's code, or a callable that reads it (only a new log file gets it). note: a line for
        the terminal and the log before the run's own (claim_run's)."""
        rule = self.RULE
        if self.log.path is not None and not self.log.path.exists():
            self.write(source() if callable(source) else source, console=False)
        if note:
            self.write(note)
        if resumed_from:
            self.write(f"{rule}\n{resumed_from}")
        if removed:
            self.write(f"removed {removed} temporary file(s) that interrupted saves had left behind")
        self.write(f"{rule}\nconfig {json.dumps(asdict(self.hp), indent=1)}", console=False)
        self.write(f"{rule}\n{environment_report(device)}\n{rule}", console=False)

    def val(self, step: int, val_loss: float, train_time_ms: float) -> None:
        line = (f"step:{step}/{self.hp.num_iterations} val_loss:{val_loss:.4f} train_time:{train_time_ms:.0f}ms "
                f"step_avg:{train_time_ms / max(step, 1):.2f}ms")
        self.write(line, console=False)  # the log keeps the record's line; the terminal adds the last train loss
        if self.log.path is not None:
            train = f" (last train_loss:{self.last_train_loss:.4f})" if self.last_train_loss is not None else ""
            print(line + train, flush=True)
        if self.wandb:
            self.wandb.log({"val/loss": val_loss, "val/train_time_ms": train_time_ms}, step=step)

    def step(self, step: int, elapsed_ms: float, train_loss: float | None, metrics: dict,
             session: tuple[int, float] = (0, 0.0)) -> None:
        """session: the steps this session has run and their time, for the terminal's pace."""
        loss = f" train_loss:{train_loss:.4f}" if train_loss is not None else ""
        line = (f"step:{step}/{self.hp.num_iterations}{loss} train_time:{elapsed_ms:.0f}ms "
                f"step_avg:{elapsed_ms / step:.2f}ms")
        self.write(line, console=False)  # the record's step line, which records/report.py reads
        if self.log.path is not None:
            print(line + self.progress(step, session[1], session[0]), flush=True)
        if train_loss is not None:
            self.last_train_loss = train_loss
        if self.wandb and train_loss is not None:
            tokens_per_s = step * self.hp.global_batch_tokens / (elapsed_ms / 1000)
            self.wandb.log({"train/loss": train_loss, **metrics, "train_time_ms": elapsed_ms,
                            "step_avg_ms": elapsed_ms / step, "tokens_per_s": tokens_per_s}, step=step)

    def write_summary_file(self, flops_per_token: float | None, comparable: bool) -> None:
        """logs/<run_id>.md (and .png) for a run on the record's validation set: the run against its track's public
        record (records/report.py). A report that cannot be written costs a warning, never the run."""
        if self.log.path is None or not comparable:
            return
        from records import report  # the report's own parser reads the log just written

        try:
            md = report.write_run_report(self.log.path, flops_per_token)
        except (OSError, ValueError) as e:
            self.write(f"warning: no run report next to the log ({e})")
            return
        self.write(f"run report: {md}")

    def finish(self, val_loss: float, val_step: int, train_time_ms: float, device: torch.device, world_size: int,
               unaligned_steps: int, flops_per_token: float | None = None) -> dict:
        hp, steps = self.hp, self.hp.num_iterations
        tokens, seconds = steps * hp.global_batch_tokens, train_time_ms / 1000
        comparable = target_comparable(hp.target_val_loss, hp.val_files, hp.val_tokens)
        summary = {
            "run_id": self.run_id, "final_val_loss": val_loss, "val_step": val_step, "steps": steps,
            "train_time_s": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"), "peak_memory": peak_memory(device),
            "world_size": world_size, "device": device.type, "unaligned_steps": unaligned_steps,
            "reached_target": bool(val_loss <= hp.target_val_loss) if comparable else None,
        }
        if hp.target_val_loss <= 0:
            target = "no target"
        elif not comparable:
            target = (f"target {hp.target_val_loss} not compared: it holds for the first {TRACK_VAL_TOKENS:,} tokens "
                      f"of {TRACK_VAL_FILES}, this run validated on {hp.val_tokens:,} tokens of {hp.val_files}")
        else:
            target = f"target {hp.target_val_loss}: {'reached' if summary['reached_target'] else 'not reached'}"
        if unaligned_steps:
            self.write(f"loader: {unaligned_steps} step(s) of this session started sequences inside documents (no "
                       "BOS close enough to align them; the record's loader stops there)")
        self.write(f"{self.RULE}\nfinal val_loss:{val_loss:.4f} train_time:{seconds:.1f}s ({steps} steps, "
                   f"{tokens:,} tokens, {summary['tokens_per_s']:,.0f} tokens/s) peak memory: "
                   f"{summary['peak_memory']}; {target}")
        self.write_summary_file(flops_per_token, comparable)
        if self.wandb:
            self.wandb.log({"final/val_loss": val_loss, "final/train_time_s": seconds,
                            "final/tokens_per_s": summary["tokens_per_s"]}, step=steps)
            self.wandb.finish(self.log.path)
        return summary


# ----------------------------------------------------------------------------------------------------------------------
# A settings dataclass on the command line


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (its usage of some 25 flags would bury the message), that names the flag a
    mistyped one was probably meant to be, and takes no abbreviations: --num-iteration 5 is a mistake, not
    --num-iterations."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        hint = "" if " is --set " in message else self.did_you_mean(message)  # SettingsCLI.unknown said it
        self.exit(2, f"{self.prog}: error: {message}{hint} (see --help)\n")

    def did_you_mean(self, message: str) -> str:
        """"; did you mean --x?" for the first unrecognised flag of an argparse message that is close to one."""
        words = re.findall(r"(?<![\w-])--?[\w-]+", message.partition("unrecognized arguments:")[2])
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        for word in words:
            close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.75)
            if close:
                return f"; did you mean {close[0]}?"
        return ""


def help_width() -> int:
    return shutil.get_terminal_size().columns - 2  # argparse's own rule


def shell_word(value) -> str:
    """A value as --set reads it back: true/false, none for no value."""
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


class SettingsCLI:
    """The fields of a settings dataclass as command-line words. The fields in `flags` have a flag of their own
    (--field-name; the `switches`, booleans, a flag that turns their default around), every other one is set with
    --set FIELD=VALUE, so that each field has one spelling. Help texts are the fields' trailing comments."""

    KIND_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text",
                  "str | None": "text, or none"}

    def __init__(self, cls, flags: tuple[str, ...], switches: dict[str, str]):
        self.cls, self.flags, self.switches = cls, flags, switches

    def field_help(self) -> dict[str, str]:
        helps = {}
        try:
            src = inspect.getsource(self.cls)
        except (OSError, TypeError):
            return helps
        for line in src.splitlines():
            m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
            if m:
                helps[m.group(1)] = m.group(2)
        return helps

    def kind(self, name: str) -> str:
        """A field's type as the dataclass spells it: int, float, bool, str or str | None."""
        t = next(f for f in dataclasses.fields(self.cls) if f.name == name).type
        return t if isinstance(t, str) else getattr(t, "__name__", str(t))

    def set_fields(self) -> list[str]:
        """The fields --set takes: those without a flag of their own."""
        return [f.name for f in dataclasses.fields(self.cls) if f.name not in self.flags]

    def field_flag(self, name: str) -> str:
        """How the command line sets a field: its flag, or --set NAME=VALUE."""
        if name in self.flags:
            return self.switches.get(name, "--" + name.replace("_", "-"))
        return f"--set {name}=VALUE"

    def spelled(self, name: str) -> str:
        """A setting as messages name it: --flag-name, or --set name."""
        return f"--{name.replace('_', '-')}" if name in self.flags else f"--set {name}"

    def parse_value(self, name: str, text: str):
        """TEXT as a value of the field NAME: int, float, str, bool (true/false) or optional str (none: no value)."""
        kind = self.kind(name)
        try:
            if kind == "int":
                return int(text)
            if kind == "float":
                return float(text)
            if kind == "bool":
                return {"true": True, "false": False}[text.lower()]
            if kind == "str | None":
                return None if text.lower() == "none" else text
            if kind == "str":
                return text
        except (ValueError, KeyError):
            raise ConfigError(f"--set {name}={text}: {name} takes {self.KIND_WORDS[kind]}, got {text!r}") from None
        raise ConfigError(f"--set {name}: a field of type {kind} cannot be set from the command line")

    def set_values(self, pairs: list[str]) -> dict:
        """The --set FIELD=VALUE pairs as field values (a field given twice: the last one)."""
        settable, values = self.set_fields(), {}
        for pair in pairs:
            name, sep, text = pair.partition("=")
            if not sep:
                raise ConfigError(f"--set {pair}: expected FIELD=VALUE, e.g. --set model_dim=64")
            if name in self.flags:
                raise ConfigError(f"--set {pair}: {name} has a flag of its own, {self.field_flag(name)}")
            if name not in settable:
                close = difflib.get_close_matches(name.replace("-", "_"), settable, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"--set {pair}: no field {name!r}{hint}; --set takes {', '.join(settable)}")
            values[name] = self.parse_value(name, text)
        return values

    def epilog(self, defaults, default_preset: str, helps: dict[str, str]) -> str:
        """--help's table of the --set fields: name, default, meaning (wrapped like argparse's own help)."""
        names = self.set_fields()
        words = {name: shell_word(getattr(defaults, name)) for name in names}
        w1, w2 = max(map(len, names)), max(map(len, words.values()))
        width = max(help_width(), w1 + w2 + 40)
        lines = [textwrap.fill(f"--set FIELD=VALUE (repeatable) sets a field without a flag of its own (VALUE: a "
                               f"number, text, true/false, or none). The fields, their {default_preset} defaults "
                               "and meanings:", width)]
        for name in names:
            lines.append(textwrap.fill(helps.get(name, ""), width,
                                       initial_indent=f"  {name:<{w1}}  {words[name]:<{w2}}  ",
                                       subsequent_indent=" " * (w1 + w2 + 6)))
        return "\n".join(lines)

    def add_flags(self, parser: argparse.ArgumentParser, defaults, default_preset: str, helps: dict[str, str],
                  skip: tuple[str, ...] = ()) -> None:
        """One flag per field in `flags` (but `skip`), typed by the field, its help the field's comment."""
        for f in dataclasses.fields(self.cls):
            if f.name not in self.flags or f.name in skip:
                continue
            if f.name in self.switches:  # each turns its field's usual default around
                on = getattr(self.cls(), f.name) is False
                parser.add_argument(self.switches[f.name], dest=f.name, action="store_true" if on else "store_false",
                                    help=helps.get(f.name, "") if on else f"do not {helps.get(f.name, '')}")
                continue
            kind = {"int": int, "float": float, "str": str, "str | None": str}[self.kind(f.name)]
            parser.add_argument(self.field_flag(f.name), type=kind, metavar=f.name.upper(),
                                help=f"{helps.get(f.name, '')} ({default_preset} default: {getattr(defaults, f.name)})")

    def preset(self, name: str, presets: dict[str, dict]):
        """The settings a preset names: the dataclass's defaults with the preset's values."""
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
        return dataclasses.replace(self.cls(), preset=name, **presets[name])

    def saved(self, ckpt: dict, path: Path):
        """The settings a checkpoint was trained with (fields this version does not know are dropped)."""
        saved = ckpt.get("hyperparameters")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path} holds no hyperparameters; it is not a complete checkpoint of this trainer")
        known = {f.name for f in dataclasses.fields(self.cls)}
        try:
            return self.cls(**{k: v for k, v in saved.items() if k in known})
        except TypeError as e:
            raise CheckpointError(f"{path} holds unusable hyperparameters ({e})") from e

    def parser(self, presets: dict[str, dict], default_preset: str, prog: str, description: str,
               derived: str, examples: str = "") -> argparse.ArgumentParser:
        """--preset, a flag per flag field, --resume, --set and --print-config (which also prints `derived`); after
        the flags, what each preset changes, the --set table and the examples."""
        helps = self.field_help()
        defaults = self.preset(default_preset, presets)
        changes = [textwrap.fill(f"{name}: " + (", ".join(f"{k}={shell_word(v)}" for k, v in values.items())
                                                or "the defaults below"), help_width(), initial_indent="  ",
                                 subsequent_indent="    ") for name, values in presets.items()]
        epilog = "\n".join(["Presets (what each sets; flags and --set values given win):", *changes, "",
                            self.epilog(defaults, default_preset, helps)] + (["", examples] if examples else []))
        parser = OneLineParser(prog=prog, description=textwrap.fill(description, help_width()), epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
        parser.add_argument("--preset", choices=list(presets),
                            help=f"starting values for every setting (default {default_preset}; a resumed run keeps "
                                 "its checkpoint's settings)")
        self.add_flags(parser, defaults, default_preset, helps, skip=("preset", "resume"))
        parser.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                            help=f"continue from a {helps.get('resume', '')} (--resume alone: auto). Settings come "
                                 "from the checkpoint unless given")
        parser.add_argument("--set", action="append", metavar="FIELD=VALUE",
                            help="any other setting, by its field name (repeatable; the list follows)")
        parser.add_argument("--print-config", nargs="?", const="json", choices=["json", "shell"],
                            help=f"print the resolved settings and what follows from them ({derived}), then exit "
                                 "without training: as JSON, or (shell) as NAME=VALUE lines quoted for eval, "
                                 "true/false for switches, empty for none")
        return parser

    def parse(self, parser: argparse.ArgumentParser, argv: list[str] | None, presets: dict[str, dict],
              default_preset: str):
        """The settings, and --print-config's form (None: train). They start from the preset or, when resuming, from
        the checkpoint's settings; the flags and --set values given override them."""
        ns, extra = parser.parse_known_args(argv)
        if extra:
            self.unknown(parser, extra)
        given = vars(ns)
        form = given.pop("print_config", None)
        given.update(self.set_values(given.pop("set", [])))
        if "resume" in given:  # the run's own settings; a preset would silently replace them
            path = resolve_checkpoint(given["resume"], given.get("run_name"),
                                      given.get("checkpoint_dir", "checkpoints"))
            ckpt = load_checkpoint(path)
            settings = self.saved(ckpt, path)
            # the run keeps its name (open_run's rule), so that --print-config names the run it continues
            name = settings.run_name or ckpt.get("run_id")
            name = name if isinstance(name, str) and valid_run_name(name) else None
            settings = dataclasses.replace(settings, resume=None, run_name=name)
            if given.get("preset", settings.preset) != settings.preset:
                raise ConfigError(f"--preset {given['preset']} with --resume: {path} was trained with --preset "
                                  f"{settings.preset}, and a resumed run keeps its checkpoint's settings; leave "
                                  "--preset out and give only the settings to change as flags")
        else:
            settings = self.preset(given.get("preset", default_preset), presets)
        return dataclasses.replace(settings, **given), form

    def unknown(self, parser: argparse.ArgumentParser, extra: list[str]) -> None:
        """Words no flag took: one line, saying which --set replaces a field's removed flag."""
        moved = [a for a in extra if a.startswith("--") and a[2:].split("=")[0].replace("-", "_") in self.set_fields()]
        hints = "".join(f"; {a.split('=')[0]} is --set {a[2:].split('=')[0].replace('-', '_')}=VALUE" for a in moved)
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hints}")

    @staticmethod
    def format(settings: dict, derived: dict, form: str = "json") -> str:
        """--print-config's text: JSON ({"settings": ..., "derived": ...}), or for a shell NAME=VALUE lines, each
        value quoted for eval (true/false for switches, empty for none)."""
        if form == "json":
            return json.dumps({"settings": settings, "derived": derived}, indent=2)
        words = {k: "" if v is None else shell_word(v) for k, v in {**settings, **derived}.items()}
        for k, v in words.items():
            if "\n" in v:  # one line per setting is what a reader of the lines may rely on
                raise ConfigError(f"--print-config=shell: {k} holds a newline, which a NAME=VALUE line cannot")
        return "\n".join(f"{k}={shlex.quote(v)}" for k, v in words.items())


def check_fields(settings, rules, spelled) -> list[str]:
    """What is wrong with a settings dataclass, one message each: floats that are not finite, then the values that
    fail a rule, (fields, test, what they must be)."""
    problems, finite = [], {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        finite[f.name] = not isinstance(value, float) or math.isfinite(value)
        if not finite[f.name]:
            problems.append(f"{spelled(f.name)} must be a finite number, got {value}")
    for names, test, must in rules:
        problems += [f"{spelled(n)} must be {must}, got {getattr(settings, n)}" for n in names
                     if finite[n] and not test(getattr(settings, n))]
    return problems


class Clock:
    """Training time in ms: runs during steps, stopped (after the device's queued work) for validations and saves."""

    def __init__(self, device: torch.device, total_ms: float):
        self.device, self.total_ms = device, total_ms
        self.start()

    def start(self) -> None:
        synchronize(self.device)
        self.t0 = time.perf_counter()

    def now_ms(self) -> float:
        return self.total_ms + 1000 * (time.perf_counter() - self.t0)

    def stop(self) -> float:
        synchronize(self.device)
        self.total_ms = self.now_ms()
        return self.total_ms


def reexec_with_cpu_malloc_settings() -> None:
    """On CPU, glibc returns every large tensor's pages to the kernel and faults them in again on the next step,
    which doubles the step time of the tiny preset. Keep freed memory in the heap instead (set before start-up).
    Not for --print-config, which trains nothing and which the wrappers wait for."""
    if any(a.split("=", 1)[0] == "--print-config" for a in sys.argv[1:]):
        return
    if os.environ.get("MALLOC_MMAP_MAX_") is None and not torch.cuda.is_available() and sys.platform == "linux":
        env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def run_processes(train, hp, source: str | None, prog: str) -> int:
    """train(hp, source) in this process, inside a process group when torchrun started it; the errors a user can
    act on become one line (exit 2; a diverged run: 3), said once unless a process's own device is the cause."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    stop = StopRequest(prog)  # until train() takes over: a signal stops at once, with nothing saved
    stop.state = lambda: f"nothing was saved. Start again with: {restart_command()}"
    try:
        stop.__enter__()
        if distributed:
            backend = "nccl" if torch.cuda.is_available() and hp.device != "cpu" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            # torch.distributed.nn.functional binds group.WORLD as a default argument when first imported (the
            # optimisers' lazy torch._dynamo import pulls it in). Imported after init_process_group, it would keep
            # the default group alive past destroy_process_group, and a gloo run could abort at exit.
            import torch.distributed.nn as _  # noqa: F401
            dist.init_process_group(backend=backend)
        train(hp, source)
        if distributed:
            dist.barrier()  # no rank tears its connections down while another still finishes (not after an error)
    except Interrupted as e:  # said in the log and on the terminal already
        return e.code
    except (ConfigError, DataError, CheckpointError, DiskFullError, DivergedError) as e:
        # every process meets these together, from the same settings, files and (collective) checks
        if int(os.environ.get("RANK", 0)) == 0 or isinstance(e, DeviceError):
            print(f"{prog}: error: {e.strerror if isinstance(e, DiskFullError) else e}", file=sys.stderr)
        return 3 if isinstance(e, DivergedError) else 2
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
        stop.__exit__()
    return 0
