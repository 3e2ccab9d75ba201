"""The run log and what a run tells: logs/<run>.txt (the code, the config, the environment, then the record's step
lines), the terminal's lines with their pace, wandb when asked for, and the closing summary against the track's
target. The targets of the two tracks are here, once."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import torch

from runlib.devices import environment_report, peak_flops, peak_memory
from runlib.errors import ConfigError
from runlib.stopping import host_path

TRACK1_TARGET = 3.28
TRACK2_TARGET = 2.92  # train_gpt_medium.py's
# The record targets hold for this validation set only: the first 10,485,760 tokens of FineWeb's validation shard.
TRACK_VAL_FILES, TRACK_VAL_TOKENS = "fineweb_val_*.bin", 10_485_760
RULE = "=" * 100  # between a log's parts, as the record's logs have it


def target_comparable(target: float, val_files: str, val_tokens: int) -> bool:
    """Whether a run's final val loss can be compared with its target: any target of one's own, but a track's record
    target (3.28, 2.92) only on the track's validation set; a loss on other text says nothing about it."""
    if target <= 0:
        return False
    return target not in (TRACK1_TARGET, TRACK2_TARGET) or (
        Path(val_files).name == TRACK_VAL_FILES and val_tokens == TRACK_VAL_TOKENS)


def duration(seconds: float) -> str:
    """3h04m, 12m05s or 42s."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


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



class WandbLogger:
    """Weights & Biases for one run (process 0): its config, metrics by step, and the run log as an artifact at the
    end. WANDB_PROJECT names the project (default nanogpt-speedrun); WANDB_MODE=offline works without network."""

    def __init__(self, run_id: str, config: dict, resumed: bool, directory: str):
        import os

        try:
            import wandb
        except ImportError as e:
            raise ConfigError("--wandb needs the wandb package: pip install wandb") from e
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "nanogpt-speedrun", name=run_id,
                              id=re.sub(r"[^A-Za-z0-9_-]", "-", run_id), resume="allow" if resumed else None,
                              config=config, dir=directory)

    def log(self, metrics: dict, step: int) -> None:
        self.wandb.log(metrics, step=step)

    def finish(self, log_path: Path | None) -> None:
        if log_path is not None and log_path.exists():
            art = self.wandb.Artifact(f"log-{self.run.id}", type="run-log")
            art.add_file(str(log_path))
            self.run.log_artifact(art)
        self.run.finish()


class RunReport:
    """What a run tells: its log file (process 0 only: log_path None elsewhere; a new file begins with the trainer's
    source), the console, wandb when given, and the closing summary."""

    def __init__(self, log_path: Path | None, num_iterations: int, global_batch_tokens: int,
                 wandb: WandbLogger | None = None):
        self.log = RunLog(log_path)
        self.num_iterations, self.batch = num_iterations, global_batch_tokens
        self.wandb = wandb
        self.peak_flops: float | None = None  # the processes' summed peak FLOP/s and
        self.flops_per_token: float | None = None  # the model's training FLOPs per token, for MFU (set_throughput)
        self.last_train_loss: float | None = None

    def set_throughput(self, device: torch.device, world_size: int, flops_per_token: float) -> None:
        """What the terminal's MFU needs: the GPU's peak, where PEAK_TFLOPS knows it, and the model's FLOPs."""
        peak = peak_flops(device)
        self.peak_flops = peak * world_size if peak else None
        self.flops_per_token = flops_per_token

    def progress(self, step: int, elapsed_ms: float, done_steps: int) -> str:
        """For the terminal: percentage, tokens/s, MFU where known and the time the remaining steps take at this
        session's pace (done_steps steps in elapsed_ms of this session)."""
        share = f" ({100 * step / self.num_iterations:.0f}%)"
        if done_steps <= 0 or elapsed_ms <= 0:
            return share
        tokens_per_s = done_steps * self.batch / (elapsed_ms / 1000)
        eta_s = (self.num_iterations - step) * elapsed_ms / done_steps / 1000
        mfu = (f" MFU {tokens_per_s * self.flops_per_token / self.peak_flops:.1%}"
               if self.peak_flops and self.flops_per_token else "")
        return f"{share} {tokens_per_s:,.0f} tokens/s{mfu} ETA {duration(eta_s)}"

    def write(self, text: str, console: bool = True) -> None:
        self.log.write(text, console)

    def start(self, source, config: dict, device: torch.device, resumed_from: str | None, removed: int,
              note: str = "") -> None:
        """source: the trainer's code, or a callable that reads it (only a new log file gets it); config: the
        settings as the log's config block records them. note: a line for the terminal and the log first."""
        if self.log.path is not None and not self.log.path.exists():
            self.write(source() if callable(source) else source, console=False)
        if note:
            self.write(note)
        if resumed_from:
            self.write(f"{RULE}\n{resumed_from}")
        if removed:
            self.write(f"removed {removed} temporary file(s) that interrupted saves had left behind")
        self.write(f"{RULE}\nconfig {json.dumps(config, indent=1)}", console=False)
        self.write(f"{RULE}\n{environment_report(device)}\n{RULE}", console=False)

    def val(self, step: int, val_loss: float, train_time_ms: float) -> None:
        line = (f"step:{step}/{self.num_iterations} val_loss:{val_loss:.4f} train_time:{train_time_ms:.0f}ms "
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
        line = (f"step:{step}/{self.num_iterations}{loss} train_time:{elapsed_ms:.0f}ms "
                f"step_avg:{elapsed_ms / step:.2f}ms")
        self.write(line, console=False)  # the record's step line, which records/report.py reads
        if self.log.path is not None:
            print(line + self.progress(step, session[1], session[0]), flush=True)
        if train_loss is not None:
            self.last_train_loss = train_loss
        if self.wandb and train_loss is not None:
            self.wandb.log({"train/loss": train_loss, **metrics, "train_time_ms": elapsed_ms,
                            "step_avg_ms": elapsed_ms / step,
                            "tokens_per_s": step * self.batch / (elapsed_ms / 1000)}, step=step)

    def finish(self, val_loss: float, val_step: int, train_time_ms: float, device: torch.device, world_size: int,
               unaligned_steps: int, target: float, val_files: str, val_tokens: int) -> dict:
        """The summary line (against target where it applies to this validation set), and the summary as a dict."""
        steps, seconds = self.num_iterations, train_time_ms / 1000
        tokens, comparable = steps * self.batch, target_comparable(target, val_files, val_tokens)
        summary = {
            "final_val_loss": val_loss, "val_step": val_step, "steps": steps, "train_time_s": seconds,
            "tokens": tokens, "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
            "peak_memory": peak_memory(device), "world_size": world_size, "device": device.type,
            "unaligned_steps": unaligned_steps, "reached_target": bool(val_loss <= target) if comparable else None,
        }
        if target <= 0:
            said = "no target"
        elif not comparable:
            said = (f"target {target} not compared: it holds for the first {TRACK_VAL_TOKENS:,} tokens of "
                    f"{TRACK_VAL_FILES}, this run validated on {val_tokens:,} tokens of {val_files}")
        else:
            said = f"target {target}: {'reached' if summary['reached_target'] else 'not reached'}"
        if unaligned_steps:
            self.write(f"loader: {unaligned_steps} step(s) of this session started sequences inside documents (no "
                       "BOS close enough to align them; the record's loader stops there)")
        self.write(f"{RULE}\nfinal val_loss:{val_loss:.4f} train_time:{seconds:.1f}s ({steps} steps, {tokens:,} "
                   f"tokens, {summary['tokens_per_s']:,.0f} tokens/s) peak memory: {summary['peak_memory']}; {said}")
        if self.wandb:
            self.wandb.log({"final/val_loss": val_loss, "final/train_time_s": seconds,
                            "final/tokens_per_s": summary["tokens_per_s"]}, step=steps)
            self.wandb.finish(self.log.path)
        return summary
