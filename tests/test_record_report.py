"""A run against its track's public record: records/record_curves.json, report.py --record and logs/<run>.md."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from runlib import runlog
import train_gpt as tg
from records import report

RULE = "=" * 100
CURVES = json.loads(report.RECORD_CURVES.read_text(encoding="utf-8"))
TRACK1 = CURVES["tracks"]["1"]


def test_the_record_curves_are_the_records_logs():
    """Record 28's log validates every 125 steps and at its last, 1,695, where it reads 3.2772 after 168,938 ms;
    Record8's ends at step 5,960 with 2.919750."""
    steps = [s for s, _, _ in TRACK1["curve"]]
    assert steps == [*range(0, 1695, 125), 1695]
    assert TRACK1["curve"][-1] == [1695, 3.2772, 168938] and TRACK1["curve"][0][:2] == [0, 10.8258]
    assert all(a[1] > b[1] for a, b in zip(TRACK1["curve"], TRACK1["curve"][1:]))  # it only falls
    track2 = CURVES["tracks"]["2"]
    assert track2["curve"][-1][:2] == [5960, 2.91975] and track2["num_iterations"] == 5960
    assert TRACK1["global_batch_tokens"] == tg.Hyperparameters().global_batch_tokens
    assert TRACK1["num_iterations"] == tg.Hyperparameters().num_iterations
    assert TRACK1["target_val_loss"] == runlog.TRACK1_TARGET and track2["target_val_loss"] == runlog.TRACK2_TARGET
    for track in CURVES["tracks"].values():
        assert track["source"].startswith("https://github.com/KellerJordan/modded-nanogpt/blob/")


def speedrun_log(path: Path, offset: float, hp: tg.Hyperparameters | None = None, every: int = 125) -> Path:
    """A finished 8 x H100 log of the speedrun preset whose val losses are the record's plus offset."""
    hp = hp or tg.preset_hyperparameters("speedrun")
    record = {s: v for s, v, _ in TRACK1["curve"]}
    lines = ["source", RULE, "config " + json.dumps(asdict(hp), indent=1), RULE,
             "gpus 8: " + ", ".join(["NVIDIA H100 80GB HBM3"] * 8), RULE,
             "run r: 8 process(es) on cuda, 1 micro-step(s) of 49152 tokens each"]
    steps = sorted({*range(0, hp.num_iterations, every), hp.num_iterations})
    for s in steps:
        loss = record.get(s, 5.0) + offset
        lines.append(f"step:{s}/{hp.num_iterations} val_loss:{loss:.4f} train_time:{s * 100}ms step_avg:100.00ms")
    final = record.get(hp.num_iterations, 5.0) + offset
    seconds = hp.num_iterations * 0.1
    tokens = hp.num_iterations * hp.global_batch_tokens
    lines += [RULE, f"final val_loss:{final:.4f} train_time:{seconds:.1f}s ({hp.num_iterations} steps, {tokens:,} "
              f"tokens, {tokens / seconds:,.0f} tokens/s) peak memory: 1 GiB; target 3.28: reached"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_record_prints_the_run_minus_the_record_at_every_shared_step(tmp_path, capsys):
    log = speedrun_log(tmp_path / "r.txt", 0.0125)
    assert report.main([str(log), "--record"]) == 0
    out = capsys.readouterr().out
    assert "r against track 1, record 28 (SparseAttnGate), 2025-08-23" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "+0.0125" in line]
    assert [int(r[0]) for r in rows] == [s for s, _, _ in TRACK1["curve"]]
    assert rows[-1] == ["1695", "3.2897", "3.2772", "+0.0125"]
    assert "note:" not in out


def test_record_says_why_steps_do_not_line_up(tmp_path, capsys):
    hp = dataclasses.replace(tg.preset_hyperparameters("tiny"), target_val_loss=3.28, num_iterations=250)
    report.main([str(speedrun_log(tmp_path / "t.txt", 0.0, hp)), "--record"])
    out = capsys.readouterr().out
    assert "250 steps against the record's 1695" in out and "a global batch of 2,048 tokens" in out
    assert "losses are not comparable" in out  # its validation set is the built-in corpus
    other = dataclasses.replace(tg.preset_hyperparameters("tiny"), target_val_loss=0.0)
    report.main([str(speedrun_log(tmp_path / "o.txt", 0.0, other)), "--record"])
    assert "o: no public record for target 0" in capsys.readouterr().out


def test_run_report_markdown_and_figure(tmp_path):
    log = speedrun_log(tmp_path / "r.txt", -0.002)
    flops = 6 * 123_000_000
    md = report.write_run_report(log, flops)
    text = md.read_text(encoding="utf-8")
    assert md == tmp_path / "r.md" and text.startswith("# Run r\n")
    assert "- hardware: 8x H100 80GB HBM3 (8 process(es))" in text
    assert "| 1695 | 3.2752 | 3.2772 | -0.0020 |" in text and "target 3.28: reached" in text
    tokens_per_s = 1695 * 393_216 / 169.5
    assert f"MFU {tokens_per_s * flops / (800e12 * 8):.1%}" in text
    assert "![val loss of this run and of the record](r.png)" in text
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def log_of(tmp_path: Path, hp: tg.Hyperparameters) -> Path:
    """The log a run with these settings writes (as RunReport writes it): config, val lines and the summary."""
    log = tmp_path / "logs" / "run1.txt"
    rep = runlog.RunReport(log, hp.num_iterations, hp.global_batch_tokens)
    rep.start("source", {**dataclasses.asdict(hp), "matmul_flops_per_token": 1e9}, torch.device("cpu"), None, 0)
    for step in (0, hp.num_iterations):
        rep.val(step, 4.0 - step / hp.num_iterations, 1000.0 * step)
    rep.finish(3.0, hp.num_iterations, 1000.0 * hp.num_iterations, torch.device("cpu"), 1, 0, hp.target_val_loss,
               hp.val_files, hp.val_tokens)
    return log


def test_a_run_on_the_records_validation_set_gets_its_report(tmp_path, capsys):
    """The wrappers run records/report.py --run-report LOG after a run: the markdown beside the log."""
    hp = dataclasses.replace(tg.preset_hyperparameters("speedrun"), num_iterations=1695)
    log = log_of(tmp_path, hp)
    capsys.readouterr()
    assert report.main(["--run-report", str(log)]) == 0
    md = tmp_path / "logs" / "run1.md"
    assert "| 1695 | 3.0000 | 3.2772 | -0.2772 |" in md.read_text(encoding="utf-8")
    assert capsys.readouterr().out == f"run report: {md}\n"


@pytest.mark.parametrize("changes", [dict(val_tokens=1_048_576), dict(val_files="mine_val_*.bin"),
                                     dict(target_val_loss=0.0)])
def test_other_runs_get_no_report(tmp_path, changes, capsys):
    hp = dataclasses.replace(tg.preset_hyperparameters("speedrun"), num_iterations=10, **changes)
    log = log_of(tmp_path, hp)
    capsys.readouterr()
    assert report.main(["--run-report", str(log)]) == 0
    assert not (tmp_path / "logs" / "run1.md").exists()
    assert capsys.readouterr().out.startswith("no run report: ")
