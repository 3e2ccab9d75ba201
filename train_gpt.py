"""Single-file GPT trainer for the NanoGPT speedrun (track 1: GPT-2 small class, target val loss 3.28).

    python train_gpt.py --preset tiny                          # CPU, built-in corpus, a few minutes
    python train_gpt.py --preset a10                           # one 24 GB GPU, the 8xH100 global batch
    torchrun --standalone --nproc_per_node=8 train_gpt.py      # 8xH100: the record's settings (default preset)
    python train_gpt.py --help                                 # every setting

The default preset is track-1 record 28 of the public speedrun (2025-08-23, "SparseAttnGate" by @classiclarryd: 1,695
steps, 2.81 min on 8xH100, final val loss 3.2772; log records/track_1_short/2025-08-23_SparseAttnGate/
020630eb-2191-4ba2-9ee4-4cdc94316943.txt of modded-nanogpt). Model, attention windows, loss, FP8 head, update rules
and the loader's order follow that log, so a run's val-loss lines sit beside the record's step by step. The global
batch does not depend on the number of processes (8 GPUs take one sequence each per step, 1 GPU accumulates 8).
Each run writes logs/<run_id>.txt (this source, the config, one line per step) and checkpoints/<run_id>/.

Differences from the record, each deliberate:
- Any number of processes and micro-steps. Each micro-step's summed loss is scaled by world_size x loss_sum_tokens /
  global batch (1 on 8 GPUs, 1/8 on one), so the averaged gradient, Adam's eps and the FP8 gradient codes match.
- On a CPU (tests, the tiny preset): attention through scaled_dot_product_attention with the same mask written out
  (FlexAttention has no CPU backward), everything in fp32, the loss in chunks, no compile.
- The FP8 casts saturate instead of overflowing; with the record's fixed scales that changes nothing unless a head
  weight grows past 448 x 2^-9 = 0.875.
- Muon orthogonalises with compiled matmuls instead of the record's Triton kernels for X @ X.T (the same bf16
  iteration), and parameters are separate tensors where the record packs them (qkv and output projection, the
  scalars): Muon works per matrix and Adam per element, so the updates agree.
- The loader starts over after the last shard (the record stops), reads a fresh shard too small for the look-ahead
  with the look-ahead cut to it (the record skips it), and aligns what it can where no document starts close
  enough (the record fails an assertion); the log's last lines count those steps (none on FineWeb).
- Compile warm-up: 3 steps on real batches and a validation forward (the record: 10 single-batch steps); either way
  weights and optimisers are reset before the clock starts.
- The a10 preset cuts the 49,152-token sequences into 12,288-token ones (four times the accumulation, the same
  update): documents are cut elsewhere, and it validates in 65,536-token chunks (the record: 262,144).

Importing this module has no side effects: no CUDA call, no argument parsing, no process group. main() does the work.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import glob
import math
import os
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from data.shards import (DataError, DiskFullError, find_shards, prepared_globs, read_shard, read_shard_header,
                         read_tokens, shard_glob)
from runlib.checkpoints import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, Saver, check_model_config, load_checkpoint,
                                load_weights, model_state, nonfinite_tensors, optimizer_state, resolve_checkpoint,
                                rng_state, set_rng_state)
from runlib.cli import SettingsCLI, check_fields
from runlib.devices import (MIN_TRAIN_CAPABILITY, Clock, GPUInfo, choose_cpu_threads, cpu_cores, fit_sequences, fits,
                            has_bf16, peak_gib, reexec_with_cpu_malloc_settings, resolve_device, synchronize,
                            visible_gpus)
from runlib.errors import CheckpointError, ConfigError, DeviceError, DivergedError, Interrupted
from runlib.processes import dist_info, run_processes
from runlib.runlog import TRACK1_TARGET, RunReport, WandbLogger
from runlib.runs import claim_run, open_run, valid_run_name
from runlib.stopping import RunFlags, StopRequest, host_path, on_disk, program_name, resume_command

BOS_ID = 50256  # <|endoftext|>: precedes every document
FLEX_BLOCK_SIZE = 128
# ----------------------------------------------------------------------------------------------------------------------
# Hyper-parameters and presets


@dataclass
class Hyperparameters:
    # data
    data_dir: str = "data/fineweb10B"  # directory the file globs are relative to
    train_files: str = "fineweb_train_*.bin"  # glob of train shards (relative to data_dir unless absolute)
    val_files: str = "fineweb_val_*.bin"  # glob of validation shards
    val_tokens: int = 10_485_760  # validation reads exactly this many tokens; fixed so results compare
    # batch: the global batch is seqs_per_step x train_seq_len tokens for any number of processes
    train_seq_len: int = 48 * 1024  # tokens in one flat, BOS-aligned training sequence (one micro-step; 0: fit)
    val_seq_len: int = 4 * 64 * 1024  # tokens per validation forward (0: fit to the GPUs)
    seqs_per_step: int = 8  # sequences per optimiser step over all processes (8 GPUs: one each; 0: fit)
    max_batch_span_multiplier: float = 2.0  # a step's sequences start at BOS tokens within this x batch tokens
    loss_sum_tokens: int = 48 * 1024  # the step's loss: token losses summed, averaged over groups of this many tokens
    # schedule
    num_iterations: int = 1695  # optimiser steps
    cooldown_frac: float = 0.45  # last fraction of steps with linear decay to 0.1 x lr
    window_tokens: int = 1728  # long window at step s: ceil(this x s / num_iterations / 128) blocks of 128, >= 1
    # optimisers
    muon_lr: float = 0.05  # Muon, for the 2-D weights inside the blocks
    muon_momentum: float = 0.95  # Muon momentum after the warm-up (Nesterov)
    muon_momentum_start: float = 0.85  # Muon momentum at step 0, warmed up to muon_momentum ...
    muon_momentum_warmup_steps: int = 300  # ... over this many steps (Muon momentum warm-up)
    # Adam: the record's lr 0.008 x lr_mul, with lr_mul 75 for the embeddings, 1 for the head and 5 for the scalars
    adam_lr: float = 0.6  # Adam, token embedding and value embeddings (0.008 x 75)
    head_lr: float = 0.008  # Adam, lm_head (0.008 x 1)
    scalar_lr: float = 0.04  # Adam, learned scalars: x0 mixing, value mixing, skip weights (0.008 x 5)
    adam_beta1: float = 0.8  # first-moment decay of every Adam group
    adam_beta2: float = 0.95  # second-moment decay of every Adam group
    adam_eps: float = 1e-10  # Adam: added to the root of the second moment
    # model
    vocab_size: int = 50304  # 50257 padded to a multiple of 128
    num_layers: int = 12  # transformer blocks
    model_dim: int = 768  # residual stream width
    num_heads: int = 6  # attention heads per block
    head_dim: int = 128  # width of one head
    no_attn_layer: int = 7  # index of the block without attention (-1: none)
    window_pattern: str = "LSSSLSSLSSSL"  # long (L) or short (S) window of each block, repeated for deeper models
    # evaluation, logging, checkpoints
    val_loss_every: int = 125  # steps between validations (0: only at the end)
    train_loss_every: int = 0  # steps between train-loss lines (0: never; costs a sync)
    target_val_loss: float = TRACK1_TARGET  # the track's target, in the summary (0: none; 3.28/2.92: FineWeb val only)
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    save_every_minutes: float = 30.0  # rolling checkpoint this long after any save, replacing the last one (0: off)
    save_final: bool = True  # write a checkpoint at the end
    log_dir: str = "logs"  # run logs: <log_dir>/<run_id>.txt
    checkpoint_dir: str = "checkpoints"  # checkpoints: <checkpoint_dir>/<run_id>/step_NNNNNN.pt and latest
    run_name: str | None = None  # run id; generated when not given
    resume: str | None = None  # checkpoint file or run directory; "auto": latest of run_name, else checkpoints/latest
    wandb: bool = False  # log metrics and config to Weights & Biases (WANDB_MODE=offline works without network)
    wandb_project: str = "nanogpt-speedrun"  # Weights & Biases project for --wandb
    # runtime
    preset: str = "speedrun"  # which preset the values started from
    device: str = "auto"  # auto, cuda, cuda:N or cpu
    compile: bool = True  # torch.compile the model (warm-up excluded from timing)
    fp8: bool = True  # run lm_head in FP8 where the GPU supports it (compute capability >= 8.9)
    attention: str = "auto"  # flex (FlexAttention, CUDA), dense (explicit mask, any device), auto
    warmup_steps: int = -1  # compile warm-up steps before the timed run (-1: 3 when compiling, else 0)
    seed: int = 0  # initial weights; data order is fixed by the shards
    cpu_ok: bool = False  # train on the CPU even a run estimated to take more than a day there

    @property
    def global_batch_tokens(self) -> int:
        return self.seqs_per_step * self.train_seq_len


PRESETS: dict[str, dict] = {
    # Record 28 (8xH100); also right for 1 to 8 H100s, which accumulate the same batch and take the same steps.
    "speedrun": {},
    # One 24 GB card (A10, 3090, 4090, L4): quarter-length sequences, four times the accumulation, same global batch.
    "a10": dict(train_seq_len=12 * 1024, seqs_per_step=32, val_seq_len=64 * 1024),
    # Trains on 2 CPU cores in a few minutes on the built-in corpus.
    "tiny": dict(
        data_dir="data/builtin", train_files="builtin_train_*.bin", val_files="builtin_val_*.bin",
        val_tokens=16 * 1024, train_seq_len=1024, val_seq_len=4096, seqs_per_step=2, num_iterations=200,
        cooldown_frac=0.4, window_tokens=448, val_loss_every=25, train_loss_every=10, loss_sum_tokens=1024,
        num_layers=6, model_dim=128, num_heads=2, head_dim=64, no_attn_layer=-1, window_pattern="LS",
        muon_momentum_warmup_steps=50, compile=False, target_val_loss=0.0,
    ),
    # The record's recipe in the longest sequences the GPUs found hold (fit_to_gpus); without a GPU, tiny's settings.
    "auto": dict(train_seq_len=0, seqs_per_step=0, val_seq_len=0),
}


def preset_hyperparameters(name: str, presets: dict[str, dict] | None = None) -> Hyperparameters:
    return CLI.preset(name, PRESETS if presets is None else presets)


FIT_FIELDS = ("train_seq_len", "seqs_per_step", "val_seq_len")  # 0: fit_to_gpus chooses


def fit_to_gpus(hp: Hyperparameters, gpus: list[GPUInfo], world_size: int) -> tuple[Hyperparameters, str]:
    """--preset auto: the settings with every FIT_FIELDS 0 chosen for these GPUs, one per process, and why. The global
    batch stays the record's (or seqs_per_step x train_seq_len when both are given), split into the longest sequences
    whose estimated peak memory fits the GPU with the least free memory; validation chunks shrink with them. A value
    given is kept even when it does not fit. Without GPUs: the tiny preset's values where the record's are."""
    if all(getattr(hp, n) for n in FIT_FIELDS):
        return hp, ""
    record = Hyperparameters()
    if not gpus:  # named for what it runs (a run id, a log's preset line): tiny, not auto
        tiny = {k: v for k, v in PRESETS["tiny"].items() if getattr(hp, k) in (getattr(record, k), 0)}
        return dataclasses.replace(hp, preset="tiny", **tiny), "no GPU: the tiny preset's settings, on the CPU"
    gpu = min(gpus, key=lambda g: g.free_gib)
    if gpu.capability < MIN_TRAIN_CAPABILITY:
        raise DeviceError(f"{gpu.name} has compute capability {gpu.capability[0]}.{gpu.capability[1]}; training "
                          "needs 8.0 or newer (bfloat16); --device cpu --preset tiny trains on the CPU")
    batch = (hp.train_seq_len * hp.seqs_per_step) or record.global_batch_tokens
    seq_len, seqs = fit_sequences(batch, world_size, max(record.train_seq_len, hp.train_seq_len), FLEX_BLOCK_SIZE,
                                  gpu.free_gib, hp.compile, hp.train_seq_len, hp.seqs_per_step)
    val_len = record.val_seq_len * seq_len // record.train_seq_len  # validation chunks shrink with the sequences
    val_seq_len = hp.val_seq_len or max([c for c in range(FLEX_BLOCK_SIZE, val_len + 1, FLEX_BLOCK_SIZE)
                                         if hp.val_tokens % c == 0] or [seq_len])
    fp8 = "off" if not hp.fp8 else "on" if gpu.capability >= (8, 9) else \
        "off (compute capability {}.{})".format(*gpu.capability)
    why = (f"{len(gpus)} x {gpu}: {seq_len:,}-token sequences, {seqs // world_size} micro-step(s) per step "
           f"({seqs} sequences of the {batch:,}-token batch), validation in {val_seq_len:,}-token chunks, FP8 {fp8}; "
           f"estimated peak {peak_gib(seq_len, hp.compile):.1f} GiB {'compiled' if hp.compile else 'eager'}"
           + ("" if fits(seq_len, hp.compile, gpu.free_gib) else ", more than fits: expect out-of-memory"))
    return dataclasses.replace(hp, train_seq_len=seq_len, seqs_per_step=seqs, val_seq_len=val_seq_len), why


# The settings a speedrun user turns have flags of their own; every other field is set with --set FIELD=VALUE, so
# that each field has one spelling (and the wrappers find paths and the device under their flags only).
FLAG_FIELDS = ("preset", "data_dir", "train_files", "val_files", "val_tokens", "train_seq_len", "val_seq_len",
               "num_iterations", "muon_lr", "adam_lr", "val_loss_every", "train_loss_every", "save_every",
               "save_every_minutes", "save_final", "log_dir", "checkpoint_dir", "run_name", "resume", "wandb",
               "device", "compile", "fp8", "seed", "cpu_ok")
CLI = SettingsCLI(Hyperparameters, FLAG_FIELDS, {"compile": "--no-compile", "fp8": "--no-fp8",
                                                 "save_final": "--no-save-final", "wandb": "--wandb",
                                                 "cpu_ok": "--yes"})
spelled = CLI.spelled

LEARNING_RATES = ("muon_lr", "adam_lr", "head_lr", "scalar_lr")
RANGES = (  # (fields, test, what their values must be)
    (("train_seq_len", "val_seq_len", "val_tokens", "num_iterations", "seqs_per_step", "num_layers", "model_dim",
      "num_heads", "head_dim", "window_tokens", "loss_sum_tokens", "adam_eps"), lambda v: v > 0, "positive"),
    ((*LEARNING_RATES, "muon_momentum_warmup_steps", "val_loss_every", "train_loss_every", "save_every",
      "save_every_minutes"), lambda v: v >= 0, "0 or more"),
    (("warmup_steps",), lambda v: v >= -1, "-1 (automatic) or more"),
    (("adam_beta1", "adam_beta2", "muon_momentum", "muon_momentum_start"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("cooldown_frac",), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("max_batch_span_multiplier",), lambda v: v >= 1, "1 or more"),
    (("vocab_size",), lambda v: v > BOS_ID, f"above the BOS id {BOS_ID}"),
    (("head_dim",), lambda v: v % 4 == 0, "a multiple of 4 (rotary: head_dim/4 frequencies, head_dim/4 unrotated)"),
    (("window_pattern",), lambda v: v and not set(v) - {"L", "S"}, "a string of L (long) and S (short) windows"),
    (("attention",), lambda v: v in ("auto", "flex", "dense"), "auto, flex or dense"),
)


def check_hyperparameters(hp: Hyperparameters, world_size: int) -> None:
    problems = check_fields(hp, RANGES, spelled)
    fp32_max = torch.finfo(torch.float32).max  # the rates and eps multiply fp32 tensors
    problems += [f"{spelled(n)} must be below {fp32_max:.4g}, the largest float32, got {getattr(hp, n)}"
                 for n in (*LEARNING_RATES, "adam_eps") if math.isfinite(getattr(hp, n)) and getattr(hp, n) >= fp32_max]
    if hp.run_name is not None and not valid_run_name(hp.run_name):
        problems.append(f"--run-name {hp.run_name!r} must be one file name (letters, digits, '.', '_', '-'; not "
                        "starting with '.'): it names logs/<run>.txt and checkpoints/<run>/")
    if hp.seqs_per_step % world_size:
        problems.append(f"{spelled('seqs_per_step')} {hp.seqs_per_step} must be a multiple of the number of "
                        f"processes ({world_size}) so every process accumulates the same number of sequences")
    if hp.val_seq_len > 0 and hp.val_tokens % hp.val_seq_len:
        problems.append(f"--val-tokens {hp.val_tokens} must be a multiple of --val-seq-len {hp.val_seq_len}")
    if hp.attention == "flex":
        problems += [f"{spelled(n)} must be a multiple of {FLEX_BLOCK_SIZE} for FlexAttention"
                     for n in ("train_seq_len", "val_seq_len") if getattr(hp, n) % FLEX_BLOCK_SIZE]
    if problems:
        raise ConfigError("; ".join(problems))


# ----------------------------------------------------------------------------------------------------------------------
# FP8 head (@YouJiacheng, record 19): e4m3 operands forward, an e5m2 gradient backward, fixed scales

FP8_E4M3_MAX = 448.0
FP8_E5M2_MAX = 57344.0
FP8_W_SCALE = 2.0 ** -9  # head weights up to 448 x 2^-9 = 0.875 in magnitude
FP8_GRAD_SCALE = 1 / 448  # the gradient of one token's summed loss w.r.t. a raw logit is at most 1 in magnitude


def fp8_x_scale(model_dim: int) -> float:
    """The head's input is RMS-normalised, so |x| <= sqrt(model_dim): this scale puts that bound at e4m3's 448."""
    return math.sqrt(model_dim) / FP8_E4M3_MAX


def _to_fp8(x: Tensor, scale: float, dtype: torch.dtype, fmax: float) -> Tensor:
    """x / scale in an FP8 format, saturating at its largest value (the fixed scales keep x in range)."""
    return x.div(scale).clamp(-fmax, fmax).to(dtype)


class FP8Matmul(torch.autograd.Function):
    """y = x @ w.T in FP8 with fixed per-tensor scales: no pass over a tensor to find its range. torch._scaled_mm
    wants its first operand row-major and its second column-major, hence the transposes."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> Tensor:
        x8 = _to_fp8(x, x_s, torch.float8_e4m3fn, FP8_E4M3_MAX)
        w8 = _to_fp8(w, w_s, torch.float8_e4m3fn, FP8_E4M3_MAX)
        ctx.save_for_backward(x8, w8)
        ctx.scales, ctx.x_dtype, ctx.w_dtype = (x_s, w_s, grad_s), x.dtype, w.dtype
        return torch._scaled_mm(x8, w8.t(), scale_a=x.new_tensor(x_s, dtype=torch.float32),
                                scale_b=x.new_tensor(w_s, dtype=torch.float32), out_dtype=x.dtype,
                                use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None, None]:
        x8, w8 = ctx.saved_tensors
        x_s, w_s, grad_s = (grad.new_tensor(s, dtype=torch.float32) for s in ctx.scales)
        g8 = _to_fp8(grad.contiguous(), ctx.scales[2], torch.float8_e5m2, FP8_E5M2_MAX)
        grad_x = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=grad_s, scale_b=w_s, out_dtype=ctx.x_dtype)
        # (x8.T @ g8).T rather than g8.T @ x8: the faster order for a (50304, 768) head, in the record's measurement
        grad_w = torch._scaled_mm(x8.t().contiguous(), g8.t().contiguous().t(), scale_a=x_s, scale_b=grad_s,
                                  out_dtype=torch.float32).t()
        return grad_x, grad_w.to(ctx.w_dtype), None, None, None


def fp8_linear(x: Tensor, w: Tensor, x_s: float, w_s: float = FP8_W_SCALE, grad_s: float = FP8_GRAD_SCALE) -> Tensor:
    shape = x.shape
    return FP8Matmul.apply(x.reshape(-1, shape[-1]), w, x_s, w_s, grad_s).view(*shape[:-1], w.size(0))


def attention_impl(device: torch.device, choice: str = "auto") -> str:
    """flex (FlexAttention's kernels, CUDA) or dense (the same mask written out, any device); auto: flex on CUDA."""
    return ("flex" if device.type == "cuda" else "dense") if choice == "auto" else choice


def head_precision(device: torch.device, want_fp8: bool) -> str:
    """fp8 on compute capability >= 8.9 (H100, L4, 4090), bf16 on other Ampere-or-newer GPUs, fp32 on CPU and on
    older GPUs (which only sample: the trainer refuses them)."""
    if not has_bf16(device):
        return "fp32"
    if want_fp8 and torch.cuda.get_device_capability(device) >= (8, 9):
        return "fp8"
    return "bf16"


# ----------------------------------------------------------------------------------------------------------------------
# Attention masks: FlexAttention with document masking (@KoszarskyB, record 12), windows of whole 128-token blocks
# (@YouJiacheng, record 16), long and short windows by layer (@leloykun and @YouJiacheng, record 20). A query block
# sees the key blocks up to window - 1 blocks back that share a document with it; inside them, the keys that are
# neither in its future nor in another document.


def document_ids(tokens: Tensor) -> Tensor:
    """Document index of every position: a new document starts at each BOS token."""
    return (tokens == BOS_ID).cumsum(0)


def dense_attention_mask(docs: Tensor, window_blocks: Tensor | int, block_size: int = FLEX_BLOCK_SIZE) -> Tensor:
    """(T, T) boolean mask, True where query i may attend to key j: the block mask below, written out per position."""
    pos = torch.arange(docs.numel(), device=docs.device)
    blk = pos // block_size
    near = (blk[:, None] - blk[None, :]) < torch.clamp(torch.as_tensor(window_blocks, device=docs.device), min=1)
    return (pos[:, None] >= pos[None, :]) & near & (docs[:, None] == docs[None, :])


def flex_block_mask(docs: Tensor, window_blocks: Tensor | int, block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """dense_attention_mask as a BlockMask, from each block's first and last document id (ids never decrease, so
    blocks share a document when their ranges overlap). A key block is full (no mask_mod) when it lies before the
    query block and both hold one same document, else partial. Rows list blocks nearest first, as the record's do."""
    num_blocks = docs.numel() // block_size
    blocks = docs.view(num_blocks, block_size)
    first, last = blocks[:, 0], blocks[:, -1]
    blk = torch.arange(num_blocks, device=docs.device, dtype=torch.int32)
    d = blk[:, None] - blk[None, :]  # query block - key block
    near = (d >= 0) & (d < torch.clamp(torch.as_tensor(window_blocks, device=docs.device), min=1))
    shared = (first[:, None] <= last[None, :]) & (last[:, None] >= first[None, :])
    one_doc = first == last
    full = near & (d > 0) & one_doc[:, None] & one_doc[None, :] & (first[:, None] == first[None, :])
    partial = near & shared & ~full

    def as_kv_blocks(m: Tensor) -> tuple[Tensor, Tensor]:
        num = m.sum(dim=-1, dtype=torch.int32)
        # listed blocks first, nearest (highest index) first: sort by index + 1 where listed, 0 elsewhere
        idx = torch.argsort(m.to(torch.int32) * (blk[None, :] + 1), dim=-1, descending=True, stable=True)
        return num[None, None].contiguous(), idx.to(torch.int32)[None, None].contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])

    partial_num, partial_idx = as_kv_blocks(partial)
    full_num, full_idx = as_kv_blocks(full)
    return BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod)


_compiled_flex = None


def _flex_attention_fn():
    """flex_attention must be compiled to be fused; inside an already compiled model the raw function is traced."""
    global _compiled_flex
    if torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


class AttentionMasks:
    """The long- and short-window masks of one sequence (short = long // 2 blocks), built once per forward and
    shared by all blocks."""

    def __init__(self, tokens: Tensor, long_blocks: Tensor, impl: str, scale: float):
        self.impl, self.scale = impl, scale
        docs = document_ids(tokens)
        windows = {"L": long_blocks, "S": long_blocks // 2}
        build = flex_block_mask if impl == "flex" else dense_attention_mask
        self.masks = {k: build(docs, w) for k, w in windows.items()}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, kind: str) -> Tensor:
        """q, k, v: (B, heads, T, head_dim); kind: "L" or "S". Flex is compiled on every device: run eagerly on a CPU
        it would apply mask_mod alone and ignore the block lists, where the window lives."""
        if self.impl == "flex":
            return _flex_attention_fn()(q, k, v, block_mask=self.masks[kind], scale=self.scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.masks[kind], scale=self.scale)


# ----------------------------------------------------------------------------------------------------------------------
# Model. The record's ideas and their public authors (modded-nanogpt's record table): rotary embeddings (@kellerjordan0,
# record 2); ReLU^2, QK-norm, zero-initialised projections, a vocabulary padded to 50304 (@Grad62304977, record 5);
# untied head, the x0 mix into every block and the logit soft cap (@Grad62304977, @kellerjordan0, records 8-9); U-net
# skips (@brendanh0gan, record 11); value embeddings (@KoszarskyB, record 14), in a U-net pattern and for the outer
# blocks only, with block 7's attention dropped (@YouJiacheng, records 15-17); the cap as 30 sigmoid (@YouJiacheng,
# record 19); merged qkv weights and the 0.12 attention scale (record 20); c_fc stored transposed (@byronxu99, record
# 27); the sparse attention gate (@classiclarryd, record 28).


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    num_layers: int = 12  # transformer blocks
    model_dim: int = 768  # residual stream width
    num_heads: int = 6  # attention heads per block
    head_dim: int = 128  # width of one head
    no_attn_layer: int = 7  # -1: every block has attention
    window_pattern: str = "LSSSLSSLSSSL"  # long or short window of each block (repeated for deeper models)
    num_value_embeds: int = 3  # tables feeding the first three and the last three blocks
    attn_scale: float = 0.12
    logit_cap: float = 30.0  # logits = cap * sigmoid(raw / cap_div)
    logit_cap_div: float = 7.5

    @classmethod
    def from_hyperparameters(cls, hp: Hyperparameters) -> "GPTConfig":
        return cls(vocab_size=hp.vocab_size, num_layers=hp.num_layers, model_dim=hp.model_dim,
                   num_heads=hp.num_heads, head_dim=hp.head_dim, no_attn_layer=hp.no_attn_layer,
                   window_pattern=hp.window_pattern)

    @property
    def gate_dim(self) -> int:
        """Inputs of the sparse attention gate: the first model_dim / 64 channels of the block's input (12)."""
        return max(1, self.model_dim // 64)


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def init_bound(fan_in: int) -> float:
    """Uniform init bound sqrt(3) * 0.5 / sqrt(fan_in): std 0.5 / sqrt(fan_in) (@YouJiacheng's scale)."""
    return math.sqrt(3) * 0.5 / math.sqrt(fan_in)


class CastedLinear(nn.Linear):
    """Bias-free linear whose fp32 master weight is cast to the activation dtype for the matmul."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        with torch.no_grad():
            if zero_init:
                self.weight.zero_()
            else:
                self.weight.uniform_(-init_bound(in_features), init_bound(in_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, T, heads, head_dim); cos, sin: (T, head_dim // 2). Rotates the pairs (x[k], x[k + head_dim / 2])."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


def rotary_tables(seq_len: int, head_dim: int, device: torch.device, offset: int = 0) -> tuple[Tensor, Tensor]:
    """cos, sin (seq_len, head_dim // 2) of half-truncated rotary (@YouJiacheng, record 17): head_dim / 4 frequencies
    (1/1024) ** linspace(0, 1), then head_dim / 4 zeros. Computed on the CPU, as the record's are."""
    quarter = head_dim // 4
    freq = (1 / 1024) ** torch.linspace(0, 1, steps=quarter, dtype=torch.float32)
    freq = torch.cat([freq, freq.new_zeros(quarter)])
    angles = torch.arange(offset, offset + seq_len, dtype=torch.float32)[:, None] * freq[None, :]
    return angles.cos().to(device), angles.sin().to(device)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer  # its keys' and values' slot in a key/value cache (generate.KVCache)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        hdim = cfg.num_heads * cfg.head_dim
        bound = init_bound(cfg.model_dim)
        self.qkv_w = nn.Parameter(torch.empty(3, hdim, cfg.model_dim).uniform_(-bound, bound))
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # mix of values and value embeddings
        # sparse attention gate (record 28): each head's output times sigmoid(W x[:gate_dim]), W zero-initialised
        self.gate = CastedLinear(cfg.gate_dim, cfg.num_heads, zero_init=True)
        self.c_proj = CastedLinear(hdim, cfg.model_dim, zero_init=True)

    def forward(self, x: Tensor, ve: Tensor | None, rope: tuple[Tensor, Tensor], masks: AttentionMasks,
                kind: str, cache=None) -> Tensor:
        """With a cache, x holds new positions only: their keys and values join the cached ones they attend over."""
        B, T = x.shape[:2]
        qkv = F.linear(x, self.qkv_w.flatten(end_dim=1).to(x.dtype)).view(B, T, 3 * self.num_heads, self.head_dim)
        q, k, v = qkv.chunk(3, dim=-2)
        q, k = rotary(norm(q), *rope), rotary(norm(k), *rope)
        v = self.lambdas[0] * v + (self.lambdas[1] * ve.view_as(v) if ve is not None else 0)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = masks.attend(q, k, v, kind).transpose(1, 2)
        y = y * torch.sigmoid(self.gate(x[..., :self.gate.in_features]))[..., None]
        return self.c_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # c_fc stored as (dim, 4 dim), as the record has since record 27: Muon's shape scale for it is then 1
        self.c_fc = nn.Parameter(torch.empty(dim, 4 * dim).uniform_(-init_bound(dim), init_bound(dim)))
        self.c_proj = CastedLinear(4 * dim, dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(x @ self.c_fc.to(x.dtype)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, layer) if layer != cfg.no_attn_layer else None
        self.mlp = MLP(cfg.model_dim)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # mix of block input and initial embedding x0

    def forward(self, x, ve, x0, rope, masks, kind, cache=None):
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, rope, masks, kind, cache)
        return x + self.mlp(norm(x))


CPU_LOSS_CHUNK = 64  # positions per loss chunk on CPUs: (64, 50304) fp32 logits are 13 MB, (1024, 50304) 206 MB


class ChunkedHeadLoss(torch.autograd.Function):
    """The summed cross-entropy of head(x) and its gradients, a chunk of positions at a time, so that one chunk's
    logits exist at once instead of several (T, vocab) fp32 tensors (records/cpu-memory-2026-12-02.json). Each chunk's
    backward runs in the forward; backward scales the sums by the incoming gradient (exact for a power of two)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, head, chunk: int) -> Tensor:
        grad_x, grad_w = torch.empty_like(x), None
        total = x.new_zeros((), dtype=torch.float32)
        with torch.enable_grad():
            for s in range(0, x.size(0), chunk):
                xs = x[s:s + chunk].detach().requires_grad_()
                loss = F.cross_entropy(head(xs), targets[s:s + chunk], reduction="sum")
                gx, gw = torch.autograd.grad(loss, (xs, weight))
                grad_x[s:s + chunk] = gx
                grad_w = gw if grad_w is None else grad_w.add_(gw)
                total += loss.detach()
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad, grad_w * grad, None, None, None


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        hdim = cfg.num_heads * cfg.head_dim
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.value_embeds = nn.ModuleList([nn.Embedding(cfg.vocab_size, hdim) for _ in range(cfg.num_value_embeds)])
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.num_encoder = cfg.num_layers // 2  # U-net: outputs of these blocks feed the mirrored later blocks
        self.skip_weights = nn.Parameter(torch.ones(self.num_encoder))
        self.lm_head = CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True)
        # Run-time choices, not weights: set by the trainer for the device at hand.
        self.attn_impl = "dense"
        self.head_precision = "fp32"
        self.fp8_grad_scale = FP8_GRAD_SCALE  # the trainer multiplies it by its loss scale (see Trainer)
        self.act_dtype = torch.float32
        # Rotary cos/sin tables for positions 0..n-1, filled by reserve_rotary (not saved in checkpoints).
        self.register_buffer("rope_cos", torch.empty(0, cfg.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0, cfg.head_dim // 2), persistent=False)

    def configure(self, device: torch.device, attention: str = "auto", fp8: bool = True) -> "GPT":
        """Attention implementation, head precision and activation dtype for the device. Where activations are bf16
        the embedding tables are stored in bf16 too, as the record stores them (the rest stays fp32)."""
        self.attn_impl = attention_impl(device, attention)
        self.head_precision = head_precision(device, fp8)
        self.act_dtype = torch.bfloat16 if has_bf16(device) else torch.float32
        for table in [self.embed, *self.value_embeds]:
            table.to(self.act_dtype)
        return self

    def reserve_rotary(self, max_len: int) -> "GPT":
        """The rotary tables for up to max_len positions, once: computed inside a compiled forward, inductor fuses
        the sines and cosines into every q and k element's kernel (records/h100-2026-11-24.md)."""
        self.rope_cos, self.rope_sin = rotary_tables(max_len, self.cfg.head_dim, self.lm_head.weight.device)
        return self

    def rotary(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin tables (seq_len, head_dim // 2): the reserved ones when long enough, else computed here."""
        if self.rope_cos.size(0) >= seq_len:
            return self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        return rotary_tables(seq_len, self.cfg.head_dim, device)

    def value_embed_layers(self) -> list[int | None]:
        """Which value-embedding table each block mixes in: tables 0..n-1 for the first n and for the last n blocks."""
        n, L = self.cfg.num_value_embeds, self.cfg.num_layers
        return [i if i < n else (i - (L - n) if i >= L - n else None) for i in range(L)]

    def window_kinds(self) -> list[str]:
        """The window of each block, "L" (long) or "S" (short): window_pattern, repeated to the model's depth."""
        pattern = self.cfg.window_pattern
        return [pattern[i % len(pattern)] for i in range(self.cfg.num_layers)]

    def head_logits(self, x: Tensor) -> Tensor:
        """Soft-capped logits in fp32 from the final hidden state. The FP8 head is used while training only, as in
        the record: validation and sampling run it in the activation dtype."""
        if self.head_precision == "fp8" and self.training:
            raw = fp8_linear(x, self.lm_head.weight, fp8_x_scale(self.cfg.model_dim), FP8_W_SCALE,
                             self.fp8_grad_scale)
        else:
            raw = self.lm_head(x)
        return self.cfg.logit_cap * torch.sigmoid(raw.float() / self.cfg.logit_cap_div)

    def hidden(self, input_seq: Tensor, window_blocks: Tensor | int, cache=None) -> Tensor:
        """Final normalised hidden state (1, T, model_dim) of one flat sequence of token ids. With a cache
        (generate.KVCache): (batch, T) new tokens that attend over the cached ones, and window_blocks an int."""
        cfg = self.cfg
        tokens = input_seq[None] if cache is None else input_seq
        x = x0 = norm(self.embed(tokens).to(self.act_dtype))
        ve_tables = [e(tokens).to(self.act_dtype) for e in self.value_embeds]
        ve = [ve_tables[t] if t is not None else None for t in self.value_embed_layers()]
        if cache is None:
            rope = self.rotary(input_seq.numel(), input_seq.device)
            masks = AttentionMasks(input_seq, window_blocks, self.attn_impl, cfg.attn_scale)
        else:
            rope, masks = cache.begin(tokens, window_blocks)
        skips = []
        for i, (block, kind) in enumerate(zip(self.blocks, self.window_kinds())):
            j = i - (cfg.num_layers - self.num_encoder)
            if 0 <= j < self.num_encoder:
                x = x + self.skip_weights[j] * skips[self.num_encoder - 1 - j]
            x = block(x, ve[i], x0, rope, masks, kind, cache)
            if i < self.num_encoder:
                skips.append(x)
        return norm(x)

    def forward(self, input_seq: Tensor, target_seq: Tensor | None = None, window_blocks: Tensor | int = 14,
                loss_chunk: int | None = None, cache=None) -> Tensor:
        """Soft-capped logits without targets (with a cache: of the new tokens). With targets, the record's loss: the
        sum over the tokens in training mode, the mean in eval mode. window_blocks: the long window in blocks. Losses
        longer than loss_chunk positions are computed in chunks: without gradients, and with them for the CPU's fp32
        head (ChunkedHeadLoss); GPUs train with the record's single cross-entropy."""
        if cache is not None:
            if target_seq is not None:
                raise ValueError("a forward with a KV cache computes logits, not a loss")
            return self.head_logits(self.hidden(input_seq, window_blocks, cache))
        if not isinstance(window_blocks, Tensor):
            window_blocks = torch.tensor(window_blocks, device=input_seq.device, dtype=torch.int32)
        x = self.hidden(input_seq, window_blocks)[0]
        if target_seq is None:
            return self.head_logits(x)
        if loss_chunk is None:
            loss_chunk = CPU_LOSS_CHUNK if x.device.type == "cpu" else 16384
        chunked_grad = (self.head_precision == "fp32" and self.lm_head.weight.requires_grad
                        and not torch.compiler.is_compiling())
        if x.size(0) <= loss_chunk or (torch.is_grad_enabled() and not chunked_grad):
            total = F.cross_entropy(self.head_logits(x), target_seq, reduction="sum")
        elif torch.is_grad_enabled():
            total = ChunkedHeadLoss.apply(x, self.lm_head.weight, target_seq, self.head_logits, loss_chunk)
        else:
            total = x.new_zeros((), dtype=torch.float32)
            for s in range(0, x.size(0), loss_chunk):
                total = total + F.cross_entropy(self.head_logits(x[s:s + loss_chunk]), target_seq[s:s + loss_chunk],
                                                reduction="sum")
        return total if self.training else total / x.size(0)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, path: Path) -> "GPT":
        """The model a checkpoint holds, built from its model_config and loaded with its weights (on the CPU), or a
        CheckpointError naming the file. Resuming, sampling and scoring all build their model here."""
        try:
            model = cls(GPTConfig(**ckpt["model_config"]))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path} has the trainer's marker but not a usable model_config ({e}); it may come "
                                  "from another version of train_gpt.py") from e
        load_weights(model, ckpt, path)
        return model

    def param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Muon takes the blocks' matrices; Adam the embeddings, the head and every scalar."""
        groups = {"muon": [], "embed": [], "head": [], "scalar": []}
        for name, p in self.named_parameters():
            if name.startswith("blocks.") and p.ndim >= 2:
                groups["muon"].append((name, p))
            elif name.startswith(("embed.", "value_embeds.")):
                groups["embed"].append((name, p))
            elif name.startswith("lm_head."):
                groups["head"].append((name, p))
            else:
                groups["scalar"].append((name, p))
        return groups


@dataclass
class LoadedModel:
    model: GPT
    window_blocks: int  # long attention window at the end of training, in 128-token blocks (the short one: half)
    path: Path
    step: int
    run_id: str


def load_model(spec: str, device: torch.device, checkpoint_dir: str = "checkpoints",
               run: str | None = None) -> LoadedModel:
    """A trained model to sample or score with (generate.py, eval_hellaswag.py): the GPT of a checkpoint file, a run
    directory or "auto" (run's newest checkpoint in checkpoint_dir, without one checkpoint_dir/latest), on device, in
    eval mode, with the long window it was trained with last (another one would be a different function). The saved
    weights are full tensors whatever the number of processes that trained them."""
    path = resolve_checkpoint(spec, run, checkpoint_dir)
    ckpt = load_checkpoint(path)
    bad = nonfinite_tensors(ckpt.get("model", {}))
    if bad:
        raise CheckpointError(f"{path} holds weights that are not finite ({', '.join(bad[:3])}"
                              f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}): nothing can be sampled from "
                              "it; use an earlier checkpoint of the run")
    model = GPT.from_checkpoint(ckpt, path)
    hp = CLI.saved(ckpt, path)
    model = model.to(device).configure(device, attention="dense", fp8=False).eval()
    model.requires_grad_(False)
    return LoadedModel(model, window_blocks(hp.num_iterations, hp), path, int(ckpt.get("step", -1)),
                       str(ckpt.get("run_id", "?")))


# ----------------------------------------------------------------------------------------------------------------------
# Optimisers: Muon and Adam, both sharded across processes (reduce-scatter gradients, update a share, all-gather)


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5) -> Tensor:
    """Approximately orthogonalise G (singular values pushed into a band around 1) with a quintic iteration in bf16.

    Works on the wide orientation and on batches of matrices (leading dimensions).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


class ShardedOptimizer(torch.optim.Optimizer):
    """Parameters by name; subclasses' full_state() gathers every parameter's state by name on every process (a
    collective), so a checkpoint resumes on any number of processes; load_full_state keeps this process's share."""

    def __init__(self, named_groups: list[dict], defaults: dict):
        """named_groups: dicts with "params" as (name, parameter) pairs and optional per-group settings."""
        self.names = {id(p): n for g in named_groups for n, p in g["params"]}
        super().__init__([{**g, "params": [p for _, p in g["params"]]} for g in named_groups], defaults)
        self.rank, self.world_size = dist_info()

    def _params(self):
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p


class Muon(ShardedOptimizer):
    """Muon (@kellerjordan0 and @jxbz, record 3): Nesterov momentum, orthogonalised, scaled by sqrt(max(1, rows /
    cols)). Same-shape parameters go world_size at a time: parameter i's averaged gradient lands on process i
    (reduce-scatter, as records 6 and 24 distribute it), which updates it; the weights are all-gathered. A process
    orthogonalises its parameters of one shape in one batched call (record 20)."""

    STATE_KEYS = ("momentum_buffer",)  # per parameter, in full_state / load_full_state

    def __init__(self, named_params, lr: float = 0.05, momentum: float = 0.95, ns_steps: int = 5,
                 compile_ns: bool = False):
        super().__init__([{"params": list(named_params), "name": "muon"}], dict(lr=lr, momentum=momentum,
                                                                                ns_steps=ns_steps))
        params = [p for g in self.param_groups for p in g["params"]]
        shapes = sorted({tuple(p.shape) for p in params})
        # chunks of same-shape parameters, world_size at a time; the i-th of a chunk belongs to process i
        self.chunks, self.shape_groups = [], []
        for shape in shapes:
            same = [p for p in params if tuple(p.shape) == shape]
            first = len(self.chunks)
            self.chunks += [same[i:i + self.world_size] for i in range(0, len(same), self.world_size)]
            self.shape_groups.append(range(first, len(self.chunks)))
        self.owner = {id(p): i for chunk in self.chunks for i, p in enumerate(chunk)}
        # compiled (on GPUs): the iteration's matmuls and elementwise work fused into fewer kernels, one graph per shape
        self.newton_schulz = (torch.compile(zeropower_via_newtonschulz5, dynamic=False) if compile_ns
                              else zeropower_via_newtonschulz5)

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        lr, momentum, ns_steps = group["lr"], group["momentum"], group["ns_steps"]
        W, r = self.world_size, self.rank
        received = []  # per chunk: (averaged gradient of this process's parameter or None, pending reduction)
        for chunk in self.chunks:  # launch every reduction first so communication overlaps the updates
            if W == 1:
                received.append((chunk[0].grad, None))
                continue
            grads = [p.grad.flatten() for p in chunk] + [torch.zeros_like(chunk[0]).flatten()] * (W - len(chunk))
            g = torch.empty_like(chunk[0])
            work = dist.reduce_scatter_tensor(g.view(-1), torch.cat(grads), op=dist.ReduceOp.AVG, async_op=True)
            received.append((g if r < len(chunk) else None, work))
        gathers = []
        for indices in self.shape_groups:
            owned = []  # (parameter, averaged gradient) for the parameters of this shape that this process updates
            for i in indices:
                g, work = received[i]
                if work is not None:
                    work.wait()
                if g is not None:
                    owned.append((self.chunks[i][r], g))
            new = {}
            if owned:
                nesterov = []
                for p, g in owned:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.lerp_(g, 1 - momentum)
                    nesterov.append(g.lerp(buf, momentum))
                update = self.newton_schulz(torch.stack(nesterov), ns_steps)
                shape = owned[0][0].shape
                scale = math.sqrt(max(1.0, shape[-2] / shape[-1]))
                for (p, _), u in zip(owned, update):
                    new[id(p)] = p - (lr * scale) * u.to(p.dtype)
            for i in indices:
                chunk = self.chunks[i]
                if W == 1:
                    chunk[0].copy_(new[id(chunk[0])])
                    continue
                mine = new[id(chunk[r])] if r < len(chunk) else torch.zeros_like(chunk[0])
                outs = [p.data for p in chunk] + [torch.empty_like(chunk[0]) for _ in range(W - len(chunk))]
                gathers.append(dist.all_gather(outs, mine, async_op=True))
        for work in gathers:
            work.wait()

    def full_state(self):
        out = {}
        for chunk in self.chunks:
            for i, p in enumerate(chunk):
                buf = self.state[p].get("momentum_buffer") if i == self.rank else None
                have = torch.tensor([buf is not None], dtype=torch.int32, device=p.device)
                if self.world_size > 1:
                    dist.broadcast(have, src=i)
                if not have.item():
                    continue
                if buf is None:
                    buf = torch.empty_like(p)
                if self.world_size > 1:
                    dist.broadcast(buf, src=i)
                out[self.names[id(p)]] = {"momentum_buffer": buf.detach().cpu().clone()}
        return out

    def load_full_state(self, state):
        self.state.clear()
        for _, p in self._params():
            s = state.get(self.names[id(p)])
            if s is not None and self.owner[id(p)] == self.rank:
                self.state[p]["momentum_buffer"] = s["momentum_buffer"].to(p.device, p.dtype).clone()


class DistAdam(ShardedOptimizer):
    """Adam without weight decay, p -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps), sharded along
    the first dimension where it divides by world_size (@vagrawal, record 24); small tensors are all-reduced."""

    STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")  # per parameter, in full_state / load_full_state

    def __init__(self, named_groups: list[dict], lr: float, betas=(0.8, 0.95), eps: float = 1e-10):
        super().__init__(named_groups, dict(lr=lr, betas=betas, eps=eps))

    def _sharded(self, p: Tensor) -> bool:
        return self.world_size > 1 and p.size(0) % self.world_size == 0 and p.numel() >= 1024

    def _slice(self, p: Tensor) -> slice:
        n = p.size(0) // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    @torch.no_grad()
    def step(self):
        W = self.world_size
        pending = []
        for group, p in self._params():
            if p.grad is None:
                continue
            if W == 1:
                pending.append((group, p, p.grad, None))
            elif self._sharded(p):
                g = torch.empty_like(p[self._slice(p)])
                pending.append((group, p, g, dist.reduce_scatter_tensor(g, p.grad.contiguous(),
                                                                        op=dist.ReduceOp.AVG, async_op=True)))
            else:
                g = p.grad
                pending.append((group, p, g, dist.all_reduce(g, op=dist.ReduceOp.AVG, async_op=True)))
        gathers = []
        for group, p, g, work in pending:
            if work is not None:
                work.wait()
            sharded = self._sharded(p)
            target = p[self._slice(p)] if sharded else p
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(target)
                state["exp_avg_sq"] = torch.zeros_like(target)
            state["step"] += 1
            t = state["step"].item()
            beta1, beta2 = group["betas"]
            state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            # the record's arrangement: eps is added to the uncorrected root, the bias corrections go to the step size
            denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
            step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
            if sharded:
                new = target.addcdiv(state["exp_avg"], denom, value=-step_size)
                gathers.append(dist.all_gather_into_tensor(p.data, new, async_op=True))
            else:
                p.addcdiv_(state["exp_avg"], denom, value=-step_size)
        for work in gathers:
            work.wait()

    def full_state(self):
        out = {}
        for _, p in self._params():
            state = self.state.get(p)
            have = torch.tensor([bool(state)], dtype=torch.int32, device=p.device)
            if self.world_size > 1:  # every process steps the same parameters, but ask rather than assume
                dist.all_reduce(have, op=dist.ReduceOp.MIN)
            if not have.item():
                continue
            entry = {"step": state["step"].clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                t = state[key]
                if self._sharded(p):
                    full = torch.empty_like(p)
                    dist.all_gather_into_tensor(full, t.contiguous())
                    t = full
                entry[key] = t.detach().cpu().clone()
            out[self.names[id(p)]] = entry
        return out

    def load_full_state(self, state):
        self.state.clear()
        for _, p in self._params():
            s = state.get(self.names[id(p)])
            if s is None:
                continue
            sl = self._slice(p) if self._sharded(p) else slice(None)
            self.state[p] = {"step": s["step"].clone().float(),
                             "exp_avg": s["exp_avg"][sl].to(p.device, p.dtype).clone(),
                             "exp_avg_sq": s["exp_avg_sq"][sl].to(p.device, p.dtype).clone()}


def build_optimizers(model: GPT, hp: Hyperparameters) -> dict[str, ShardedOptimizer]:
    groups = model.param_groups()
    betas = (hp.adam_beta1, hp.adam_beta2)
    adam = DistAdam([{"params": groups[name], "lr": lr, "name": name} for name, lr in
                     (("embed", hp.adam_lr), ("head", hp.head_lr), ("scalar", hp.scalar_lr))],
                    lr=hp.adam_lr, betas=betas, eps=hp.adam_eps)
    on_gpu = model.embed.weight.device.type == "cuda"
    muon = Muon(groups["muon"], lr=hp.muon_lr, momentum=hp.muon_momentum, compile_ns=hp.compile and on_gpu)
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    return {"adam": adam, "muon": muon}


# ----------------------------------------------------------------------------------------------------------------------
# Schedules


def lr_multiplier(step: int, hp: Hyperparameters) -> float:
    """1 until the cool-down, then linear to 0.1 at the last step."""
    progress = step / hp.num_iterations
    if hp.cooldown_frac <= 0 or progress < 1 - hp.cooldown_frac:
        return 1.0
    w = (1 - progress) / hp.cooldown_frac
    return w + (1 - w) * 0.1


def muon_momentum(step: int, hp: Hyperparameters) -> float:
    frac = min(step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - frac) * hp.muon_momentum_start + frac * hp.muon_momentum


def window_blocks(step: int, hp: Hyperparameters) -> int:
    """The long window at a step, in blocks (window warm-up: @fernbear.bsky.social, record 13): the record's
    ceil(1728 * step / num_iterations / 128), at least 1, in exact integers (equal at each of its steps)."""
    return max(1, -(-hp.window_tokens * step // (hp.num_iterations * FLEX_BLOCK_SIZE)))


# ----------------------------------------------------------------------------------------------------------------------
# Data: a BOS-aligned training stream, a fixed validation set (the shard format is data/shards.py's, imported above)


def ensure_builtin_corpus(data_dir: str) -> None:
    """Build data/builtin (the standard library's sources as shards) unless it is already there."""
    from data import builtin  # on first use only: the tiny preset's corpus
    from data.tokenizer import TokenizerUnavailable

    if not builtin.is_built(data_dir):
        print(f"building the built-in corpus in {data_dir} (once)", flush=True)
        try:
            builtin.build(data_dir)
        except (TokenizerUnavailable, RuntimeError) as e:
            raise DataError(f"cannot build the built-in corpus in {data_dir}: {e}") from e


class TrainLoader:
    """The record's BOS-aligned batches (@classiclarryd, record 26), the same for any split over processes.

    Shards are read in order. A step's seqs_per_step sequences of seq_len + 1 tokens start at BOS tokens: the first
    at or after the position, each next one at least seq_len after the one before, all within span tokens
    (max_batch_span_multiplier x the batch); with fewer than span + 1 left, the step starts at the next shard.
    Sequence j goes to process j % world_size. Where the record stops or fails (see the module's docstring), this
    loader wraps around, cuts the look-ahead to a small shard, or aligns what it can. State: shard, position, epoch.
    """

    def __init__(self, files: list[str], seq_len: int, seqs_per_step: int, rank: int = 0, world_size: int = 1,
                 span_multiplier: float = 2.0, vocab_size: int | None = None):
        self.files = list(files)
        self.sizes = [read_shard_header(f) for f in self.files]  # each shard is read (and checked) when reached
        self.vocab_size = vocab_size
        self._held: tuple[int, np.ndarray] | None = None  # (index, tokens) of the shard in memory
        self.seq_len, self.seqs_per_step = seq_len, seqs_per_step
        self.rank, self.world_size = rank, world_size
        self.batch = seqs_per_step * seq_len
        self.span = max(self.batch, int(span_multiplier * self.batch))
        if not any(self._holds_a_step(i) for i in range(len(self.files))):
            raise DataError(f"no train shard holds the {self.batch + 1} tokens one step needs (the largest holds "
                            f"{max(self.sizes)}); add data or lower --train-seq-len")
        self.shard, self.pos, self.epoch = 0, 0, 0
        self.aligned_steps = self.unaligned_steps = 0  # how often the record's alignment succeeded or could not

    def _holds_a_step(self, i: int) -> bool:
        return self.sizes[i] >= self.batch + 1

    def state_dict(self) -> dict:
        return {"shard": self.shard, "pos": self.pos, "epoch": self.epoch,
                "files": [os.path.basename(f) for f in self.files]}

    def load_state_dict(self, state: dict, source: str | Path = "the saved loader state") -> None:
        """Continue where the state says. It must come from these shards: the saved file names must be the first
        ones of this run's (shards added after them are fine; others would move the position into other data)."""
        saved = list(state["files"])
        mine = [os.path.basename(f) for f in self.files]
        if mine[:len(saved)] != saved:
            raise CheckpointError(f"{source} was trained on the shards {', '.join(saved[:3])}"
                                  f"{', ...' if len(saved) > 3 else ''} ({len(saved)}), this run reads "
                                  f"{', '.join(mine[:3])}{', ...' if len(mine) > 3 else ''} ({len(mine)}): resume "
                                  "with the same --data-dir and --train-files")
        shard, pos = int(state["shard"]), int(state["pos"])
        if not 0 <= shard < len(self.files) or not 0 <= pos <= self.sizes[shard]:
            raise CheckpointError(f"{source}: its loader position (shard {shard}, token {pos}) is outside the shards")
        self.shard, self.pos, self.epoch = shard, pos, int(state["epoch"])

    def _next_shard(self) -> None:
        self.pos = 0
        while True:
            self.shard += 1
            if self.shard == len(self.files):
                self.shard, self.epoch = 0, self.epoch + 1
            if self._holds_a_step(self.shard):
                return

    def step_starts(self) -> list[int]:
        """Start positions in the current shard of this step's sequences (advances the loader)."""
        T, S = self.seq_len, self.seqs_per_step
        if not self._holds_a_step(self.shard) or (self.pos > 0 and self.pos + self.span + 1 >= self.sizes[self.shard]):
            self._next_shard()
        tokens, pos = self.tokens, self.pos
        limit = min(pos + self.span, len(tokens) - 1)  # every BOS used lies before this position
        bos = pos + np.flatnonzero(tokens[pos:limit] == BOS_ID)
        starts, end = [], (int(bos[0]) if bos.size else None)
        for _ in range(S):
            if end is None:
                break
            starts.append(end)
            i = int(np.searchsorted(bos, end + T))  # the first BOS at least T tokens after this start
            end = int(bos[i]) if i < bos.size else None
        if end is not None:
            self.aligned_steps += 1
            self.pos = end
            return starts
        self.unaligned_steps += 1
        starts, cur = [], pos
        for j in range(S):  # each sequence at the first BOS that leaves room for the rest back to back, else here
            i = int(np.searchsorted(bos, cur))
            start = int(bos[i]) if i < bos.size and bos[i] <= limit - (S - j) * T else cur
            starts.append(start)
            cur = start + T
        self.pos = cur
        return starts

    @property
    def tokens(self) -> np.ndarray:
        """The current shard's tokens, read into memory (and checked) when the loader reaches it."""
        if self._held is None or self._held[0] != self.shard:
            self._held = None  # one shard in memory at a time
            self._held = (self.shard, read_shard(self.files[self.shard], self.vocab_size))
        return self._held[1]

    def next_batch(self, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """This process's (inputs, targets) for every micro-step of the next step."""
        starts = self.step_starts()
        out = []
        for start in starts[self.rank::self.world_size]:
            buf = torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))
            if device.type == "cuda":
                buf = buf.pin_memory().to(device, non_blocking=True)
            out.append((buf[:-1].to(torch.int32), buf[1:]))
        return out


class ValidationSet:
    """Exactly val_tokens tokens from the start of the validation stream, cut into val_seq_len chunks; chunk k goes to
    process k % world_size, so the result is the same for any number of processes."""

    def __init__(self, files: list[str], val_tokens: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 vocab_size: int | None = None):
        total = sum(read_shard_header(f) for f in files)
        if total < val_tokens + 1:
            raise DataError(f"the validation shards ({', '.join(files)}) hold {total} tokens; "
                            f"--val-tokens {val_tokens} needs {val_tokens + 1}")
        self.tokens = read_tokens(files, val_tokens + 1, vocab_size)  # in memory: read once, not at every validation
        self.val_tokens, self.seq_len = val_tokens, seq_len
        self.rank, self.world_size = rank, world_size
        self.num_chunks = val_tokens // seq_len

    def batches(self, device: torch.device):
        """This process's (inputs, targets), one per round of world_size chunks; (None, None) in a last round that
        has no chunk left for it, so that every process takes the same number of rounds."""
        for k in range(self.rank, -(-self.num_chunks // self.world_size) * self.world_size, self.world_size):
            if k >= self.num_chunks:
                yield None, None
                continue
            chunk = self.tokens[k * self.seq_len:(k + 1) * self.seq_len + 1]
            buf = torch.from_numpy(chunk.astype(np.int64)).to(device)
            yield buf[:-1].to(torch.int32), buf[1:]


# ----------------------------------------------------------------------------------------------------------------------
# Training


class Trainer:
    """Model, optimisers, data and step function of one run, usable by main() and by benchmarks."""

    def __init__(self, hp: Hyperparameters, device: torch.device, rank: int = 0, world_size: int = 1,
                 train_files: list[str] | None = None):
        self.hp, self.device, self.rank, self.world_size = hp, device, rank, world_size
        self.grad_accum = hp.seqs_per_step // world_size
        torch.manual_seed(hp.seed)
        self.cfg = GPTConfig.from_hyperparameters(hp)
        self.model = GPT(self.cfg).to(device).configure(device, hp.attention, hp.fp8)
        self.model.reserve_rotary(max(hp.train_seq_len, hp.val_seq_len))
        self.loss_scale = loss_scale(hp, world_size)
        # the head's gradient arrives multiplied by loss_scale: so is its FP8 scale, which keeps the record's codes
        self.model.fp8_grad_scale = FP8_GRAD_SCALE * self.loss_scale
        if world_size > 1:  # identical by seed already; make it certain
            for p in self.model.parameters():
                dist.broadcast(p.data, src=0)
        self.initial_weights = model_state(self.model)
        self.optimizers = build_optimizers(self.model, hp)
        self.compiled = torch.compile(self.model, dynamic=False) if hp.compile else self.model  # what steps run
        self.loader = (TrainLoader(train_files, hp.train_seq_len, hp.seqs_per_step, rank, world_size,
                                   hp.max_batch_span_multiplier, hp.vocab_size) if train_files is not None else None)
        self.step = 0
        self.train_time_ms = 0.0
        # the first step whose loss was not finite (-1: none), kept on the device so that no step waits for it
        self.first_nonfinite = torch.full((), -1, dtype=torch.int64, device=device)

    def window_tensor(self, step: int) -> Tensor:
        return torch.tensor(window_blocks(step, self.hp), dtype=torch.int32, device=self.device)

    def train_step(self, batch: list[tuple[Tensor, Tensor]]) -> Tensor:
        """One optimiser step on this process's micro-batches; returns their mean loss per token (on the device, not
        synced)."""
        step, hp = self.step, self.hp
        window = self.window_tensor(step)
        total = torch.zeros((), device=self.device)
        for inputs, targets in batch:
            loss = self.compiled(inputs, targets, window)  # summed over the sequence's tokens, as the record's
            (loss * self.loss_scale).backward()
            total += loss.detach()
        mult = lr_multiplier(step, hp)
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * mult
        self.optimizers["muon"].param_groups[0]["momentum"] = muon_momentum(step, hp)
        for opt in self.optimizers.values():
            opt.step()
        self.model.zero_grad(set_to_none=True)
        self.step += 1
        unseen = ~torch.isfinite(total) & (self.first_nonfinite < 0)
        self.first_nonfinite = torch.where(unseen, self.step, self.first_nonfinite)
        return total / sum(inputs.numel() for inputs, _ in batch)

    def check_finite(self, val_loss: float | None = None) -> None:
        """Raise DivergedError if any training loss so far (or val_loss) was not finite. One sync, and a collective when
        distributed (every process stops together): called where the loop syncs anyway (loss lines, validations,
        saves)."""
        first = self.first_nonfinite.clone()
        if self.world_size > 1:
            first = torch.where(first < 0, torch.iinfo(torch.int64).max, first)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            first = torch.where(first == torch.iinfo(torch.int64).max, -1, first)
        step = int(first.item())
        if step >= 0:
            raise DivergedError(f"the training loss of step {step} was not finite")
        if val_loss is not None and not math.isfinite(val_loss):
            raise DivergedError(f"the validation loss at step {self.step} is {val_loss}")

    def matmul_flops_per_token(self) -> float:
        return matmul_flops_per_token(self.cfg)

    def describe(self, run_id: str) -> str:
        hp, m = self.hp, self.model
        return (f"run {run_id}: {self.world_size} process(es) on {self.device.type}, {self.grad_accum} micro-step(s) "
                f"of {hp.train_seq_len} tokens each, global batch {hp.global_batch_tokens} tokens; attention "
                f"{m.attn_impl}, lm_head {m.head_precision}, compile {'on' if hp.compile else 'off'}; "
                f"{sum(p.numel() for p in m.parameters()):,} parameters")

    def metrics(self, step: int) -> dict[str, float]:
        """The schedules at a step and the rate each parameter group last stepped with (lr/muon, ...), for wandb."""
        hp = self.hp
        rates = {f"lr/{g['name']}": g["lr"] for opt in self.optimizers.values() for g in opt.param_groups}
        return {"lr_multiplier": lr_multiplier(step, hp), **rates, "muon_momentum": muon_momentum(step, hp),
                "window_blocks": window_blocks(step, hp)}

    @torch.no_grad()
    def validate(self, val: ValidationSet, stop=None) -> float | None:
        """Mean loss over the validation tokens, in eval mode (the head in bf16, not FP8, as in the record), with the
        window of the current step. stop(): asked before each round of chunks (one per process), collectively; when
        it says so the validation ends there and returns None."""
        window = self.window_tensor(self.step)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        self.model.eval()
        try:
            for inputs, targets in val.batches(self.device):
                if stop is not None and stop():
                    return None
                if inputs is not None:  # a process with fewer chunks than the others waits out the last round
                    total += self.compiled(inputs, targets, window).double() * inputs.numel()
        finally:
            self.model.train()
        if self.world_size > 1:
            dist.all_reduce(total)
        return total.item() / val.val_tokens

    def reset(self) -> None:
        """Back to the initial weights and fresh optimisers (after compile warm-up)."""
        with torch.no_grad():
            self.model.load_state_dict(self.initial_weights)
        self.optimizers = build_optimizers(self.model, self.hp)
        self.model.zero_grad(set_to_none=True)
        self.step = 0
        self.first_nonfinite.fill_(-1)

    def state_dict(self, run_id: str) -> dict:
        """Everything a resume needs; a collective when distributed (optimiser state is gathered)."""
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "run_id": run_id,
            "step": self.step, "train_time_ms": self.train_time_ms,
            "model_config": asdict(self.cfg), "hyperparameters": asdict(self.hp),
            "model": model_state(self.model),
            "optimizers": {k: opt.full_state() for k, opt in self.optimizers.items()},
            "loader": self.loader.state_dict() if self.loader else None,
            "rng": rng_state(),
        }

    def restore(self, ckpt: dict, path: Path) -> None:
        """Weights, optimiser states, data position, step, clock and RNG from a checkpoint (check_resumable first);
        anything that does not fit this run is a CheckpointError naming the file."""
        check_model_config(ckpt, asdict(self.cfg), path)
        load_weights(self.model, ckpt, path)
        for name, opt in self.optimizers.items():
            opt.load_full_state(optimizer_state(ckpt, name, opt, self.model, path))
        if self.loader is not None:
            self.loader.load_state_dict(ckpt["loader"], path)
        self.step, self.train_time_ms = int(ckpt["step"]), float(ckpt["train_time_ms"])
        set_rng_state(ckpt["rng"], path)


def loss_scale(hp: Hyperparameters, world_size: int) -> float:
    """What a micro-step's summed loss is multiplied by: the record's gradient is the per-token gradients summed and
    divided by global batch / 49,152 = 8, and processes average theirs, so world_size x loss_sum_tokens / batch."""
    return world_size * hp.loss_sum_tokens / hp.global_batch_tokens


def setup_device(hp: Hyperparameters, world_size: int) -> tuple[torch.device, Hyperparameters, list[str]]:
    """This process's device, the settings with attention "auto" and any --preset auto choice resolved for it (the
    most sequences any process needs, so that all agree), checked, and lines that say what was chosen and why (the
    --preset auto fit; on the CPU, the thread count)."""
    device = resolve_device(hp.device, int(os.environ.get("LOCAL_RANK", 0)))
    hp = dataclasses.replace(hp, attention=attention_impl(device, hp.attention))
    asked, gpus = hp, visible_gpus(device.index) if device.type == "cuda" else []
    hp, why = fit_to_gpus(asked, gpus, world_size)
    if why and world_size > 1:
        seqs = torch.tensor(hp.seqs_per_step, device=device)
        dist.all_reduce(seqs, op=dist.ReduceOp.MAX)
        if seqs.item() != hp.seqs_per_step:
            hp, why = fit_to_gpus(dataclasses.replace(asked, seqs_per_step=int(seqs.item())), gpus, world_size)
    check_hyperparameters(hp, world_size)
    notes = [f"--preset auto: {why}"] if why else []
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        check_cpu_budget(hp, cpu_cores())
        threads, because = choose_cpu_threads(cpu_cores())
        torch.set_num_threads(threads)
        notes.append(f"CPU threads: {threads} ({because})")
    return device, hp, notes


CPU_FLOPS_PER_CORE = 35e9  # matmul FLOP/s of one CPU core in fp32, generously: the tiny preset ran at about 34 on 2
CPU_DAY_S = 24 * 3600  # a run estimated to take longer than this on the CPU needs --yes


def matmul_flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token of the matmuls (6 x the blocks' matrices and the head), attention not counted."""
    with torch.device("meta"):  # the sizes only: nothing is allocated
        groups = GPT(cfg).param_groups()
    return 6.0 * sum(p.numel() for _, p in groups["muon"] + groups["head"])


def check_cpu_budget(hp: Hyperparameters, cores: int) -> None:
    """A run that would take more than CPU_DAY_S on this machine's CPU cores is refused, unless --yes: the default
    preset on a laptop would start downloading shards for weeks of training."""
    seconds = hp.num_iterations * hp.global_batch_tokens * matmul_flops_per_token(
        GPTConfig.from_hyperparameters(hp)) / (cores * CPU_FLOPS_PER_CORE)
    if hp.cpu_ok or seconds <= CPU_DAY_S:
        return
    instead = "fewer --num-iterations" if hp.preset == "tiny" else "--preset tiny trains in minutes"
    raise ConfigError(f"--preset {hp.preset} on the CPU: {hp.num_iterations:,} steps of {hp.global_batch_tokens:,} "
                      f"tokens would take about {seconds / CPU_DAY_S:.0f} days on {cores} core(s), even at a generous "
                      f"{CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s each; {instead}, a GPU runs it, and --yes starts it "
                      "on the CPU anyway")


def open_data(hp: Hyperparameters, rank: int, world_size: int) -> tuple[list[str], list[str]]:
    """The train and validation shards (the tiny preset's built-in corpus is built on first use)."""
    if hp.train_files.startswith("builtin_"):
        default = os.path.normpath(PRESETS["tiny"]["data_dir"])
        if os.path.normpath(hp.data_dir) not in (default, str(Path(__file__).resolve().parent / default)):
            if not os.path.isdir(hp.data_dir):  # a mistyped --data-dir must not get a corpus of its own
                raise DataError(f"--data-dir {hp.data_dir} does not exist; the built-in corpus is built on first use "
                                f"only in {default} (elsewhere: python data/builtin.py --out-dir DIR)")
        elif rank == 0:
            ensure_builtin_corpus(hp.data_dir)
        if world_size > 1:
            dist.barrier()
    return find_shards(hp.data_dir, hp.train_files, "train"), find_shards(hp.data_dir, hp.val_files, "validation")


def warmup_steps(hp: Hyperparameters) -> int:
    return hp.warmup_steps if hp.warmup_steps >= 0 else (3 if hp.compile else 0)


def warm_up(trainer: Trainer, train_files: list[str], val_files: list[str], report: RunReport) -> None:
    """Compile on real batches and a validation forward, then back to the initial weights and optimisers, so that
    the timed run starts where an uncompiled one would."""
    hp = trainer.hp
    steps = warmup_steps(hp)
    if not steps:
        return
    t0 = time.perf_counter()
    loader = TrainLoader(train_files, hp.train_seq_len, hp.seqs_per_step, trainer.rank, trainer.world_size,
                         hp.max_batch_span_multiplier, hp.vocab_size)
    for _ in range(steps):
        trainer.train_step(loader.next_batch(trainer.device))
    trainer.validate(ValidationSet(val_files, hp.val_seq_len, hp.val_seq_len))  # one chunk: the eval graph
    synchronize(trainer.device)
    trainer.reset()
    report.write(f"warm-up: {steps} steps and a validation forward in {time.perf_counter() - t0:.1f}s (not timed; "
                 "weights and optimisers reset)")


def checkpoint_kind(hp: Hyperparameters, step: int, saved_step: int, rolling: bool) -> str | None:
    """The checkpoint the loop writes on reaching step: "kept" (the final one, every --save-every steps), "rolling"
    (when --save-every-minutes have passed; the next save of any kind replaces it) or None. None at a step whose
    state is on disk already (the step a run starts or resumes at)."""
    last = step == hp.num_iterations
    if step <= saved_step:
        return None
    if (last and hp.save_final) or (hp.save_every > 0 and step % hp.save_every == 0):
        return "kept"
    return "rolling" if not last and rolling else None


def check_finite(trainer: Trainer, saver: Saver, report: RunReport, val_loss: float | None = None) -> None:
    """DivergedError (named in the log with the run's last good checkpoint) for a non-finite loss so far."""
    try:
        trainer.check_finite(val_loss)
    except DivergedError as e:
        raise saver.diverged(str(e), report.log) from None


def save(trainer: Trainer, saver: Saver, report: RunReport, step: int, kind: str) -> Path:
    check_finite(trainer, saver, report)
    return saver.save(trainer.state_dict(saver.run_id), step, kind, report.log)


def stopped(trainer: Trainer, saver: Saver, report: RunReport, step: int, signal_name: str | None,
            log_problem: str | None = None) -> Interrupted:
    """Save at a stop (unless this step's state is on disk) and say what was saved and the command that resumes the
    run: for a signal (exit 128 + its number) or for a run log that cannot be written (exit 2)."""
    at = f"at step {step} of {trainer.hp.num_iterations}"
    why = f"stopped by {signal_name} {at}" if log_problem is None else f"stopped {at}: {log_problem}"
    then = on_disk(saver.run_dir, saver.run_id, saver.resumed_from)
    if step > saver.saved_step:
        try:
            path = save(trainer, saver, report, step, "kept")
            then = f"saved {host_path(path)}. Resume with: {resume_command(saver.run_dir, saver.run_id)}"
        except DiskFullError as e:
            if log_problem is None:
                raise
            then = f"no checkpoint of step {step} could be saved either ({e.strerror}); {then}"
    how = f"{why}; {then}"
    if trainer.rank == 0:
        print(f"{program_name()}: {how}", file=sys.stderr, flush=True)
        report.write(how, console=False)
    return Interrupted(how, 2 if log_problem is not None else 130 if signal_name == "SIGINT" else 143)


def run_steps(trainer: Trainer, val: ValidationSet, saver: Saver, report: RunReport,
              stop: StopRequest) -> tuple[float, int]:
    """The loop from the trainer's step to the last, in the record's order: validate, stop, save, step. Validations
    and saves run on the stopped clock. A stop (a signal, or a run log that cannot be written) ends the loop at the
    next step or validation chunk, with a checkpoint. Non-finite losses are looked for only where the loop syncs
    anyway. Returns the last val loss and its step."""
    hp, N = trainer.hp, trainer.hp.num_iterations
    val_loss, val_step = float("nan"), -1
    clock = Clock(trainer.device, trainer.train_time_ms)
    first_step, first_ms = trainer.step, trainer.train_time_ms  # this session's, for the terminal's pace
    flags = RunFlags(trainer.device, trainer.world_size)  # what every process acts on at the same step
    saver.on_save.append(flags.saved)
    for step in range(trainer.step, N + 1):
        last = step == N
        if last or (hp.val_loss_every > 0 and step % hp.val_loss_every == 0):
            trainer.train_time_ms = clock.stop()
            val_loss = trainer.validate(val, stop=lambda: flags.exchange(stop.asked, now=True)[0])
            if val_loss is None:  # a stop cut the validation short
                raise stopped(trainer, saver, report, step, stop.signal)
            val_step = step
            report.val(step, val_loss, trainer.train_time_ms)
            check_finite(trainer, saver, report, val_loss)
            clock.start()
        rolling_due = 0 < hp.save_every_minutes <= saver.minutes_since_save()  # process 0's clock decides
        asked, rolling, log_failed = flags.exchange(stop.asked, rolling_due, report.log.failed is not None)
        if (asked or log_failed) and not last:
            trainer.train_time_ms = clock.stop()
            raise stopped(trainer, saver, report, step, stop.signal, report.log.failed if log_failed else None)
        kind = checkpoint_kind(hp, step, saver.saved_step, rolling)
        if kind:
            trainer.train_time_ms = clock.stop()
            save(trainer, saver, report, step, kind)
            clock.start()
        if last:
            break
        loss = trainer.train_step(trainer.loader.next_batch(trainer.device))
        synchronize(trainer.device)
        train_loss = None
        if hp.train_loss_every > 0 and (step + 1) % hp.train_loss_every == 0:
            if trainer.world_size > 1:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            train_loss = loss.item()
        now = clock.now_ms()
        report.step(step + 1, now, train_loss, trainer.metrics(step) if report.wandb else {},
                    (step + 1 - first_step, now - first_ms))
        if train_loss is not None:  # synced for the line already: check every step since the last check
            check_finite(trainer, saver, report)
    trainer.train_time_ms = clock.stop()
    return val_loss, val_step


def start_report(hp: Hyperparameters, run_id: str, rank: int, resumed: bool) -> RunReport:
    """The run's log (process 0's: logs/<run_id>.txt) and terminal lines, with wandb when asked for."""
    config = asdict(hp)
    wandb = WandbLogger(run_id, config, resumed, hp.log_dir) if hp.wandb and rank == 0 else None
    return RunReport(Path(hp.log_dir) / f"{run_id}.txt" if rank == 0 else None, hp.num_iterations,
                     hp.global_batch_tokens, wandb)


def train(hp: Hyperparameters, source: str | None = None) -> dict:
    """Run (or resume) a training run; returns the summary. Expects the process group to be set up if distributed.
    A signal before the loop stops at once (nothing new to save); in the loop, at the end of the step, saving."""
    rank, world_size = dist_info()
    with StopRequest() as stop:
        device, hp, notes = setup_device(hp, world_size)
        train_files, val_files = open_data(hp, rank, world_size)
        val = ValidationSet(val_files, hp.val_tokens, hp.val_seq_len, rank, world_size, hp.vocab_size)
        run_id, ckpt, ckpt_path = open_run(hp.resume, hp.run_name, hp.checkpoint_dir, hp.num_iterations, hp.preset)
        run_dir = Path(hp.checkpoint_dir) / run_id
        stop.state = lambda: on_disk(run_dir, run_id, ckpt_path)
        lock, note = claim_run(run_dir, Path(hp.log_dir) / f"{run_id}.txt", rank, fresh=ckpt is None)
        try:
            trainer = Trainer(hp, device, rank, world_size, train_files)
            if ckpt is not None:
                trainer.restore(ckpt, ckpt_path)  # refused before the run's log gets a line
            report = start_report(hp, run_id, rank, resumed=ckpt is not None)
            report.start(source if source is not None else lambda: Path(__file__).read_text(encoding="utf-8"),
                         {**asdict(hp), "matmul_flops_per_token": trainer.matmul_flops_per_token()}, device,
                         f"resumed from {ckpt_path} at step {ckpt['step']}" if ckpt else None,
                         len(lock.removed) if lock is not None else 0, note)
            if report.log.failed:
                raise ConfigError(f"{report.log.failed}: free some space, or choose another --log-dir")
            stop.log = report.write
            report.write("\n".join([trainer.describe(run_id), *notes]))
            report.set_throughput(device, world_size, trainer.matmul_flops_per_token())
            stop.where = "during the compile warm-up" if warmup_steps(hp) else "before the first step"
            warm_up(trainer, train_files, val_files, report)
            torch.manual_seed(hp.seed)
            if ckpt is not None:
                trainer.restore(ckpt, ckpt_path)
                del ckpt
            saver = Saver(Path(hp.checkpoint_dir), run_id, rank, world_size, trainer.step, ckpt_path)
            stop.state, stop.deferred = lambda: on_disk(saver.run_dir, run_id, ckpt_path), True
            val_loss, val_step = run_steps(trainer, val, saver, report, stop)
            stop.deferred, stop.where = False, "after the last step"
            summary = report.finish(val_loss, val_step, trainer.train_time_ms, device, world_size,
                                    trainer.loader.unaligned_steps, hp.target_val_loss, hp.val_files, hp.val_tokens)
            if report.log.failed:  # the run finished; its log lacks what came after the failure
                raise DiskFullError(errno.EIO, f"{report.log.failed}; the run itself finished (final val_loss "
                                    f"{val_loss:.4f}); {on_disk(saver.run_dir, run_id, ckpt_path)}")
        finally:
            if lock is not None:
                lock.release()
    return {"run_id": run_id, **summary}


# ----------------------------------------------------------------------------------------------------------------------
# Command line

def build_arg_parser(presets: dict[str, dict] | None = None, default_preset: str = "speedrun",
                     prog: str = "train_gpt.py") -> argparse.ArgumentParser:
    return CLI.parser(PRESETS if presets is None else presets, default_preset, prog,
                      f"Train a GPT on FineWeb shards (NanoGPT speedrun, preset {default_preset} by default). Flags "
                      "and --set values override the preset's values.",
                      derived="global_batch_tokens, train_tokens, fineweb_shards; fit for --preset auto",
                      examples="" if presets is not None and presets is not PRESETS else textwrap.dedent(f"""\
                          Examples:
                            python {prog} --preset tiny                       # 2 CPU cores, built-in corpus
                            python {prog} --preset auto --print-config        # what fits this machine's GPUs
                            torchrun --standalone --nproc_per_node=8 {prog}   # 8 GPUs
                            python {prog} --resume checkpoints/RUN            # continue a run
                            python {prog} --preset tiny --set model_dim=64 --num-iterations 50"""))


def parse_args(argv: list[str] | None = None, presets: dict[str, dict] | None = None,
               default_preset: str = "speedrun", prog: str = "train_gpt.py") -> Hyperparameters:
    """Preset (or the resumed checkpoint's settings), then the flags and --set values given explicitly."""
    presets = PRESETS if presets is None else presets
    return CLI.parse(build_arg_parser(presets, default_preset, prog), argv, presets, default_preset)[0]


def derived_settings(hp: Hyperparameters) -> dict[str, int]:
    """What follows from the settings, printed by --print-config so that no wrapper computes it again:
    global_batch_tokens, train_tokens (what the run reads) and fineweb_shards, the FineWeb 10B train shards that
    covers (data/fineweb.py's rule; 0 when the train files are not FineWeb's)."""
    from data.fineweb import DATASETS, shards_needed

    fineweb = DATASETS["fineweb10B"]
    shards = 0
    if hp.train_files == shard_glob(fineweb.corpus, "train"):
        shards = min(fineweb.train_shards, shards_needed(hp.num_iterations, hp.global_batch_tokens))
    return {"global_batch_tokens": hp.global_batch_tokens,
            "train_tokens": hp.num_iterations * hp.global_batch_tokens, "fineweb_shards": shards}


def use_prepared_corpus(hp: Hyperparameters) -> tuple[Hyperparameters, str]:
    """A --data-dir that data/prepare.py wrote, whose shards the train glob does not match (a preset's FineWeb or
    built-in names): its manifest's globs instead, and a line saying so."""
    found = prepared_globs(hp.data_dir)
    pattern = hp.train_files if os.path.isabs(hp.train_files) else os.path.join(hp.data_dir, hp.train_files)
    if found is None or glob.glob(pattern) or found == (hp.train_files, hp.val_files):
        return hp, ""
    return (dataclasses.replace(hp, train_files=found[0], val_files=found[1]),
            f"--data-dir {hp.data_dir} holds no {hp.train_files}; its manifest names {found[0]} and {found[1]}: "
            "training on those")


def format_config(hp: Hyperparameters, form: str = "json", extra: dict | None = None) -> str:
    return CLI.format(asdict(hp), {**derived_settings(hp), **(extra or {})}, form)


def main(argv: list[str] | None = None, presets: dict[str, dict] | None = None, default_preset: str = "speedrun",
         prog: str = "train_gpt.py", source: str | None = None) -> int:
    """The command line; train_gpt_medium.py calls it with its own presets and its source for the log."""
    try:
        presets = PRESETS if presets is None else presets
        hp, form = CLI.parse(build_arg_parser(presets, default_preset, prog), argv, presets, default_preset)
        hp, prepared = use_prepared_corpus(hp)
        if prepared and int(os.environ.get("RANK", 0)) == 0:
            print(f"{prog}: {prepared}", file=sys.stderr)
        if form:  # one process for all: --preset auto fits the first WORLD_SIZE GPUs (default: every visible one)
            gpus = visible_gpus() if any(getattr(hp, n) == 0 for n in FIT_FIELDS) and hp.device != "cpu" else []
            world_size = int(os.environ.get("WORLD_SIZE", len(gpus) or 1))
            hp, why = fit_to_gpus(hp, gpus[:world_size], world_size)
            check_hyperparameters(hp, world_size)  # those that need no devices: a wrapper stops before it starts any
            extra = {"fit": why} if why else {}
            if not gpus and (hp.device == "cpu" or not torch.cuda.is_available()):
                extra["cpu_refusal"] = ""  # a wrapper refuses before it downloads shards; the settings still show
                try:
                    check_cpu_budget(hp, cpu_cores())
                except ConfigError as e:
                    extra["cpu_refusal"] = str(e)
            print(format_config(hp, form, extra))
            return 0
    except (ConfigError, CheckpointError) as e:
        print(f"train_gpt.py: error: {e}", file=sys.stderr)
        return 2
    return run_processes(lambda: train(hp, source), prog, cpu=hp.device == "cpu")


if __name__ == "__main__":
    reexec_with_cpu_malloc_settings()
    sys.exit(main())
