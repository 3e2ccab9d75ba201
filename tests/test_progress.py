"""What a run shows on the terminal beside the record's log lines: percentage, tokens/s, MFU where known, ETA, and
the last train loss at validations. The log file keeps the record's line format."""

from __future__ import annotations

import torch

from runlib import runlog


def report(tmp_path) -> runlog.RunReport:
    """Process 0's report of a 200-step run of 2,048 tokens a step."""
    return runlog.RunReport(tmp_path / "p.txt", 200, 2048)


def test_terminal_lines_add_progress_and_the_log_keeps_the_records_format(tmp_path, capsys):
    r = report(tmp_path)
    # 50 steps of 2,048 tokens in 100 s this session: 1,024 tokens/s; 150 steps to go at 2 s each: 5 minutes
    r.step(50, 100_000.0, 3.25, {}, (50, 100_000.0))
    r.val(50, 3.5, 100_000.0)
    out = capsys.readouterr().out.splitlines()
    assert out == ["step:50/200 train_loss:3.2500 train_time:100000ms step_avg:2000.00ms (25%) 1,024 tokens/s "
                   "ETA 5m00s",
                   "step:50/200 val_loss:3.5000 train_time:100000ms step_avg:2000.00ms (last train_loss:3.2500)"]
    log = (tmp_path / "p.txt").read_text(encoding="utf-8").splitlines()
    assert log == ["step:50/200 train_loss:3.2500 train_time:100000ms step_avg:2000.00ms",
                   "step:50/200 val_loss:3.5000 train_time:100000ms step_avg:2000.00ms"]


def test_the_pace_is_this_sessions_after_a_resume(tmp_path, capsys):
    r = report(tmp_path)
    # resumed at step 100 after 1,000 s of training; 10 steps of this session took 10 s: 100 steps left at 1 s each
    r.step(110, 1_010_000.0, None, {}, (10, 10_000.0))
    assert capsys.readouterr().out.strip().endswith("(55%) 2,048 tokens/s ETA 1m30s")


def test_mfu_shows_where_the_peak_is_known(tmp_path, capsys):
    r = report(tmp_path)
    r.peak_flops, r.flops_per_token = 8 * 800e12, 1e9  # as set_throughput sets them for 8 H100s
    r.step(10, 10_000.0, None, {}, (10, 10_000.0))  # 2,048 tokens/s x 1 GFLOP / 6.4 PFLOP/s
    assert f"MFU {2048 * 1e9 / 6.4e15:.1%} ETA" in capsys.readouterr().out
    r.set_throughput(torch.device("cpu"), 1, 1e9)
    assert r.peak_flops is None  # a CPU has no known peak: no MFU


def test_durations():
    assert [runlog.duration(s) for s in (0, 42.4, 61, 3599, 3600, 11_045)] == ["0s", "42s", "1m01s", "59m59s", "1h00m",
                                                                           "3h04m"]
