"""Peak resident memory and step time of a CPU training run: train_gpt.py in a subprocess, as a user runs it.

    python bench/bench_memory.py                                  # tiny preset, 30 steps
    python bench/bench_memory.py --steps 50 --json records/memory.json
    python bench/bench_memory.py --compare-glibc                  # also with glibc's default malloc settings
    python bench/bench_memory.py --trainer /tmp/old_train_gpt.py  # another copy of the trainer (before / after)
    python bench/bench_memory.py --steps 4 -- --set model_dim=64 --set num_layers=2   # extra train_gpt.py flags

Peak memory is the trainer process's maximum resident set (its rusage, which covers the CPU malloc re-exec; the
trainer's own "peak memory" line reads the same counter), validation at the end included. A step's time is what
its step line's train_time adds to the previous one's; the median leaves out the first --skip steps (the optimiser
state and the heap are allocated there). For a before / after comparison, run an older copy of the trainer, e.g.
`git show HEAD~1:train_gpt.py > /tmp/old_train_gpt.py`, with --trainer. Other processes on the machine slow the
steps: the CPU time the rest of the machine used during the run is printed as "background load" (0 %: the run had
the machine to itself); repeat a measurement that shows some.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN_LINE = re.compile(r"^step:(\d+)/\d+ (?:train_loss:\S+ )?train_time:(\d+)ms")
FINAL_LINE = re.compile(r"^final val_loss:(\S+) ")
# glibc's own default M_MMAP_MAX: setting it stops train_gpt.py's CPU re-exec and leaves malloc as glibc has it
GLIBC_DEFAULTS = {"MALLOC_MMAP_MAX_": "65536"}


def busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine so far, in clock ticks; None where /proc/stat is missing."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def cpu_model() -> str:
    """The CPU's model name as Linux reports it (platform.processor() is often empty there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_trainer(trainer: Path, steps: int, extra: list[str], env: dict[str, str], skip: int) -> dict:
    """One training run of `steps` steps: peak resident memory, step times, final validation loss."""
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        cmd = [sys.executable, str(trainer), "--preset", "tiny", "--num-iterations", str(steps),
               "--val-loss-every", "0", "--no-save-final", "--run-name", "bench_memory",
               "--log-dir", f"{tmp}/logs", "--checkpoint-dir", f"{tmp}/checkpoints", *extra]
        before, t0 = busy_jiffies(), time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would mix runs)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall, after = time.perf_counter() - t0, busy_jiffies()
    if proc.returncode != 0:
        raise SystemExit(f"bench_memory: the trainer failed (exit {proc.returncode}):\n{' '.join(cmd)}\n{out[-3000:]}")
    times = {0: 0} | {int(m.group(1)): int(m.group(2)) for m in map(TRAIN_LINE.match, out.splitlines()) if m}
    step_ms = [times[s] - times[s - 1] for s in sorted(times) if s - 1 in times and s > skip]
    if not step_ms:
        raise SystemExit(f"bench_memory: no step times to report: run more than --skip {skip} steps")
    final = [m.group(1) for m in map(FINAL_LINE.match, out.splitlines()) if m]
    background = None
    if before and after and after[1] > before[1]:
        ticks = os.sysconf("SC_CLK_TCK")
        own = (usage.ru_utime + usage.ru_stime) * ticks
        background = max(0.0, (after[0] - before[0] - own) / (after[1] - before[1]))
    return {
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),  # ru_maxrss is in KiB on Linux
        "step_ms_median": round(statistics.median(step_ms), 1), "step_ms_mean": round(statistics.mean(step_ms), 1),
        "step_ms_min": min(step_ms), "steps_timed": len(step_ms), "final_val_loss": float(final[0]) if final else None,
        "wall_s": round(wall, 1), "background_load": None if background is None else round(background, 3),
        "malloc_env": {k: v for k, v in env.items() if k.startswith("MALLOC_")}, "command": cmd,
    }


def describe(label: str, r: dict) -> str:
    load = "n/a" if r["background_load"] is None else f"{100 * r['background_load']:.0f}%"
    return (f"{label}: peak resident {r['peak_rss_gib']:.2f} GiB, step {r['step_ms_median']:.0f} ms median "
            f"(mean {r['step_ms_mean']:.0f}, min {r['step_ms_min']}, {r['steps_timed']} steps), final val_loss "
            f"{r['final_val_loss']}, background load {load}, malloc {r['malloc_env'] or 'as the trainer sets it'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--steps", type=int, default=30, help="training steps of the run (default 30)")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the step time (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the trainer (default: inherited)")
    ap.add_argument("--trainer", default=str(ROOT / "train_gpt.py"), help="the script to run (default train_gpt.py)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="set in the trainer's environment, e.g. MALLOC_MMAP_THRESHOLD_=33554432 (repeatable)")
    ap.add_argument("--compare-glibc", action="store_true",
                    help="run again with glibc's default malloc settings (no CPU re-exec) and print both")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("extra", nargs="*", help="train_gpt.py flags after --, e.g. -- --set model_dim=64")
    args = ap.parse_args(argv)

    env = dict(os.environ)
    # a --trainer copy outside the repository still imports the repository's data/ package (the built-in corpus)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    for kv in args.env:
        key, sep, value = kv.partition("=")
        if not sep:
            ap.error(f"--env {kv!r}: expected KEY=VALUE")
        env[key] = value
    variants = {"trainer": env}
    if args.compare_glibc:
        variants["glibc"] = {k: v for k, v in env.items() if not k.startswith("MALLOC_")} | GLIBC_DEFAULTS
    print(f"{Path(args.trainer).name} --preset tiny {' '.join(args.extra)}: {args.steps} steps on "
          f"{os.cpu_count()} CPU(s), OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    runs = {}
    for label, variant_env in variants.items():
        runs[label] = run_trainer(Path(args.trainer), args.steps, args.extra, variant_env, args.skip)
        print(describe(label, runs[label]), flush=True)
    if args.json:
        result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu": cpu_model(),
                  "cpus": os.cpu_count(), "omp_num_threads": env.get("OMP_NUM_THREADS"), "steps": args.steps,
                  "skip": args.skip, "trainer": args.trainer, "extra_flags": args.extra, "runs": runs}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
