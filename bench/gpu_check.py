"""gpu_check.sh's bookkeeping: the environment step, and the one JSON file (gpu_check.json) that every step's status,
time and figures are merged into. The JSON is rewritten atomically after every change, so a run that is cut off
still leaves what it measured. Only `env` imports torch: the other commands take a fraction of a second.

    python bench/gpu_check.py env --json OUT/env.json [--mode cuda]    # GPU, driver, torch, Triton, CUDA
    python bench/gpu_check.py init OUT/gpu_check.json --mode cuda --budget 540 --steps env,train-fp8
    python bench/gpu_check.py start OUT/gpu_check.json STEP --limit 270 --raw OUT/STEP.json
    python bench/gpu_check.py finish OUT/gpu_check.json STEP --rc 0 --raw OUT/STEP.json
    python bench/gpu_check.py skip OUT/gpu_check.json STEP --reason "no CUDA"
    python bench/gpu_check.py close OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

A10_LIMIT_GIB = 22.0  # what a 24 GB card leaves to a training process
TIMED_OUT = (124, 137)  # timeout(1): the limit's SIGTERM, or the SIGKILL that follows when it is ignored

TRAIN_KEYS = ("preset", "device", "compile", "lm_head", "attention", "global_batch_tokens", "grad_accum",
              "warmup_steps", "warmup_s", "timed_steps", "window_blocks", "step_ms_median", "step_ms_mean",
              "tokens_per_s", "model_flops_per_token", "achieved_tflops", "peak_tflops", "mfu", "peak_memory",
              "peak_allocated_gib", "peak_reserved_gib", "warmup_peak_allocated_gib", "warmup_peak_reserved_gib",
              "final_loss")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def since(stamp: str) -> float:
    return (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds()


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


# --- environment ---------------------------------------------------------------------------------------------------

def nvidia_smi() -> dict:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"nvidia_smi": f"not available ({type(e).__name__})"}
    if p.returncode or not p.stdout.strip():
        return {"nvidia_smi": f"exit {p.returncode}: {(p.stderr or p.stdout).strip()[:200]}"}
    name, driver, memory = (f.strip() for f in p.stdout.strip().splitlines()[0].split(",", 2))
    return {"gpu": name, "driver": driver, "gpu_memory": memory, "gpu_count": len(p.stdout.strip().splitlines())}


def package_version(*names: str) -> str | None:
    from importlib import metadata
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def environment() -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": package_version("triton", "pytorch-triton"), "cuda_available": torch.cuda.is_available(),
           "driver": None}
    env.update(nvidia_smi())
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    env["cpu_count"] = os.cpu_count()
    return env


def cmd_env(args) -> int:
    env = environment()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    save(Path(args.json), env)
    for key, value in env.items():
        print(f"{key}: {value}", flush=True)
    if args.mode == "cuda" and not env["cuda_available"]:
        print("no CUDA device visible to torch", file=sys.stderr)
        return 1
    return 0


# --- figures of each step, from the JSON its tool wrote ---------------------------------------------------------------

def env_figures(raw: dict, data: dict) -> dict:
    for key in ("device", "driver", "torch", "triton", "cuda"):  # the top of the file says what ran it
        data[key] = raw.get(key)
    return raw


def train_figures(raw: dict, data: dict) -> dict:
    fig = {k: raw[k] for k in TRAIN_KEYS if k in raw}
    if "profile" in raw:
        p = raw["profile"]
        fig["profile"] = {"steps": p.get("steps"), "gpu_ms_per_step": round(p.get("gpu_ms_per_step", 0.0), 2),
                          "categories_ms_per_step": p.get("categories_ms_per_step"),
                          "host_ranges_ms_per_step": p.get("host_ranges_ms_per_step"),
                          "top_kernels_ms_per_step": p.get("top_kernels_ms_per_step", [])[:10]}
    elif data.get("mode") == "cpu":
        fig["profile"] = "skipped: no CUDA"
    else:
        fig["profile"] = "not measured: the step ended before its profile"
    return fig


def bf16_figures(raw: dict, data: dict) -> dict:
    fig = {k: raw[k] for k in ("lm_head", "compile", "warmup_s", "timed_steps", "step_ms_median", "tokens_per_s")
           if k in raw}
    fp8 = data.get("steps", {}).get("train-fp8", {}).get("figures", {})
    if fp8.get("lm_head") == "fp8" and fp8.get("tokens_per_s") and fig.get("tokens_per_s"):
        fig["fp8_speedup"] = round(fp8["tokens_per_s"] / fig["tokens_per_s"], 4)  # > 1: the FP8 head pays off
    return fig


def attention_figures(raw: dict, data: dict) -> dict:
    att = raw.get("attention", {})
    cases = att.get("cases", [])
    blocks = sorted({c["window_blocks"] for c in cases if "window_blocks" in c})
    return {"passed": att.get("passed"),
            "gradients": True if att.get("backward") else "skipped: no CUDA (forward only)",
            "window_sizes_blocks": blocks, "zero_block_window": 0 in blocks,
            "cases": [{k: c.get(k) for k in ("T", "mean_doc_len", "kind", "window_blocks", "dense_bf16_rel_err",
                                             "flex_bf16_rel_err", "passed")} for c in cases],
            "seconds": att.get("seconds_total")}


def a10_figures(raw: dict, data: dict) -> dict:
    fig = {k: raw[k] for k in ("compile", "lm_head", "grad_accum", "step_ms_median", "tokens_per_s",
                               "peak_allocated_gib", "peak_reserved_gib", "warmup_peak_allocated_gib",
                               "warmup_peak_reserved_gib") if k in raw}
    allocated = [raw[k] for k in ("peak_allocated_gib", "warmup_peak_allocated_gib") if raw.get(k) is not None]
    reserved = [raw[k] for k in ("peak_reserved_gib", "warmup_peak_reserved_gib") if raw.get(k) is not None]
    fig["limit_gib"] = A10_LIMIT_GIB
    # allocated is what must fit: the caching allocator frees its cache before it fails an allocation
    fig["peak_allocated_max_gib"] = max(allocated) if allocated else None
    fig["under_limit"] = max(allocated) <= A10_LIMIT_GIB if allocated else None
    fig["reserved_under_limit"] = max(reserved) <= A10_LIMIT_GIB if reserved else None
    return fig


FIGURES = {"env": env_figures, "train-fp8": train_figures, "train-bf16": bf16_figures,
           "attention": attention_figures, "a10-memory": a10_figures}


def summary(step: str, fig: dict) -> str:
    """The step's headline figures in one line."""
    if step == "env":
        keys = ("device", "driver", "torch", "cuda", "triton")
    elif step == "train-fp8":
        keys = ("step_ms_median", "tokens_per_s", "mfu", "warmup_s", "peak_allocated_gib", "lm_head")
    elif step == "train-bf16":
        keys = ("step_ms_median", "tokens_per_s", "warmup_s", "fp8_speedup")
    elif step == "attention":
        keys = ("passed", "gradients", "window_sizes_blocks", "zero_block_window")
    else:
        keys = ("peak_allocated_max_gib", "limit_gib", "under_limit", "peak_reserved_gib")
    return ", ".join(f"{k} {fig[k]}" for k in keys if k in fig)


# --- the file ---------------------------------------------------------------------------------------------------------

def cmd_init(args) -> int:
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = load(path)
    steps = old.get("steps", {})  # a rerun of some steps keeps the others' results
    for step in args.steps.split(","):
        steps[step] = {"status": "pending"}
    save(path, {"date": now(), "mode": args.mode, "device": old.get("device"), "driver": old.get("driver"),
                "torch": old.get("torch"), "triton": old.get("triton"), "cuda": old.get("cuda"),
                "budget_s": args.budget, "seconds": None, "complete": False, "steps": steps})
    return 0


def cmd_start(args) -> int:
    path = Path(args.json)
    data = load(path)
    if args.raw:
        Path(args.raw).unlink(missing_ok=True)  # an earlier run's file must not pass for this one's
    data.setdefault("steps", {})[args.step] = {"status": "running", "started_at": now(), "limit_s": args.limit}
    save(path, data)
    return 0


def cmd_finish(args) -> int:
    path = Path(args.json)
    data = load(path)
    entry = data.setdefault("steps", {}).setdefault(args.step, {})
    if args.rc == 0:
        entry["status"] = "ok"
    elif args.rc in TIMED_OUT:
        entry["status"] = "timed out"
    else:
        entry["status"] = "failed"
    entry["exit_code"] = args.rc
    if "started_at" in entry:
        entry["seconds"] = round(since(entry["started_at"]), 1)
    raw = load(Path(args.raw)) if args.raw else {}
    if raw:  # a failed or cut-off step may still have written what it measured
        entry["figures"] = FIGURES.get(args.step, lambda r, d: r)(raw, data)
    if args.log:
        entry["log"] = args.log
    save(path, data)
    line = summary(args.step, entry.get("figures", {}))
    print(f"=== {args.step}: {entry['status']} (exit {args.rc}) after {entry.get('seconds')}s"
          f"{': ' + line if line else ''}", flush=True)
    profile = entry.get("figures", {}).get("profile")
    if isinstance(profile, dict):
        for name, ms in sorted((profile.get("categories_ms_per_step") or {}).items(), key=lambda kv: -kv[1]):
            print(f"    {name:42s} {ms:8.1f} ms/step", flush=True)
    return 0


def cmd_skip(args) -> int:
    path = Path(args.json)
    data = load(path)
    data.setdefault("steps", {})[args.step] = {"status": f"skipped: {args.reason}"}
    save(path, data)
    print(f"=== {args.step}: skipped: {args.reason}", flush=True)
    return 0


def cmd_close(args) -> int:
    path = Path(args.json)
    data = load(path)
    data["seconds"] = round(since(data["date"]), 1) if data.get("date") else None
    data["complete"] = True
    save(path, data)
    print(f"=== gpu_check: {data['seconds']}s in all, {path}")
    for step, entry in data.get("steps", {}).items():
        print(f"    {step:12s} {entry.get('status')}"
              f"{'' if entry.get('seconds') is None else ' after %ss' % entry['seconds']}")
    bad = [s for s, e in data.get("steps", {}).items() if e.get("status") != "ok"
           and not str(e.get("status")).startswith("skipped: no CUDA")]
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("--json", required=True)
    p.add_argument("--mode", choices=("cuda", "cpu"), default="cpu", help="cuda: fail when torch sees no GPU")
    p.set_defaults(func=cmd_env)
    p = sub.add_parser("init")
    p.add_argument("json")
    p.add_argument("--mode", choices=("cuda", "cpu"), required=True)
    p.add_argument("--budget", type=int, required=True, help="seconds the whole check may take")
    p.add_argument("--steps", required=True, help="comma-separated steps of this run, in order")
    p.set_defaults(func=cmd_init)
    for name, func in (("start", cmd_start), ("finish", cmd_finish), ("skip", cmd_skip)):
        p = sub.add_parser(name)
        p.add_argument("json")
        p.add_argument("step", choices=list(FIGURES))
        p.set_defaults(func=func)
        if name == "start":
            p.add_argument("--limit", type=int, required=True)
        if name in ("start", "finish"):
            p.add_argument("--raw", default=None, help="the JSON the step's tool writes")
        if name == "finish":
            p.add_argument("--rc", type=int, required=True)
            p.add_argument("--log", default=None)
        if name == "skip":
            p.add_argument("--reason", required=True)
    p = sub.add_parser("close", help="the total time, a summary and the exit status of the whole check")
    p.add_argument("json")
    p.set_defaults(func=cmd_close)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
