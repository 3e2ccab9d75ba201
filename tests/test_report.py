"""records/report.py: parsing run logs written by train_gpt.train(), the table, the skips and the PNG."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

import train_gpt as tg
from conftest import ROOT, parse_log, tiny_hp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_report():
    spec = importlib.util.spec_from_file_location("records_report", ROOT / "records" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_report()


@pytest.fixture(scope="module")
def runs(shared_synthetic_data, tmp_path_factory):
    """Two real tiny runs: 'hit' (target 20, reached) and 'miss' (target 0.5, not reached; other batch/schedule)."""
    work = tmp_path_factory.mktemp("report_runs")
    hit = tg.train(tiny_hp(shared_synthetic_data, work, run_name="hit", num_iterations=6, val_loss_every=3,
                           train_loss_every=2, target_val_loss=20.0, save_final=False))
    miss = tg.train(tiny_hp(shared_synthetic_data, work, run_name="miss", num_iterations=4, seqs_per_step=4,
                            val_loss_every=2, target_val_loss=0.5, save_final=False))
    logs = work / "logs"
    return {"hit": (logs / "hit.txt", hit), "miss": (logs / "miss.txt", miss), "dir": logs}


def _unfinished_log(path: Path) -> Path:
    hp = tiny_hp("data", "work", num_iterations=10, seqs_per_step=2, train_seq_len=256, target_val_loss=3.5)
    rule = "=" * 100
    path.write_text("\n".join([
        "# the trainer's source would be here", "config = {}", rule,
        "config " + json.dumps(asdict(hp), indent=1), rule,
        "python 3.12.0", "cpu threads 2", rule,
        "run unfinished: 1 process(es) on cpu, 1 micro-step(s) of 256 tokens each, global batch 512 tokens",
        "step:0/10 val_loss:10.8000 train_time:0ms step_avg:0.01ms",
        "step:1/10 train_time:1000ms step_avg:1000.00ms",
        "step:2/10 train_time:2000ms step_avg:1000.00ms",
        "step:3/10 train_time:3000ms step_avg:1000.00ms",
        "step:4/10 train_time:4000ms step_avg:1000.00ms",
        "step:4/10 val_loss:6.2500 train_time:4000ms step_avg:1000.00ms",
        "step:5/10 train_loss:6.1000 train_time:5000ms step_avg:1000.00ms",
    ]) + "\n", encoding="utf-8")
    return path


def _resumed_log(path: Path) -> Path:
    """A GPU run interrupted at step 4, resumed from its checkpoint with a different target, then finished."""
    hp = tiny_hp("data", "work", num_iterations=8, seqs_per_step=8, train_seq_len=1024, target_val_loss=9.0)
    hp2 = tiny_hp("data", "work", num_iterations=8, seqs_per_step=8, train_seq_len=1024, target_val_loss=3.28,
                  val_files="fineweb_val_*.bin", val_tokens=10_485_760)
    rule = "=" * 100
    env = ["gpus 8: " + ", ".join(["NVIDIA H100 80GB HBM3"] * 8), rule,
           "run resumed: 8 process(es) on cuda, 1 micro-step(s) of 1024 tokens each"]
    path.write_text("\n".join(
        ["source", rule, "config " + json.dumps(asdict(hp), indent=1), rule, *env,
         "step:0/8 val_loss:10.0000 train_time:0ms step_avg:0.01ms",
         "step:4/8 val_loss:5.0000 train_time:400ms step_avg:100.00ms",
         rule, "resumed from checkpoints/resumed/step_000004.pt at step 4",
         rule, "config " + json.dumps(asdict(hp2), indent=1), rule, *env,
         "step:4/8 val_loss:4.9000 train_time:400ms step_avg:100.00ms",
         "step:8/8 val_loss:3.2700 train_time:800ms step_avg:100.00ms",
         rule, "final val_loss:3.2700 train_time:0.8s (8 steps, 65,536 tokens, 81,920 tokens/s) peak memory: "
         "1.00 GiB allocated, 1.00 GiB reserved; target 3.28: reached"]) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow  # trains three small runs
def test_parsed_values_match_train_summaries(runs):
    for name in ("hit", "miss"):
        path, summary = runs[name]
        run = report.parse_log(path)
        assert run["run_id"] == name and run["finished"] and run["resumed"] == 0
        assert run["preset"] == "tiny" and run["device"] == "cpu" and run["processes"] == 1
        assert run["steps"] == summary["steps"] == run["num_iterations"]
        assert run["final_val_loss"] == round(summary["final_val_loss"], 4)
        assert abs(run["train_time_s"] - summary["train_time_s"]) <= 0.0005 + 1e-9  # ms resolution of the log
        assert run["tokens_per_s"] == pytest.approx(summary["tokens_per_s"], rel=0.001 / summary["train_time_s"])
        assert run["reached_target"] is summary["reached_target"]
        train, val = parse_log(path)  # conftest's reading of the same file
        assert [(s, v) for s, v, _ in run["val_curve"]] == sorted(val.items())
        assert [(s, v) for s, v, _ in run["train_curve"]] == sorted(train.items())
    assert [s for s, _, _ in report.parse_log(runs["hit"][0])["train_curve"]] == [2, 4, 6]  # train_loss_every=2
    assert report.parse_log(runs["hit"][0])["reached_target"] is True
    assert report.parse_log(runs["miss"][0])["reached_target"] is False
    assert report.parse_log(runs["miss"][0])["global_batch_tokens"] == 4 * 256


def test_table_rows_and_alignment(runs, tmp_path, capsys):
    paths = [runs["hit"][0], runs["miss"][0], _unfinished_log(tmp_path / "unfinished.txt")]
    assert report.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[0].startswith("run ")
    rows = {line.split()[0]: line for line in out[1:]}
    hit_summary, miss_summary = runs["hit"][1], runs["miss"][1]
    hit = report.table_row(report.parse_log(runs["hit"][0]))
    assert hit["steps"] == "6/6" and hit["val loss"] == f"{hit_summary['final_val_loss']:.4f}"
    assert hit["target"] == "yes (20)" and hit["status"] == "finished" and hit["preset"] == "tiny"
    assert hit["hardware"].startswith("1x cpu")
    assert hit["data"] == Path(report.parse_log(runs["hit"][0])["config"]["data_dir"]).name  # the synthetic corpus
    assert float(hit["tokens/s"].replace(",", "")) == pytest.approx(hit_summary["tokens_per_s"], rel=0.01, abs=1)
    miss = report.table_row(report.parse_log(runs["miss"][0]))
    assert miss["steps"] == "4/4" and miss["target"] == "no (0.5)"
    assert miss["val loss"] == f"{miss_summary['final_val_loss']:.4f}"
    for name, row in (("hit", hit), ("miss", miss)):
        for cell in row.values():
            assert cell in rows[name]
    # aligned: every column starts (left-aligned) or ends (right-aligned) at the same offset on every line
    header = out[0]
    for col in ("preset", "data", "hardware", "target", "status"):
        start = header.index(col)
        assert all(line[start - 2:start] == "  " and line[start] != " " for line in out)
    for col in ("steps", "val loss", "time (s)", "tokens/s"):
        end = header.index(col) + len(col)
        assert all(line[end - 1] != " " and line[end:end + 2] == "  " for line in out)


def test_unfinished_run_uses_last_val_line(tmp_path, capsys):
    run = report.parse_log(_unfinished_log(tmp_path / "unfinished.txt"))
    assert not run["finished"] and run["steps"] == 5 and run["num_iterations"] == 10
    assert run["final_val_loss"] == 6.25 and run["val_step"] == 4
    assert run["train_time_s"] == 5.0 and run["tokens_per_s"] == pytest.approx(5 * 2 * 256 / 5.0)
    assert run["reached_target"] is False and run["cpu_threads"] == 2
    assert run["train_curve"] == [(5, 6.1, 5.0)] and [s for s, _, _ in run["val_curve"]] == [0, 4]
    row = report.table_row(run)
    assert row["status"] == "unfinished" and row["steps"] == "5/10" and row["val loss"] == "6.2500"
    assert report.main([str(tmp_path / "unfinished.txt")]) == 0
    assert "unfinished" in capsys.readouterr().out


def test_record_target_is_only_compared_on_fineweb_validation(tmp_path):
    path = _resumed_log(tmp_path / "resumed.txt")
    text = path.read_text(encoding="utf-8").replace('"fineweb_val_*.bin"', '"code_val_*.bin"')
    other = tmp_path / "other.txt"
    other.write_text(text, encoding="utf-8")
    run = report.parse_log(other)
    assert run["target_val_loss"] == 3.28 and run["final_val_loss"] == 3.27 and run["reached_target"] is None
    assert report.table_row(run)["target"] == "n/a (3.28 is for FineWeb val)" and not run["target_comparable"]
    fig = report.make_figure([run])
    assert not [line for ax in fig.axes for line in ax.get_lines() if line.get_label().startswith("target")]
    assert report.parse_log(path)["reached_target"] is True  # the same run on the track's validation set


def test_resumed_run_uses_last_config_and_continued_steps(tmp_path):
    run = report.parse_log(_resumed_log(tmp_path / "resumed.txt"))
    assert run["finished"] and run["resumed"] == 1 and run["steps"] == 8
    assert run["target_val_loss"] == 3.28 and run["reached_target"] is True
    assert run["final_val_loss"] == 3.27 and run["train_time_s"] == 0.8
    assert [(s, v) for s, v, _ in run["val_curve"]] == [(0, 10.0), (4, 4.9), (8, 3.27)]
    assert run["tokens_per_s"] == pytest.approx(8 * 8 * 1024 / 0.8)
    assert run["hardware"] == "8x H100 80GB HBM3" and run["gpus"] == 8
    assert report.table_row(run)["status"] == "finished, resumed x1"


def test_non_logs_are_skipped_with_a_warning(runs, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("config {\n not json\n}\nstep:1/2 train_time:5ms step_avg:5.00ms\n", encoding="utf-8")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(report.NotARunLog):
        report.parse_log(notes)
    assert report.main([str(notes), str(runs["hit"][0]), str(binary)]) == 0
    captured = capsys.readouterr()
    assert str(notes) in captured.err and str(binary) in captured.err
    assert len(captured.out.splitlines()) == 2 and "hit" in captured.out


def test_exit_2_when_nothing_is_a_log(tmp_path, capsys, monkeypatch):
    notes = tmp_path / "notes.txt"
    notes.write_text("just notes\n", encoding="utf-8")
    assert report.main([str(notes)]) == 2
    assert str(notes) in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing.txt")]) == 2
    monkeypatch.chdir(tmp_path)  # default logs/*.txt: none there
    assert report.main([]) == 2
    assert capsys.readouterr().out == ""


def test_default_logs_glob(runs, tmp_path, capsys, monkeypatch):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "hit.txt").write_bytes(runs["hit"][0].read_bytes())
    monkeypatch.chdir(tmp_path)
    assert report.main([]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("hit ")


def test_png_starts_after_step_0_on_a_log_scale_with_train_loss(runs, tmp_path, capsys):
    """hit and miss validated on the same text: one row of two panels; hit logged train losses too."""
    parsed = [report.parse_log(runs[n][0]) for n in ("hit", "miss")]
    hit, miss = parsed
    fig = report.make_figure(parsed)
    assert len(fig.axes) == 2
    time_ax, tokens_ax = fig.axes
    for ax in fig.axes:
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert sorted(ln.get_ydata()[0] for ln in dashed) == [0.5, 20.0]
        hit_label, miss_label = (f"{r['run_id']} ({r['dataset']})" for r in parsed)
        assert set(lines) - {ln.get_label() for ln in dashed} == {f"{hit_label} val loss", f"{hit_label} train loss",
                                                                  f"{miss_label} val loss"}
        val, train = lines[f"{hit_label} val loss"], lines[f"{hit_label} train loss"]
        assert train.get_color() == val.get_color() != lines[f"{miss_label} val loss"].get_color()
        assert train.get_linewidth() < val.get_linewidth() and train.get_marker() in ("None", "", None)
        assert ax.get_yscale() == "log" and "log scale" in ax.get_ylabel() and "after 0" in ax.get_ylabel()
        assert list(val.get_ydata()) == [v for s, v, _ in hit["val_curve"] if s > 0]  # step 0 is left out
        assert hit["val_curve"][0][0] == 0 and list(train.get_ydata()) == [v for _, v, _ in hit["train_curve"]]
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels[:2] == [hit_label, miss_label] and "val loss" in labels and "train loss" in labels
        curves = {ln.get_label(): list(ln.get_xdata()) for ln in ax.get_lines()}
        if ax is tokens_ax:
            assert curves[f"{hit_label} val loss"] == [s * hit["global_batch_tokens"] for s in (3, 6)]
            assert curves[f"{hit_label} train loss"] == [s * hit["global_batch_tokens"] for s in (2, 4, 6)]
            assert curves[f"{miss_label} val loss"] == [s * miss["global_batch_tokens"] for s in (2, 4)]
        else:
            assert curves[f"{hit_label} val loss"] == [t for s, _, t in hit["val_curve"] if s > 0]
            assert curves[f"{hit_label} train loss"] == [t for _, _, t in hit["train_curve"]]
    assert "tokens" in tokens_ax.get_xlabel() and "time" in time_ax.get_xlabel()

    out = tmp_path / "plots" / "curves.png"
    assert report.main([str(runs["hit"][0]), str(runs["miss"][0]), "--png", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left behind
    assert not math.isnan(hit["tokens_per_s"])


def _curve_log(path: Path, val: dict[int, float], train: dict[int, float] | None = None,
               env: tuple[str, ...] = ("cpu threads 2",), **overrides) -> Path:
    """An unfinished run log (no summary) with the given val (and train) losses (steps of one second each) and
    environment lines (a "gpus" line makes it a cuda run)."""
    hp = tiny_hp(overrides.pop("data_dir", "data"), "work", num_iterations=max(val), **overrides)
    rule = "=" * 100
    device = "cuda" if any(line.startswith("gpus ") for line in env) else "cpu"
    lines = ["# source", rule, "config " + json.dumps(asdict(hp), indent=1), rule, *env, rule,
             f"run {path.stem}: 1 process(es) on {device}, 1 micro-step(s) of 256 tokens each, global batch 512 tokens"]
    losses = [(s, "val_loss", v) for s, v in val.items()] + [(s, "train_loss", v) for s, v in (train or {}).items()]
    lines += [f"step:{s}/{max(val)} {kind}:{v:.4f} train_time:{1000 * s}ms step_avg:1000.00ms"
              for s, kind, v in sorted(losses, key=lambda x: (x[0], x[1] == "val_loss"))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("data_dir, val_files, name", [
    ("data/builtin", "builtin_val_*.bin", "builtin"), ("data/fineweb10B", "fineweb_val_*.bin", "fineweb10B"),
    ("/data/corpora/code/", "code_val_*.bin", "code"), ("data/builtin", "/mnt/prepared/poems/poems_val_*.bin", "poems"),
])
def test_dataset_is_the_validation_files_directory(tmp_path, data_dir, val_files, name):
    assert report.dataset_name({"data_dir": data_dir, "val_files": val_files}) == name
    run = report.parse_log(_curve_log(tmp_path / "r.txt", {0: 10.8, 2: 7.0}, data_dir=data_dir, val_files=val_files))
    assert run["dataset"] == name and report.table_row(run)["data"] == name
    assert run["val_set"] == (name, Path(val_files).name, run["config"]["val_tokens"])


def test_runs_on_different_validation_text_get_rows_of_their_own(tmp_path, capsys):
    builtin = dict(data_dir="data/builtin", val_files="builtin_val_*.bin")
    a = _curve_log(tmp_path / "a.txt", {0: 10.8, 2: 7.0, 4: 6.0}, **builtin)
    b = _curve_log(tmp_path / "b.txt", {0: 10.8, 2: 3.0, 4: 2.0}, data_dir="data/code", val_files="code_val_*.bin")
    c = _curve_log(tmp_path / "c.txt", {0: 10.8, 2: 7.1, 4: 6.1}, **builtin)
    d = _curve_log(tmp_path / "d.txt", {0: 10.8, 2: 7.2, 4: 6.2}, val_tokens=8192, **builtin)  # other text: more of it
    runs = [report.parse_log(p) for p in (a, b, c, d)]
    fig = report.make_figure(runs)
    assert len(fig.axes) == 6  # rows: builtin 4,096 tokens (a, c), code (b), builtin 8,192 tokens (d)
    rows = [fig.axes[i:i + 2] for i in range(0, 6, 2)]
    expected = [(["a (builtin, unfinished)", "c (builtin, unfinished)"],
                 "builtin: first 4,096 tokens of builtin_val_*.bin"),
                (["b (code, unfinished)"], "code: first 4,096 tokens of code_val_*.bin"),
                (["d (builtin, unfinished)"], "builtin: first 8,192 tokens of builtin_val_*.bin")]
    for row, (labels, title) in zip(rows, expected):
        for ax in row:
            assert [ln.get_label() for ln in ax.get_lines()] == [f"{label} val loss" for label in labels]
            assert title in ax.get_title()
            assert [t.get_text() for t in ax.get_legend().get_texts()][:len(labels)] == labels
    assert "do not compare across rows" in fig.get_suptitle()
    colours = [[ln.get_color() for ln in ax.get_lines()] for ax in fig.axes]
    assert colours[::2] == colours[1::2] and len({c for cs in colours for c in cs}) == 4  # one colour per run
    assert report.main([str(a), str(b), str(c)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "preset", "data"]
    assert [line.split()[2] for line in table[1:]] == ["builtin", "code", "builtin"]


def test_compare_runs_step_by_step(tmp_path, capsys):
    a = _curve_log(tmp_path / "fp8.txt", {0: 10.8, 4: 6.25, 8: 5.0})
    b = _curve_log(tmp_path / "bf16.txt", {0: 10.8, 4: 6.30, 6: 5.5, 8: 4.9}, fp8=False)
    cmp = report.compare_runs([report.parse_log(a), report.parse_log(b)])
    assert [s for s, _ in cmp["rows"]] == [0, 4, 8]  # step 6 is not shared
    assert cmp["config_differences"] == ["fp8"] and cmp["environment_differences"] == []
    (summary,) = cmp["summary"]
    assert summary["run"] == "bf16" and summary["steps"] == 2  # step 0 left out
    assert summary["mean_diff"] == pytest.approx(-0.025) and summary["mean_abs_diff"] == pytest.approx(0.075)
    assert summary["max_abs_diff"] == pytest.approx(0.10) and summary["final_diff"] == pytest.approx(-0.10)
    assert report.main([str(a), str(b), "--compare"]) == 0
    out = capsys.readouterr().out.splitlines()
    i = next(i for i, line in enumerate(out) if line.split()[:1] == ["step"])
    assert out[i].split() == ["step", "fp8", "bf16", "bf16", "-", "fp8"]
    assert out[i + 2].split() == ["4", "6.2500", "6.3000", "+0.0500"]
    assert "settings that differ: fp8" in out and out[-1].startswith("bf16 - fp8 over 2 shared steps")
    assert not [line for line in out if line.startswith(("note:", "  torch", "  hardware"))]


def test_compare_lists_torch_and_hardware_and_flags_other_text(tmp_path, capsys):
    gpu = _curve_log(tmp_path / "gpu.txt", {0: 10.8, 4: 6.25}, env=(
        "python 3.12.3 (CPython)", "torch 2.11.0+cu130, CUDA 13.0, cuDNN 91900", "gpus 1: NVIDIA H100 80GB HBM3"))
    cpu = _curve_log(tmp_path / "cpu.txt", {0: 10.8, 4: 6.30}, env=(
        "torch 2.13.0+cpu, CUDA None, cuDNN None", "cpu threads 2"), data_dir="data/code", val_files="code_val_*.bin")
    runs = [report.parse_log(p) for p in (gpu, cpu)]
    assert [r["torch"] for r in runs] == ["2.11.0+cu130", "2.13.0+cpu"]
    assert [r["hardware"] for r in runs] == ["1x H100 80GB HBM3", "1x cpu (2 threads)"]
    cmp = report.compare_runs(runs)
    assert cmp["config_differences"] == ["data_dir", "val_files"]
    assert cmp["environment_differences"] == [("torch", ["2.11.0+cu130", "2.13.0+cpu"]),
                                              ("hardware", ["1x H100 80GB HBM3", "1x cpu (2 threads)"])]
    assert report.main([str(gpu), str(cpu), "--compare"]) == 0
    out = capsys.readouterr().out.splitlines()
    i = out.index("settings that differ: data_dir, val_files, torch, hardware")
    assert out[i + 1:i + 3] == ["  torch: gpu 2.11.0+cu130, cpu 2.13.0+cpu",
                                "  hardware: gpu 1x H100 80GB HBM3, cpu 1x cpu (2 threads)"]
    assert out[i + 3] == ("note: the runs validated on different text, so their losses do not compare: gpu on data: "
                          "first 4,096 tokens of syn_val_*.bin; cpu on code: first 4,096 tokens of code_val_*.bin")
    unknown = _curve_log(tmp_path / "old.txt", {0: 10.8, 4: 6.2}, env=("cpu threads 2",))  # a log without a torch line
    cmp = report.compare_runs([report.parse_log(unknown), runs[1]])
    assert cmp["environment_differences"] == [("torch", [None, "2.13.0+cpu"])]
    assert "  torch: old ?, cpu 2.13.0+cpu" in report.format_comparison(cmp).splitlines()


def test_compare_needs_two_runs(tmp_path, capsys):
    a = _curve_log(tmp_path / "one.txt", {0: 10.8, 4: 6.25})
    assert report.main([str(a), "--compare"]) == 2
    assert "--compare needs at least two run logs" in capsys.readouterr().err
    c = _curve_log(tmp_path / "other.txt", {1: 9.0, 3: 7.0})
    assert "share no validation step" in report.format_comparison(
        report.compare_runs([report.parse_log(a), report.parse_log(c)]))
