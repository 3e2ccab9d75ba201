"""Devices: which one a process trains on, the GPUs at hand and what fits in their memory, CPU threads, the clock of
training time, and the environment a run log records."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import torch

from runlib.errors import ConfigError, DeviceError

MIN_TRAIN_CAPABILITY = (8, 0)  # bfloat16 tensor cores and FlexAttention's Triton kernels: A100, A10, 3090 and newer
# dense bf16 TFLOP/s of one GPU, by a part of its name, for MFU (the H100's as measured, records/h100-2026-11-24.md)
PEAK_TFLOPS = {"H100": 800.0, "H200": 800.0, "A10": 125.0}


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
    if device.type != "cuda":
        return device
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# ----------------------------------------------------------------------------------------------------------------------
# The GPUs at hand and what fits on them


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


def fit_sequences(global_batch: int, world_size: int, max_len: int, block: int, free_gib: float, compiled: bool,
                  seq_len: int = 0, seqs: int = 0) -> tuple[int, int]:
    """(seq_len, seqs) of the longest split of global_batch (sequence_shapes) whose estimated peak memory fits
    free_gib, keeping a seq_len or seqs given (not 0); the shortest split when none fits."""
    shapes = [(n, k) for n, k in sequence_shapes(global_batch, world_size, max_len, block)
              if seq_len in (0, n) and seqs in (0, k)]
    if not shapes:
        raise ConfigError(f"no sequence length splits a global batch of {global_batch:,} tokens over {world_size} "
                          f"process(es) in multiples of {block} tokens; give --train-seq-len")
    return next((s for s in shapes if fits(s[0], compiled, free_gib)), shapes[-1])


# ----------------------------------------------------------------------------------------------------------------------
# CPU threads, and what the run log records about the machine


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


def cpu_cores() -> int:
    """The cores this process may run on (its affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_cpu_threads(cores: int) -> tuple[int, str]:
    """torch's thread count for training on the CPU, and why: OMP_NUM_THREADS when set, else this process's cores
    less those other processes keep busy now. Threads that share a core with other work wait for each other at every
    operation: on 2 cores with the other one busy, 1 thread ran the tiny preset 2.5 times faster than 2. Thread counts
    change fp32 summation order: OMP_NUM_THREADS fixes the count for runs to compare bit for bit."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    busy = busy_cores()
    if busy is None:
        return torch.get_num_threads(), "torch's default"
    threads = max(1, min(cores, round(cores - busy)))
    return threads, (f"{cores} core(s), {busy:.1f} busy with other work; OMP_NUM_THREADS=N chooses" if threads < cores
                     else f"{cores} core(s) free; OMP_NUM_THREADS=N chooses")


def environment_report(device: torch.device) -> str:
    lines = [f"python {platform.python_version()} ({platform.python_implementation()})",
             f"platform {platform.platform()}",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
             f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}"]
    if device.type != "cuda":
        return "\n".join([*lines, f"cpu threads {torch.get_num_threads()}"])
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    lines.append(f"gpus {len(names)}: {', '.join(names)}")
    if shutil.which("nvidia-smi"):
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
        except (OSError, subprocess.TimeoutExpired) as e:
            lines.append(f"nvidia-smi failed: {e}")
    return "\n".join(lines)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved")
    import resource
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB max resident (process)"


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s where PEAK_TFLOPS knows it, else None."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return peak * 1e12 if peak else None


def reexec_with_cpu_malloc_settings() -> None:
    """On CPU, glibc returns every large tensor's pages to the kernel and faults them in again on the next step,
    which doubles the step time of the tiny preset. Keep freed memory in the heap instead (set before start-up).
    Not for --print-config, which trains nothing."""
    if any(a.split("=", 1)[0] == "--print-config" for a in sys.argv[1:]):
        return
    if os.environ.get("MALLOC_MMAP_MAX_") is None and not torch.cuda.is_available() and sys.platform == "linux":
        env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
