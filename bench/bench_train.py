"""Training throughput of a preset: tokens/s, step time, model FLOPs utilisation, compile time, peak memory.

    python bench/bench_train.py                          # tiny preset on whatever device there is (CPU here)
    python bench/bench_train.py --preset speedrun        # track-1 model, compiled, 1 GPU accumulating 8 sequences
    python bench/bench_train.py --preset speedrun --no-fp8 --steps 100 --json records/bench.json
    python bench/bench_train.py --preset speedrun --data-dir data/fineweb10B   # real shards instead of synthetic

Model FLOPs per token (training = 3 x forward):
    6 * (block matrix parameters + lm_head parameters)                       # every matmul weight, fwd + bwd
  + 12 * head_dim * num_heads * mean attended keys per query, per attention block   # QK^T and AV, fwd + bwd
The mean attended keys come from the actual masks of the batch (causal, same document, block window), so
sparse document masks are not counted as dense attention. Embedding lookups count as zero.
MFU = achieved model FLOP/s / peak; peak defaults to 800 TFLOP/s for an H100 (measured bf16 dense matmul),
125 for an A10 (datasheet); on other devices pass --peak-tflops or MFU is not reported.
BENCH_STACKS=N (seconds) prints every thread's Python stack every N seconds during the warm-up: where a slow first
step is spending its time (compilation or running).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runlib import devices  # noqa: E402
import train_gpt as tg  # noqa: E402

PEAK_TFLOPS = devices.PEAK_TFLOPS


def all_presets() -> dict[str, dict]:
    """Track 1's presets and train_gpt_medium.py's (medium)."""
    import train_gpt_medium
    return {**tg.PRESETS, **train_gpt_medium.PRESETS}


# Where the time goes: every GPU kernel's time is put in the first category whose test matches its key: its name,
# prefixed with "Optimizer.step#CLASS.step > " when it ran inside an optimiser's step (kernel_times), since Muon's
# matmuls are named like the model's. Inductor names fused Triton kernels after the ops they contain, so "_to_copy"
# in such a name is a dtype cast, not a copy.
OPTIMIZER_RANGE = "Optimizer.step#"  # torch.optim's own range around every step(): Optimizer.step#Muon.step
KERNEL_CATEGORIES = [
    ("Muon (optimiser step)", lambda k: k.startswith(OPTIMIZER_RANGE + "Muon.")),
    ("Adam (optimiser step)", lambda k: k.startswith(OPTIMIZER_RANGE) and "Adam." in k.split(" > ")[0]),
    ("other optimiser steps", lambda k: k.startswith(OPTIMIZER_RANGE)),
    ("attention (flex, fwd + bwd)", lambda k: "flex_attention" in k),
    ("fp8 matmul (lm_head)", lambda k: "scaled_mm" in k and k.startswith(("nvjet", "sm90", "cutlass"))
        or k.startswith(("nvjet_sm90_qq", "nvjet_sm90_qr"))),
    ("bf16 matmul", lambda k: k.startswith(("nvjet", "sm90_xmma", "cutlass", "ampere_", "sm80_")) or "gemm" in k),
    ("cross-entropy + soft-cap (fp32 logits)", lambda k: "log_softmax" in k or "nll_loss" in k),
    ("fp8 casts and scales (Triton)", lambda k: k.startswith("triton_") and "scaled_mm" in k),
    ("norms + rotary (fused)", lambda k: "rms_norm" in k),
    ("other fused elementwise (Triton)", lambda k: k.startswith("triton_")),
    ("memcpy / memset", lambda k: "memcpy" in k.lower() or "memset" in k.lower()),
    ("other (eager kernels: optimisers, ...)", lambda k: True),
]


RANGE_PREFIXES = ("## ", "Optimizer.", "Call CompiledFxGraph", "CompiledFunction", "Torch-Compiled")


def kernel_category(key: str) -> str:
    return next(name for name, test in KERNEL_CATEGORIES if test(key))


def kernel_times(events) -> list[tuple[str, float]]:
    """(key, microseconds) of every GPU activity of a profile's events (prof.events()). User ranges ("## step",
    compiled graph calls) also appear on the GPU, spanning the kernels they launched: counted, they would count those
    kernels twice, so they only serve to key the kernels inside an optimiser's step."""
    spans, kernels = [], []
    for e in events:
        if "CUDA" not in str(getattr(e, "device_type", "")):
            continue
        start, end = e.time_range.start, e.time_range.end
        if e.name.startswith(OPTIMIZER_RANGE):
            spans.append((start, end, e.name))
        elif not (e.name.startswith(RANGE_PREFIXES) or getattr(e, "is_user_annotation", False)):
            kernels.append((e.name, start, end))
    return keyed_kernel_times(kernels, spans)


def keyed_kernel_times(kernels, spans) -> list[tuple[str, float]]:
    """kernels (name, start, end) and optimiser spans (start, end, range name) on the GPU's clock: (key, duration) per
    kernel, the key prefixed with "RANGE > " for a kernel that starts inside a span (one stream: they do not nest)."""
    spans = sorted(spans)
    starts = [s for s, _, _ in spans]
    out = []
    for name, start, end in kernels:
        i = bisect.bisect_right(starts, start) - 1
        inside = i >= 0 and start < spans[i][1]
        out.append((f"{spans[i][2]} > {name}" if inside else name, end - start))
    return out


def profile_steps(trainer, batches, device, steps: int) -> dict:
    """GPU time per kernel category over a few steps, with CPU-side ranges for the optimiser and data."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with record_function("## data"):
                batch = batches.next_batch(device)
            with record_function("## step"):
                trainer.train_step(batch)
        devices.synchronize(device)
    events = prof.key_averages()
    totals: dict[str, float] = {name: 0.0 for name, _ in KERNEL_CATEGORIES}
    per_key: dict[str, float] = {}
    for key, t in kernel_times(prof.events()):
        per_key[key] = per_key.get(key, 0.0) + t
        totals[kernel_category(key)] += t
    kernels = list(per_key.items())
    gpu_total = sum(totals.values()) or 1.0
    ranges: dict[str, float] = {}
    for e in events:  # a user range is listed twice, its CPU side and its GPU annotation (CPU time 0): keep the CPU's
        if e.key.startswith(("## ", "Optimizer.step#")):
            ranges[e.key] = max(ranges.get(e.key, 0.0), e.cpu_time_total)
    print(f"profile over {steps} steps: GPU kernel time {gpu_total / 1e3 / steps:.1f} ms/step")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        if t:
            print(f"  {name:42s} {t / 1e3 / steps:8.1f} ms/step  {100 * t / gpu_total:5.1f}%")
    print("  top kernels:")
    for key, t in sorted(kernels, key=lambda kv: -kv[1])[:15]:
        print(f"    {t / 1e3 / steps:8.2f} ms/step  {key[:110]}")
    for key, t in ranges.items():
        print(f"  host wall time in {key.removeprefix('## '):28s} {t / 1e3 / steps:8.1f} ms/step")
    return {"steps": steps, "gpu_ms_per_step": gpu_total / 1e3 / steps,
            "categories_ms_per_step": {k: round(v / 1e3 / steps, 2) for k, v in totals.items() if v},
            "top_kernels_ms_per_step": [(k[:200], round(t / 1e3 / steps, 3))
                                        for k, t in sorted(kernels, key=lambda kv: -kv[1])[:25]],
            "host_ranges_ms_per_step": {k.removeprefix("## "): round(t / 1e3 / steps, 2) for k, t in ranges.items()}}


def synthetic_tokens(n: int, mean_doc_len: int, seed: int) -> np.ndarray:
    """Random tokens cut into documents of geometric length, each preceded by BOS, like packed FineWeb."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, tg.BOS_ID, size=n, dtype=np.int64)
    toks[rng.random(n) < 1.0 / mean_doc_len] = tg.BOS_ID
    toks[0] = tg.BOS_ID
    return toks


def mean_attended_keys(tokens: np.ndarray, window_blocks: int) -> float:
    """Mean over queries of the number of keys a query may attend to: those of its document from the start of the
    block max(window_blocks, 1) - 1 blocks before its own, up to itself."""
    pos = np.arange(tokens.size)
    starts = np.where(tokens == tg.BOS_ID, pos, 0)
    doc_start = np.maximum.accumulate(starts)
    window_start = (pos // tg.FLEX_BLOCK_SIZE - (max(window_blocks, 1) - 1)) * tg.FLEX_BLOCK_SIZE
    return float((pos - np.maximum(doc_start, window_start) + 1).mean())


def flops_per_token(model: tg.GPT, tokens: np.ndarray, window_blocks: int) -> float:
    cfg = model.cfg
    matmul = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim >= 2)
    matmul += model.lm_head.weight.numel()
    hdim = cfg.num_heads * cfg.head_dim
    attn = 0.0
    for block, kind in zip(model.blocks, model.window_kinds()):
        if block.attn is not None:
            window = window_blocks if kind == "L" else window_blocks // 2
            attn += 12 * hdim * mean_attended_keys(tokens, window)
    return 6 * matmul + attn


def gpu_driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


class SyntheticBatches:
    def __init__(self, hp: tg.Hyperparameters, grad_accum: int, device: torch.device, seed: int):
        self.hp, self.grad_accum, self.device = hp, grad_accum, device
        self.tokens = synthetic_tokens(hp.train_seq_len * grad_accum * 4 + 1, 1024, seed)
        self.i = 0

    def next_batch(self, device):
        out = []
        T = self.hp.train_seq_len
        for _ in range(self.grad_accum):
            s = (self.i % (len(self.tokens) // T - 1)) * T
            self.i += 1
            buf = torch.from_numpy(self.tokens[s:s + T + 1]).to(device)
            out.append((buf[:-1].to(torch.int32), buf[1:]))
        return out


def validation_memory(trainer, hp: tg.Hyperparameters, device: torch.device, window: int) -> dict:
    """One validation-shaped forward (eval mode, no gradients, val_seq_len tokens): its time and peak memory."""
    toks = torch.from_numpy(synthetic_tokens(hp.val_seq_len + 1, 1024, hp.seed + 1)).to(device)
    inputs, targets = toks[:-1].to(torch.int32), toks[1:]
    win = torch.tensor(window, dtype=torch.int32, device=device)
    out = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.model.eval()
    with torch.no_grad():
        for attempt in ("first (compile)", "second"):
            devices.synchronize(device)
            t = time.perf_counter()
            loss = trainer.compiled(inputs, targets, win)
            devices.synchronize(device)
            out[f"val_forward_s_{attempt.split()[0]}"] = round(time.perf_counter() - t, 3)
    trainer.model.train()
    out["val_forward_loss"] = round(loss.item(), 4)
    if device.type == "cuda":
        out["val_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out["val_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    print(f"validation forward of {hp.val_seq_len} tokens: {out} ", flush=True)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--preset", default="tiny", choices=list(all_presets()),
                    help="the trainer's preset to measure (default tiny; auto fits the GPU found)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 50 on GPU, 5 on CPU)")
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (compile happens here)")
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default auto: a GPU if any)")
    ap.add_argument("--no-compile", action="store_true", help="measure the eager model (default: the preset's choice)")
    ap.add_argument("--no-fp8", action="store_true", help="run lm_head in bf16 instead of FP8")
    ap.add_argument("--data-dir", default=None, help="read real train shards from here instead of synthetic tokens")
    ap.add_argument("--train-files", default=None, help="glob of train shards in --data-dir (default: the preset's)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: known GPUs only)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile N steps and print where the GPU time goes (CUDA)")
    ap.add_argument("--validate", action="store_true",
                    help="also run one validation forward (val_seq_len tokens) and report its peak memory")
    return ap.parse_args(argv)


def settings(args: argparse.Namespace) -> tuple[tg.Hyperparameters, torch.device]:
    """The preset with the benchmark's overrides, checked, and the device it runs on."""
    over = {"device": args.device, "cpu_ok": True}  # a few timed steps, not the preset's whole run
    if args.no_compile:
        over["compile"] = False
    if args.no_fp8:
        over["fp8"] = False
    if args.data_dir:
        over["data_dir"] = args.data_dir
    if args.train_files:
        over["train_files"] = args.train_files
    hp = dataclasses.replace(tg.preset_hyperparameters(args.preset, all_presets()), **over)
    device, hp, notes = tg.setup_device(hp, 1)  # the trainer's own: device, attention, --preset auto, checks
    for note in notes:
        print(note, flush=True)
    return hp, device


def warm_up(trainer, batches, device: torch.device, steps: int) -> tuple[float, dict]:
    """The untimed first steps (compile happens here): their time and, on GPUs, their peak memory."""
    if os.environ.get("BENCH_STACKS"):  # diagnose a slow warm-up: every N seconds, where is Python?
        import faulthandler
        faulthandler.dump_traceback_later(float(os.environ["BENCH_STACKS"]), repeat=True)
    t0 = time.perf_counter()
    for i in range(steps):
        t = time.perf_counter()
        trainer.train_step(batches.next_batch(device))
        devices.synchronize(device)
        print(f"warm-up step {i + 1}: {time.perf_counter() - t:.1f}s", flush=True)
    warmup_s = time.perf_counter() - t0
    if os.environ.get("BENCH_STACKS"):
        faulthandler.cancel_dump_traceback_later()
    memory = {}
    if device.type == "cuda":
        memory = {"warmup_peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                  "warmup_peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)}
        torch.cuda.reset_peak_memory_stats(device)
    return warmup_s, memory


def time_steps(trainer, batches, device: torch.device, steps: int) -> tuple[list[float], float, list]:
    """Step times at the end-of-training window (the most expensive attention), the last loss and batch; losses
    are not synced inside the loop."""
    last_step = trainer.hp.num_iterations - 1
    times, batch, loss = [], None, None
    for _ in range(steps):
        trainer.step = last_step
        batch = batches.next_batch(device)
        devices.synchronize(device)
        t = time.perf_counter()
        loss = trainer.train_step(batch)
        devices.synchronize(device)
        times.append(time.perf_counter() - t)
    trainer.step = last_step
    return times, loss.item(), batch


def main(argv=None) -> int:
    args = parse_args(argv)
    hp, device = settings(args)
    steps = args.steps if args.steps is not None else (50 if device.type == "cuda" else 5)
    if args.data_dir:
        trainer = tg.Trainer(hp, device, train_files=tg.find_shards(hp.data_dir, hp.train_files, "train"))
        batches = trainer.loader
    else:
        trainer = tg.Trainer(hp, device)
        batches = SyntheticBatches(hp, trainer.grad_accum, device, hp.seed)
    model = trainer.model
    print(f"preset {hp.preset}: {hp.num_layers}x{hp.model_dim}, {hp.global_batch_tokens} tokens per step "
          f"({trainer.grad_accum} micro-steps of {hp.train_seq_len}) on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; attention "
          f"{model.attn_impl}, lm_head {model.head_precision}, compile {hp.compile}", flush=True)
    warmup_s, warmup_memory = warm_up(trainer, batches, device, args.warmup_steps)
    times, loss, last_batch = time_steps(trainer, batches, device, steps)
    window = tg.window_blocks(trainer.step, hp)
    result = summarise(args, hp, trainer, device, times, loss, last_batch, window, warmup_s, warmup_memory)
    if args.validate:
        result.update(validation_memory(trainer, hp, device, window))
    if args.json:  # before the profile too: a profile that fails or is cut off leaves the timing
        write_json(args.json, result)
    if args.profile and device.type == "cuda":
        result["profile"] = profile_steps(trainer, batches, device, args.profile)
        if args.json:
            write_json(args.json, result)
    return 0


def write_json(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)


def summarise(args, hp, trainer, device, times, loss, last_batch, window, warmup_s, warmup_memory) -> dict:
    """The figures of the run (printed as they are known) and the JSON result."""
    model = trainer.model
    tokens_np = np.concatenate([x.cpu().numpy() for x, _ in last_batch])
    fpt = flops_per_token(model, tokens_np, window)
    step_s = statistics.median(times)
    tok_s = hp.global_batch_tokens / step_s
    achieved = fpt * tok_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    result = {
        "preset": hp.preset, "device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d"), "compile": hp.compile, "lm_head": model.head_precision,
        "attention": model.attn_impl, "global_batch_tokens": hp.global_batch_tokens,
        "grad_accum": trainer.grad_accum, "timed_steps": len(times), "warmup_steps": args.warmup_steps,
        "warmup_s": round(warmup_s, 2), "step_ms_median": round(1000 * step_s, 2),
        "step_ms_mean": round(1000 * statistics.mean(times), 2), "tokens_per_s": round(tok_s),
        "model_flops_per_token": round(fpt), "achieved_tflops": round(achieved / 1e12, 3),
        "peak_tflops": peak, "mfu": round(achieved / (peak * 1e12), 4) if peak else None,
        "peak_memory": devices.peak_memory(device), "final_loss": round(loss, 4), "window_blocks": window,
        "driver": None,
    }
    if device.type == "cuda":
        result["driver"] = gpu_driver_version()
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        result.update(warmup_memory)
        print(f"peak allocated {result['peak_allocated_gib']} GiB, reserved {result['peak_reserved_gib']} GiB "
              f"(timed steps); warm-up and compile: allocated {warmup_memory['warmup_peak_allocated_gib']} GiB, "
              f"reserved {warmup_memory['warmup_peak_reserved_gib']} GiB", flush=True)
    print(f"warm-up {args.warmup_steps} steps (compile included): {warmup_s:.1f}s")
    print(f"step {1000 * step_s:.1f} ms (median of {len(times)}), {tok_s:,.0f} tokens/s, "
          f"{fpt / 1e9:.3f} GFLOP/token, {achieved / 1e12:.3f} TFLOP/s achieved, "
          f"MFU {'%.1f%%' % (100 * result['mfu']) if peak else 'n/a (no peak known; pass --peak-tflops)'}")
    print(f"peak memory: {result['peak_memory']}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
