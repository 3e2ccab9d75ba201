"""Processes: which one this is in a run torchrun started, values every process must agree on, and the way a
training program runs and ends (its process group, and the exit status of each kind of error)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from runlib.errors import (CheckpointError, ConfigError, DataError, DeviceError, DiskFullError, DivergedError,
                           Interrupted)
from runlib.stopping import StopRequest, restart_command


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_object(obj, src: int = 0):
    """obj as process src has it, on every process (itself when there is no process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank0() -> bool:
    """Whether this is process 0 (or the only one): the one that prints."""
    return int(os.environ.get("RANK", 0)) == 0


def run_processes(work, prog: str, cpu: bool) -> int:
    """work() in this process, inside a process group when torchrun started it (gloo when training on the CPU, NCCL
    on GPUs); returns the exit status. The errors a user can act on become one line (exit 2; a diverged run: 3),
    said once unless a process's own device is the cause; a stop at a signal has said its line already."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    stop = StopRequest(prog)  # until work() takes over: a signal stops at once, with nothing saved
    stop.state = lambda: f"nothing was saved. Start again with: {restart_command()}"
    try:
        stop.__enter__()
        if distributed:
            backend = "nccl" if torch.cuda.is_available() and not cpu else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            # torch.distributed.nn.functional binds group.WORLD as a default argument when first imported (the
            # optimisers' lazy torch._dynamo import pulls it in). Imported after init_process_group, it would keep
            # the default group alive past destroy_process_group, and a gloo run could abort at exit.
            import torch.distributed.nn as _  # noqa: F401
            dist.init_process_group(backend=backend)
        work()
        if distributed:
            dist.barrier()  # no rank tears its connections down while another still finishes (not after an error)
    except Interrupted as e:  # said in the log and on the terminal already
        return e.code
    except (ConfigError, DataError, CheckpointError, DiskFullError, DivergedError) as e:
        # every process meets these together, from the same settings, files and (collective) checks
        if rank0() or isinstance(e, DeviceError):
            print(f"{prog}: error: {e.strerror if isinstance(e, DiskFullError) else e}", file=sys.stderr)
        return 3 if isinstance(e, DivergedError) else 2
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
        stop.__exit__()
    return 0
