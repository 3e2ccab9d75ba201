"""Checkpoint files: the format, atomic writes, the latest link, finding and loading one with a clear error, checking
what a resume reads, and the Saver that writes a run's checkpoints from finite states only."""

from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from data.shards import DiskFullError, atomic_write
from runlib.errors import CheckpointError, ConfigError, DivergedError


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


def check_resumable(ckpt: dict, path: Path, num_iterations: int) -> None:
    """Everything a resume reads is there and has the right type, and the run has steps left: checked before the
    model is built, so a hollow checkpoint costs a line, not a compile and a traceback."""
    problems = [f"{key} ({kind.__name__ if isinstance(kind, type) else kind[0].__name__} expected)"
                for key, kind in RESUME_KEYS.items() if not isinstance(ckpt.get(key), kind)]
    if not isinstance(ckpt.get("loader"), dict) or not {"shard", "pos", "epoch", "files"} <= set(ckpt["loader"]):
        problems.append("loader (the data position)")
    if problems:
        raise CheckpointError(f"{path} cannot be resumed: it lacks or mangles {', '.join(problems)}")
    if num_iterations < ckpt["step"]:
        raise ConfigError(f"{path} is at step {ckpt['step']}, past --num-iterations {num_iterations}: resume "
                          f"with --num-iterations {ckpt['step']} or more")


def check_model_config(ckpt: dict, model_config: dict, path: Path) -> None:
    """The checkpoint holds the model this run builds (model_config: the dataclass's fields as a dict)."""
    saved = ckpt["model_config"]
    diffs = [f"{k}={saved.get(k)} (this run: {v})" for k, v in model_config.items() if saved.get(k) != v]
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


class Saver:
    """A run's checkpoints as they are written: only from a finite state (otherwise DivergedError, naming the last
    good checkpoint; latest keeps pointing at it), atomically, then latest pointed at it; a "rolling" checkpoint is
    deleted by the next save of any kind. Saving is collective: every process takes part in gathering the state it
    is given, process 0 writes, and a full disk is raised by all."""

    def __init__(self, root: Path, run_id: str, rank: int, world_size: int, saved_step: int,
                 resumed_from: Path | None = None):
        self.root, self.run_id, self.rank, self.world_size = Path(root), run_id, rank, world_size
        self.run_dir, self.resumed_from = self.root / run_id, resumed_from
        self.rolling: Path | None = None  # the rolling checkpoint on disk
        self.saved_step = saved_step  # the newest step whose state is on disk
        self.last_save = time.monotonic()
        self.on_save = []  # called after every save (the loop's RunFlags: rolling requests before it are answered)

    def minutes_since_save(self) -> float:
        return (time.monotonic() - self.last_save) / 60

    def diverged(self, why: str, log) -> DivergedError:
        """The error for a run whose losses or state went non-finite (also written to its log)."""
        newest = newest_step_file(self.run_dir)
        last_good = f"the run's last checkpoint is {newest}" if newest else "the run has no checkpoint"
        message = (f"training diverged: {why}; nothing was saved from it and {last_good} (resume from a checkpoint "
                   "with lower learning rates)")
        log.write(f"stopped: {message}", console=False)
        return DivergedError(message)

    def save(self, state: dict, step: int, kind: str, log) -> Path:
        """Write step's state (a checkpoint dict, gathered on every process) as a "kept" or "rolling" checkpoint."""
        bad = nonfinite_tensors({k: state[k] for k in ("model", "optimizers")})
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise self.diverged(f"the state after step {step} holds non-finite values ({', '.join(bad[:3])}{more})",
                                log)
        path, full = self.run_dir / f"step_{step:06d}.pt", None
        if self.rank == 0:
            try:
                path, self.rolling = save_checkpoint(state, self.root, self.run_id, step, kind, self.rolling)
                log.write(f"saved checkpoint {path}" + (" (rolling: replaced by the next save)" if kind == "rolling"
                                                       else ""))
            except DiskFullError as e:
                full = e.strerror
        if self.world_size > 1:  # also the barrier: no process runs ahead of the write
            box = [full]
            dist.broadcast_object_list(box, src=0)
            full = box[0]
        if full is not None:
            raise DiskFullError(errno.ENOSPC, full)
        self.saved_step, self.last_save = step, time.monotonic()
        for call in self.on_save:
            call()
        return path
