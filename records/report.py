"""Run reports: one table row per run log written by train_gpt.py, and optionally a loss-curve figure.

    python records/report.py [LOGS...] [--png FILE]      (default LOGS: logs/*.txt)
    python records/report.py A.txt B.txt --compare       (also: val loss of B, C, ... minus A's, step by step)
    python records/report.py RUN.txt --record            (also: the run's val loss minus its track's record's)
    python records/report.py --run-report RUN.txt        (RUN.md and RUN.png beside a run on the record's val set:
                                                          what the wrappers run after a run ends well)

A run log (logs/<run_id>.txt) holds the trainer's source, then blocks separated by a line of 100 '=': "config {json}",
the environment ("torch V, CUDA ..., cuDNN ..." and "gpus N: names" or "cpu threads N"), a "run <id>: W process(es) on
<device>, ..." line, the step lines (some with a val_loss or a train_loss) and, for a run that finished, a "final
val_loss:..." summary. A resumed run appends "resumed from ..." and the config and environment again; its step lines
continue. Files that are not run logs are skipped with a warning on stderr; the exit status is 2 when none of the given
files is one.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.shards import atomic_write  # noqa: E402
from runlib.devices import PEAK_TFLOPS  # noqa: E402  (the trainer's rules)
from runlib.runlog import TRACK_VAL_TOKENS, target_comparable  # noqa: E402

RULE = "=" * 100
RECORD_CURVES = Path(__file__).resolve().parent / "record_curves.json"  # the public records' val losses, as data
STEP_LINE = re.compile(r"^step:(\d+)/(\d+) (?:(val_loss|train_loss):(\S+) )?train_time:(\d+)ms step_avg:\S+ms$")
SUMMARY_LINE = re.compile(r"^final val_loss:(\S+) train_time:([\d.]+)s \((\d+) steps, ([\d,]+) tokens")
RUN_LINE = re.compile(r"^run (\S+): (\d+) process\(es\) on (\w+)")
TORCH_LINE = re.compile(r"^torch ([^\s,]+), CUDA ")
GPUS_LINE = re.compile(r"^gpus (\d+): (.*)$")
CPU_LINE = re.compile(r"^cpu threads (\d+)$")


class NotARunLog(ValueError):
    """The file is not a log written by train_gpt.py."""


def _config_at(lines: list[str], i: int) -> tuple[dict, int] | None:
    """The config block starting at lines[i] ("config {") and the index after it, or None."""
    if lines[i] != "config {" or i == 0 or lines[i - 1] != RULE:
        return None
    body = ["{"]
    for j in range(i + 1, len(lines)):
        body.append(lines[j])
        if lines[j] == "}":  # json.dumps(indent=1): the closing brace of the top-level object is alone at column 0
            try:
                config = json.loads("\n".join(body))
            except json.JSONDecodeError:
                return None
            return (config, j + 1) if isinstance(config, dict) and "num_iterations" in config else None
    return None


def _short_gpu_name(names: str) -> str:
    first = names.split(",")[0].strip()
    return first[len("NVIDIA "):] if first.startswith("NVIDIA ") else first


def dataset_name(config: dict) -> str:
    """The name of the data a run validated on: the directory of its validation files (data/builtin: "builtin",
    data/fineweb10B: "fineweb10B", a corpus prepared into data/code: "code"); val_files may be absolute."""
    val = Path(str(config.get("data_dir", "")), str(config.get("val_files", "")))
    return val.parent.name or val.name or "?"


def val_set_label(val_set: tuple) -> str:
    """A parsed run's val_set as words: "builtin: first 16,384 tokens of builtin_val_*.bin"."""
    name, files, tokens = val_set
    return f"{name}: first {tokens:,} tokens of {files}"


def parse_log(path) -> dict:
    """The facts of one run log. Raises NotARunLog for a file that is not one.

    Keys: run_id, path, config (the last config block), preset, num_iterations, seqs_per_step, train_seq_len,
    global_batch_tokens, target_val_loss, processes, device ("cuda"/"cpu"), gpus (count or None), gpu_name,
    cpu_threads, hardware (display), torch (version, None where the log has no torch line), steps (last step
    reached), finished, resumed (number of resumptions), final_val_loss (the summary's, else the last val line's; nan
    without any), val_step, train_time_s (the summary's, else the last step line's), tokens_per_s, reached_target
    (True/False; None without a target or a val loss, or for a record target on other validation data),
    target_comparable (whether the target applies to this run), dataset (dataset_name), val_set ((dataset, val_files'
    file name, val_tokens): runs with equal val_sets validated on the same text, so only their losses compare),
    val_curve and train_curve (lists of (step, loss, train_time_s) from the val_loss and train_loss lines, sorted by
    step; later lines win).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NotARunLog(f"{path}: unreadable as a run log ({e})") from e
    found = _scan(text.splitlines())
    config = found["config"]
    if config is None:
        raise NotARunLog(f"{path}: no config block, not a train_gpt.py run log")
    seqs, seq_len = int(config.get("seqs_per_step", 0)), int(config.get("train_seq_len", 0))
    target = float(config.get("target_val_loss") or 0.0)
    curve = [(s, v, t) for s, (v, t) in sorted(found["val"].items())]
    train_curve = [(s, v, t) for s, (v, t) in sorted(found["train"].items())]
    outcome = _outcome(found, curve)
    steps, train_time_s, final_val = outcome["steps"], outcome["train_time_s"], outcome["final_val_loss"]
    val_tokens = int(config.get("val_tokens") or TRACK_VAL_TOKENS)
    comparable = target_comparable(target, str(config.get("val_files", "")), val_tokens)
    gpus, dataset = found["gpus"], dataset_name(config)
    return {
        "run_id": path.stem, "path": str(path), "config": config, "preset": config.get("preset", "?"),
        "num_iterations": int(config["num_iterations"]), "seqs_per_step": seqs, "train_seq_len": seq_len,
        "global_batch_tokens": seqs * seq_len, "target_val_loss": target,
        **_hardware(found), "gpus": int(gpus.group(1)) if gpus else None, "cpu_threads": found["cpu_threads"],
        "torch": found["torch"].group(1) if found["torch"] else None, **outcome, "resumed": found["resumed"],
        "tokens_per_s": steps * seqs * seq_len / train_time_s if train_time_s > 0 else math.nan,
        "reached_target": bool(final_val <= target) if comparable and not math.isnan(final_val) else None,
        "target_comparable": comparable, "dataset": dataset,
        "val_set": (dataset, Path(str(config.get("val_files", ""))).name, val_tokens),
        "val_curve": curve, "train_curve": train_curve,
    }


def _scan(lines: list[str]) -> dict:
    """One pass over a log: the last config block and, after it, the lines a report reads (a summary belongs to
    the segment it follows: a later config block, written by a resume, clears it)."""
    found = {"config": None, "summary": None, "run_line": None, "gpus": None, "cpu_threads": None, "torch": None,
             "resumed": 0, "val": {}, "train": {}, "last_step": 0, "last_time_ms": 0}
    matchers = {"final val_loss:": ("summary", SUMMARY_LINE), "run ": ("run_line", RUN_LINE),
                "gpus ": ("gpus", GPUS_LINE), "torch ": ("torch", TORCH_LINE)}
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("config {") and (block := _config_at(lines, i)) is not None:
            found["config"], i = block
            found["summary"] = None
            continue
        i += 1
        if found["config"] is None:  # the trainer's source and anything else before the first config block
            continue
        if line.startswith("step:") and (m := STEP_LINE.match(line)):
            step, time_ms = int(m.group(1)), int(m.group(5))
            found["last_step"], found["last_time_ms"] = step, time_ms
            if m.group(3):  # "val_loss" or "train_loss"
                found[m.group(3)[:-len("_loss")]][step] = (float(m.group(4)), time_ms / 1000)
        elif line.startswith("resumed from "):
            found["resumed"] += 1
        elif line.startswith("cpu threads ") and (m := CPU_LINE.match(line)):
            found["cpu_threads"] = int(m.group(1))
        else:
            for prefix, (key, pattern) in matchers.items():
                if line.startswith(prefix) and (m := pattern.match(line)):
                    found[key] = m
    return found


def _hardware(found: dict) -> dict:
    """processes, device, gpu_name and the hardware column, from the run line and the environment report."""
    run_line, gpus, threads = found["run_line"], found["gpus"], found["cpu_threads"]
    processes = int(run_line.group(2)) if run_line else 1
    device = run_line.group(3) if run_line else ("cuda" if gpus else "cpu")
    gpu_name = _short_gpu_name(gpus.group(2)) if gpus and device == "cuda" else None
    if device == "cuda":
        hardware = f"{processes}x {gpu_name or 'GPU'}"
    else:
        hardware = f"{processes}x {device}" + (f" ({threads} threads)" if threads else "")
    return {"processes": processes, "device": device, "gpu_name": gpu_name, "hardware": hardware}


def _outcome(found: dict, curve: list) -> dict:
    """steps, finished, final_val_loss, val_step and train_time_s: the summary's where the run finished, else the
    last lines'."""
    summary = found["summary"]
    if summary is None:
        return {"steps": found["last_step"], "finished": False, "final_val_loss": curve[-1][1] if curve else math.nan,
                "val_step": curve[-1][0] if curve else None, "train_time_s": found["last_time_ms"] / 1000}
    steps, train_time_s = int(summary.group(3)), float(summary.group(2))
    # the summary has 0.1 s resolution; the last val line has ms and agrees unless a final checkpoint was timed
    if curve and curve[-1][0] == steps and abs(curve[-1][2] - train_time_s) <= 0.05 + 1e-9:
        train_time_s = curve[-1][2]
    return {"steps": steps, "finished": True, "final_val_loss": float(summary.group(1)),
            "val_step": curve[-1][0] if curve else steps, "train_time_s": train_time_s}


COLUMNS = ["run", "preset", "data", "hardware", "steps", "val loss", "time (s)", "tokens/s", "target", "status"]
RIGHT = {"steps", "val loss", "time (s)", "tokens/s"}


def table_row(run: dict) -> dict[str, str]:
    """The formatted cells of one run's row, by column name."""
    val = run["final_val_loss"]
    if run["reached_target"] is None:
        if run["target_val_loss"] <= 0:
            target = "-"
        elif math.isnan(val):
            target = f"? ({run['target_val_loss']:g})"
        else:  # a record target, but the run validated on other text
            target = f"n/a ({run['target_val_loss']:g} is for FineWeb val)"
    else:
        target = f"{'yes' if run['reached_target'] else 'no'} ({run['target_val_loss']:g})"
    status = "finished" if run["finished"] else "unfinished"
    if run["resumed"]:
        status += f", resumed x{run['resumed']}"
    tps = run["tokens_per_s"]
    return {
        "run": run["run_id"], "preset": str(run["preset"]), "data": run["dataset"], "hardware": run["hardware"],
        "steps": f"{run['steps']}/{run['num_iterations']}",
        "val loss": "-" if math.isnan(val) else f"{val:.4f}",
        "time (s)": f"{run['train_time_s']:.1f}",
        "tokens/s": "-" if math.isnan(tps) else f"{tps:,.0f}",
        "target": target, "status": status,
    }


def format_table(runs: list[dict]) -> str:
    """An aligned text table with a header line, one line per run."""
    rows = [dict(zip(COLUMNS, COLUMNS))] + [table_row(r) for r in runs]
    widths = {c: max(len(row[c]) for row in rows) for c in COLUMNS}
    out = []
    for row in rows:
        cells = [row[c].rjust(widths[c]) if c in RIGHT else row[c].ljust(widths[c]) for c in COLUMNS]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def compare_runs(runs: list[dict]) -> dict:
    """Val losses of runs at the steps every one of them validated at, and each later run minus the first.

    For "does this change learning?" questions (FP8 on vs off, one seed vs another): the runs should share data and
    validation steps. Step 0 (before any training) is left out of the summary statistics. config_differences names
    the config keys that differ; environment_differences holds (name, each run's value) for the torch version and
    the hardware (processes and device) where they differ; val_sets is each run's val_set, one per run.
    """
    shared = sorted(set.intersection(*({s for s, _, _ in r["val_curve"]} for r in runs)))
    losses = [{s: v for s, v, _ in r["val_curve"]} for r in runs]
    rows = [(s, [loss[s] for loss in losses]) for s in shared]
    summary = []
    for k in range(1, len(runs)):
        diffs = [vals[k] - vals[0] for s, vals in rows if s > 0]
        summary.append({"run": runs[k]["run_id"], "steps": len(diffs),
                        "mean_diff": sum(diffs) / len(diffs) if diffs else math.nan,
                        "mean_abs_diff": sum(map(abs, diffs)) / len(diffs) if diffs else math.nan,
                        "max_abs_diff": max(map(abs, diffs)) if diffs else math.nan,
                        "final_diff": diffs[-1] if diffs else math.nan})
    ignore = {"run_name", "log_dir", "checkpoint_dir", "resume", "wandb", "wandb_project"}
    keys = sorted({k for r in runs for k in r["config"]} - ignore)
    differ = [k for k in keys if any(r["config"].get(k) != runs[0]["config"].get(k) for r in runs[1:])]
    environment = [(name, [r[name] for r in runs]) for name in ("torch", "hardware")]
    return {"base": runs[0]["run_id"], "runs": [r["run_id"] for r in runs], "rows": rows, "summary": summary,
            "config_differences": differ,
            "environment_differences": [(name, values) for name, values in environment if len(set(values)) > 1],
            "val_sets": [r["val_set"] for r in runs]}


def format_comparison(cmp: dict) -> str:
    """The comparison as an aligned table (step, each run's loss, each difference), the settings that differ (config
    keys, then torch and hardware with each run's value), a note where the runs validated on different text, and one
    summary line per run."""
    if not cmp["rows"]:
        return f"compare: the runs {', '.join(cmp['runs'])} share no validation step"
    names = cmp["runs"]
    header = ["step", *names, *(f"{n} - {names[0]}" for n in names[1:])]
    body = [[str(s), *(f"{v:.4f}" for v in vals), *(f"{v - vals[0]:+.4f}" for v in vals[1:])]
            for s, vals in cmp["rows"]]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *body]]
    env = cmp["environment_differences"]
    lines.append("settings that differ: " + (", ".join([*cmp["config_differences"], *(n for n, _ in env)]) or "none"))
    lines += [f"  {name}: " + ", ".join(f"{run} {value or '?'}" for run, value in zip(names, values))
              for name, values in env]
    if len(set(cmp["val_sets"])) > 1:
        lines.append("note: the runs validated on different text, so their losses do not compare: " + "; ".join(
            f"{run} on {val_set_label(v)}" for run, v in zip(names, cmp["val_sets"])))
    for item in cmp["summary"]:
        lines.append(f"{item['run']} - {cmp['base']} over {item['steps']} shared steps after step 0: mean "
                     f"{item['mean_diff']:+.4f}, mean |diff| {item['mean_abs_diff']:.4f}, max |diff| "
                     f"{item['max_abs_diff']:.4f}, at the last shared step {item['final_diff']:+.4f}")
    return "\n".join(lines)


def _after_step0(curve: list) -> list:
    return [point for point in curve if point[0] > 0]


def make_figure(runs: list[dict]):
    """A matplotlib Figure (Agg canvas, no display): one row per validation set (val_set), so that losses on
    different text never share axes, each row loss vs training time and vs tokens seen. A run keeps its colour
    throughout: its val loss a line with dots, its train loss a thin faint line. Both start after step 0 (its ~10.8,
    before any training, would flatten every curve) on a log scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = {r["path"]: f"C{i % 10}" for i, r in enumerate(runs)}
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if _after_step0(run["val_curve"]) or _after_step0(run["train_curve"]):
            groups.setdefault(run["val_set"], []).append(run)
    fig = Figure(figsize=(12, 4.5 * max(1, len(groups))), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(groups)), 2, squeeze=False)
    for (ax_time, ax_tokens), (val_set, members) in zip(axes, groups.items()):
        _draw_panel(ax_time, members, colours, lambda run, step, time_s: time_s)
        _draw_panel(ax_tokens, members, colours, lambda run, step, time_s: step * run["global_batch_tokens"])
        ax_time.set_title(f"vs training time; validated on {val_set_label(val_set)}", fontsize="medium")
        ax_tokens.set_title(f"vs tokens seen; validated on {val_set_label(val_set)}", fontsize="medium")
    for ax_time, ax_tokens in axes:
        ax_time.set_xlabel("training time (s)")
        ax_tokens.set_xlabel("tokens seen (step x global batch tokens)")
        for ax in (ax_time, ax_tokens):
            ax.set_ylabel("loss (log scale, from the first step after 0)")
            ax.grid(True, which="both", alpha=0.3)
    if not groups:
        axes[0][0].set_title("no val or train loss after step 0")
    elif len(groups) > 1:
        fig.suptitle("one row per validation set: losses on different text do not compare across rows")
    return fig


def _draw_panel(ax, runs: list[dict], colours: dict, x_of) -> None:
    """The runs' val and train curves on one axis, x_of(run, step, train_time_s) giving each point's x, the targets
    that apply to them, and a legend: one entry per run, then what the two line styles mean."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogFormatter, LogLocator

    styles = {"val": dict(marker=".", linewidth=1.5), "train": dict(linewidth=0.8, alpha=0.45)}
    handles = []
    for run in runs:
        label = f"{run['run_id']} ({run['dataset']}{'' if run['finished'] else ', unfinished'})"
        colour = colours[run["path"]]
        for kind in styles:
            points = _after_step0(run[f"{kind}_curve"])
            if points:
                ax.plot([x_of(run, s, t) for s, _, t in points], [v for _, v, _ in points], color=colour,
                        label=f"{label} {kind} loss", **styles[kind])
        handles.append(Line2D([], [], color=colour, marker=".", label=label))
    for target in sorted({r["target_val_loss"] for r in runs if r["target_comparable"]}):  # not on other text
        handles.append(ax.axhline(target, linestyle="--", color="gray", linewidth=1, label=f"target {target:g}"))
    handles += [Line2D([], [], color="gray", label=f"{kind} loss", **style) for kind, style in styles.items()]
    ax.set_yscale("log")
    # losses span well under a decade: ticks at 2, 2.5, 3, 3.5, ... written as plain numbers, not 3x10^0
    ax.yaxis.set_minor_locator(LogLocator(subs=(1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 9)))
    ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 1)))
    ax.legend(handles=handles, fontsize="small")


def write_png(runs: list[dict], path) -> Path:
    """Draw the figure and write it to path atomically (a temp file in the same directory, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = make_figure(runs)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def record_for(run: dict) -> dict | None:
    """The public record of the run's track (record_curves.json), chosen by its target (3.28: track 1, 2.92:
    track 2); None for other targets."""
    tracks = json.loads(RECORD_CURVES.read_text(encoding="utf-8"))["tracks"]
    return next((t for t in tracks.values() if math.isclose(t["target_val_loss"], run["target_val_loss"])), None)


def against_record(run: dict, record: dict) -> dict:
    """The run's val loss beside the record's at every step both validated at, and what makes the steps differ in
    meaning (notes: another validation set, number of steps or batch)."""
    theirs = {step: loss for step, loss, _ in record["curve"]}
    rows = [(step, loss, theirs[step], loss - theirs[step]) for step, loss, _ in run["val_curve"] if step in theirs]
    notes = []
    if not run["target_comparable"]:
        notes.append(f"this run validated on {run['config'].get('val_tokens')} tokens of "
                     f"{run['config'].get('val_files')}, the record on the first {record['val_tokens']:,} of "
                     "FineWeb's validation shard: the losses are not comparable")
    if run["num_iterations"] != record["num_iterations"]:
        notes.append(f"{run['num_iterations']} steps against the record's {record['num_iterations']}: its "
                     "schedules (learning rate, windows) are at other points at the same step")
    if run["global_batch_tokens"] != record["global_batch_tokens"]:
        notes.append(f"a global batch of {run['global_batch_tokens']:,} tokens against the record's "
                     f"{record['global_batch_tokens']:,}")
    return {"record": record, "rows": rows, "notes": notes}


def format_against_record(run: dict, cmp: dict) -> str:
    """An aligned table (step, run, record, run - record) under a line naming the record, then the notes."""
    record = cmp["record"]
    lines = [f"{run['run_id']} against {record['record']} ({record['hardware']}; {record['source']})"]
    if not cmp["rows"]:
        lines.append("no validation step in common with the record")
    else:
        header = ["step", "this run", "record", "run - record"]
        body = [[str(s), f"{v:.4f}", f"{r:.4f}", f"{d:+.4f}"] for s, v, r, d in cmp["rows"]]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(4)]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [header, *body]]
    lines += [f"note: {n}" for n in cmp["notes"]]
    return "\n".join(lines)


def mfu(run: dict, flops_per_token: float | None) -> float | None:
    """Model FLOPs utilisation where the GPU's peak is known (devices.PEAK_TFLOPS), else None."""
    peak = next((v for k, v in PEAK_TFLOPS.items() if run["gpu_name"] and k in run["gpu_name"]), None)
    if not peak or not flops_per_token or math.isnan(run["tokens_per_s"]):
        return None
    return run["tokens_per_s"] * flops_per_token / (peak * 1e12 * run["processes"])


def record_figure(run: dict, record: dict):
    """The run's and the record's val loss against the step, on a log scale, from the first validation after step 0
    (step 0's ~10.8 would flatten both curves)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, curve in ((run["run_id"], run["val_curve"]), (record["record"], record["curve"])):
        points = [(s, v) for s, v, *_ in curve if s > 0]
        ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=label)
    ax.axhline(record["target_val_loss"], linestyle="--", color="gray", linewidth=1,
               label=f"target {record['target_val_loss']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("val loss (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def save_figure(fig, path: Path) -> None:
    def write(f):
        fig.savefig(f, format="png", dpi=100)
    atomic_write(path, write)


def run_markdown(run: dict, cmp: dict | None, flops_per_token: float | None, png_name: str | None) -> str:
    """logs/<run_id>.md: hardware, settings, time, throughput, the final loss against the target and, against the
    record, the run's loss minus the record's at every shared step."""
    c = run["config"]
    util = mfu(run, flops_per_token)
    target = ("no target" if run["target_val_loss"] <= 0 else
              f"target {run['target_val_loss']:g}: " + {True: "reached", False: "not reached",
                                                        None: "not comparable (other validation data)"}[
                  run["reached_target"]])
    lines = [f"# Run {run['run_id']}", "",
             f"- hardware: {run['hardware']} ({run['processes']} process(es))",
             f"- settings: preset {run['preset']}, {run['num_iterations']} steps of {run['global_batch_tokens']:,} "
             f"tokens ({run['seqs_per_step']} x {run['train_seq_len']:,}), {c.get('num_layers')} blocks of "
             f"{c.get('model_dim')}, compile {'on' if c.get('compile') else 'off'}, FP8 "
             f"{'allowed' if c.get('fp8') else 'off'}, data {c.get('data_dir')}",
             f"- training time: {run['train_time_s']:.1f} s ({run['steps']} steps"
             f"{'' if run['finished'] else ', unfinished'}), {run['tokens_per_s']:,.0f} tokens/s"
             + (f", MFU {util:.1%} (6 x matmul parameters FLOPs per token)" if util is not None else ""),
             f"- final val loss: {run['final_val_loss']:.4f} at step {run['val_step']}; {target}"]
    if cmp is not None:
        lines += ["", f"## Against {cmp['record']['record']}", "",
                  f"Source: {cmp['record']['source']} ({cmp['record']['hardware']}).", ""]
        if cmp["rows"]:
            lines += ["| step | this run | record | run - record |", "|---:|---:|---:|---:|"]
            lines += [f"| {s} | {v:.4f} | {r:.4f} | {d:+.4f} |" for s, v, r, d in cmp["rows"]]
        else:
            lines.append("No validation step in common with the record.")
        lines += [""] + [f"Note: {n}." for n in cmp["notes"]]
        if png_name:
            lines += ["", f"![val loss of this run and of the record]({png_name})"]
    return "\n".join(lines).rstrip() + "\n"


def write_run_report(log_path, flops_per_token: float | None = None) -> Path:
    """Write <log>.md (and, when matplotlib is there and the run has a record to set beside it, <log>.png) next to a
    run log, atomically; returns the .md's path."""
    log_path = Path(log_path)
    run = parse_log(log_path)
    flops_per_token = flops_per_token or run["config"].get("matmul_flops_per_token")  # the trainer logs it
    record = record_for(run)
    cmp = against_record(run, record) if record else None
    png = None
    if cmp is not None and run["val_curve"]:
        try:
            save_figure(record_figure(run, record), log_path.with_suffix(".png"))
            png = log_path.with_suffix(".png").name
        except ImportError:  # matplotlib is in requirements.txt; a bare environment still gets the table
            pass
    md = log_path.with_suffix(".md")
    text = run_markdown(run, cmp, flops_per_token, png)
    atomic_write(md, lambda f: f.write(text.encode("utf-8")))
    return md


def run_report(log: str) -> int:
    """--run-report: the report of one run that validated on its track's validation set (a loss on other text says
    nothing against the record); a report that cannot be written is a warning (exit 1), never the run's failure."""
    try:
        run = parse_log(log)
        if not run["target_comparable"]:
            print(f"no run report: {run['run_id']} validated on {val_set_label(run['val_set'])}, not on its track's "
                  "validation set")
            return 0
        print(f"run report: {write_run_report(log)}")
    except (OSError, ValueError) as e:
        print(f"report: warning: no run report for {log} ({e})", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Summarise train_gpt.py run logs: a table, optionally a figure.",
                                     allow_abbrev=False)
    parser.add_argument("logs", nargs="*", help="run logs (default: logs/*.txt)")
    parser.add_argument("--png", metavar="FILE", help="also write val-loss curves to this PNG")
    parser.add_argument("--compare", action="store_true",
                        help="also print the val losses at the steps all runs share, and each run minus the first")
    parser.add_argument("--run-report", metavar="LOG",
                        help="write LOG's report beside it (LOG.md, and LOG.png against the record) when the run "
                             "validated on its track's validation set, and say so; otherwise say why not")
    parser.add_argument("--record", action="store_true",
                        help="also print each run's val losses beside its track's public record's "
                             "(records/record_curves.json), step by step")
    args = parser.parse_args(argv)
    if args.run_report:
        return run_report(args.run_report)
    paths = args.logs or sorted(glob.glob(os.path.join("logs", "*.txt")))
    if not paths:
        print("report: no log files given and none in logs/*.txt", file=sys.stderr)
        return 2
    runs = []
    for p in paths:
        try:
            runs.append(parse_log(p))
        except NotARunLog as e:
            print(f"report: skipping {e}", file=sys.stderr)
    if not runs:
        print("report: none of the given files is a run log", file=sys.stderr)
        return 2
    print(format_table(runs))
    if args.compare:
        if len(runs) < 2:
            print("report: --compare needs at least two run logs", file=sys.stderr)
            return 2
        print()
        print(format_comparison(compare_runs(runs)))
    if args.record:
        for run in runs:
            record = record_for(run)
            print()
            print(format_against_record(run, against_record(run, record)) if record else
                  f"{run['run_id']}: no public record for target {run['target_val_loss']:g} (3.28: track 1, 2.92: "
                  "track 2)")
    if args.png:
        out = write_png(runs, args.png)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
