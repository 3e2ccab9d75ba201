"""Checkpoints: files and contents, resolving, errors, atomic writes, and resuming (in-process and after a SIGKILL)."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from runlib import checkpoints, errors, runlog, stopping
import train_gpt as tg
from conftest import ROOT, default_sigint, parse_log, subprocess_env, tiny_flags, tiny_hp, wait_for_text
from data.shards import DiskFullError

N = 12
SAVE_EVERY = 4


@pytest.fixture(scope="module")
def run_b(shared_synthetic_data, tmp_path_factory):
    """A 12-step run saving every 4 steps, with a train-loss line every step."""
    work = tmp_path_factory.mktemp("run_b")
    hp = tiny_hp(shared_synthetic_data, work, num_iterations=N, save_every=SAVE_EVERY, train_loss_every=1,
                 val_loss_every=0, run_name="B")
    summary = tg.train(hp)
    return hp, summary, work


def ckpt_path(hp, step, run=None) -> Path:
    return Path(hp.checkpoint_dir) / (run or hp.run_name) / f"step_{step:06d}.pt"


# ----------------------------------------------------------------------------------------------------------------------
# Files and contents


@pytest.mark.slow
def test_checkpoint_files_and_latest_symlink(run_b):
    hp, summary, _ = run_b
    run_dir = Path(hp.checkpoint_dir) / "B"
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == [f"step_{s:06d}.pt" for s in range(SAVE_EVERY, N + 1, SAVE_EVERY)]  # no temp files left
    latest = Path(hp.checkpoint_dir) / "latest"
    assert latest.is_symlink()
    assert not os.path.isabs(os.readlink(latest))  # relative, so the directory can be moved
    assert latest.resolve() == ckpt_path(hp, N).resolve()
    assert {p.name for p in Path(hp.checkpoint_dir).iterdir()} == {"B", "latest", ".B.lock"}  # the run's lock
    assert summary["steps"] == N and summary["run_id"] == "B"


def schedule(hp, start_step: int = 0, due_every: int = 5) -> list[tuple[int, str]]:
    """(step, kind) of every checkpoint a run writes, the rolling clock due at every due_every-th step."""
    kinds = [(step, tg.checkpoint_kind(hp, step, start_step, step % due_every == 0))
             for step in range(start_step, hp.num_iterations + 1)]
    return [(step, kind) for step, kind in kinds if kind]


@pytest.mark.parametrize("save_final,kept", [(True, [15, 25]), (False, [15, 20])])
def test_rolling_checkpoints_replace_each_other_as_a_rule(tmp_path, save_final, kept):
    """The rule alone, on small files: a rolling checkpoint whenever the clock is due (steps 5, 10, 20; 15 is a
    --save-every one), each save removing the rolling one before it, the kept ones staying."""
    hp = dataclasses.replace(tg.Hyperparameters(), num_iterations=25, save_every=15, save_final=save_final)
    plan = schedule(hp)
    assert plan == [(5, "rolling"), (10, "rolling"), (15, "kept"), (20, "rolling")] + (
        [(25, "kept")] if save_final else [])
    rolling = None
    for step, kind in plan:
        path, rolling = checkpoints.save_checkpoint({"step": step}, tmp_path, "roll", step, kind, rolling)
        assert (tmp_path / "latest").resolve() == path.resolve()
    assert sorted(p.name for p in (tmp_path / "roll").iterdir()) == [f"step_{s:06d}.pt" for s in kept]
    assert rolling == (None if save_final else tmp_path / "roll" / "step_000020.pt")


def test_no_checkpoint_at_the_step_a_run_resumes_at():
    hp = dataclasses.replace(tg.Hyperparameters(), num_iterations=12, save_every=4)
    assert schedule(hp, start_step=4, due_every=1000) == [(8, "kept"), (12, "kept")]
    assert schedule(hp, start_step=12) == []  # a finished run resumed: it validates, and saves nothing new
    assert schedule(dataclasses.replace(hp, save_every=0, save_final=False), due_every=3) == [
        (3, "rolling"), (6, "rolling"), (9, "rolling")]  # never a rolling one at the last step


@pytest.mark.slow
def test_rolling_checkpoints_replace_each_other(shared_synthetic_data, tmp_path):
    """In a real run: with the clock always due, a rolling checkpoint at every step, each save removing the rolling
    one before it; the kept ones stay."""
    hp = tiny_hp(shared_synthetic_data, tmp_path, num_iterations=8, save_every=5, save_every_minutes=1e-9,
                 val_loss_every=0, run_name="roll")
    tg.train(hp)
    run_dir = Path(hp.checkpoint_dir) / "roll"
    assert sorted(p.name for p in run_dir.iterdir()) == [f"step_{s:06d}.pt" for s in (5, 8)]
    assert (Path(hp.checkpoint_dir) / "latest").resolve() == ckpt_path(hp, 8).resolve()
    log = (Path(hp.log_dir) / "roll.txt").read_text()
    saved = re.findall(r"saved checkpoint \S+step_(\d+)\.pt( \(rolling)?", log)
    assert [(int(step), bool(r)) for step, r in saved] == [(s, s not in (5, 8)) for s in range(1, 9)]


def test_the_rolling_clock_is_the_time_since_the_last_save(monkeypatch, tmp_path):
    saver = checkpoints.Saver(tmp_path, "r", 0, 1, 0)
    saver.last_save = 1000.0
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: 1119.0)
    assert saver.minutes_since_save() < 2  # not yet 2 minutes
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: 1120.0)
    assert saver.minutes_since_save() == 2
    saver.save({"model": {}, "optimizers": {}, "step": 3}, 3, "rolling", runlog.RunLog(None))
    assert saver.minutes_since_save() == 0 and saver.saved_step == 3  # a save restarts the clock


def test_run_flags_alone_are_read_at_once():
    flags = stopping.RunFlags(torch.device("cpu"), 1)
    assert flags.exchange(True, False, True) == (True, False, True)
    assert flags.exchange(False, True) == (False, True, False)


def test_run_flags_across_processes_are_read_lag_steps_late_and_a_save_answers_rolling_requests(monkeypatch):
    """Distributed (a process group of one, gloo): each step's flags come back LAG steps later, the same step on
    every process; now=True reads everything sent; a save makes earlier rolling requests stale."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29400 + os.getpid() % 500))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        flags = stopping.RunFlags(torch.device("cpu"), 2)
        flags.lag = 2  # a GPU's: cuda reads late, the CPU at once
        assert flags.exchange(True) == (False, False, False)  # step 0's stop: read at step 2
        assert flags.exchange(False, rolling=True) == (False, False, False)
        assert flags.exchange(False) == (True, False, False)
        flags.saved()  # a save at step 2 answers step 1's rolling request
        assert flags.exchange(False) == (False, False, False)
        assert flags.exchange(False, log_failed=True) == (False, False, False)
        assert flags.exchange(False, rolling=True, now=True) == (False, True, True)  # all that was sent, at once
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture
def int_handler(monkeypatch):
    """SIGINT as an interactive shell leaves it (a suite started with nohup ... & ignores it)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_signal_before_the_loop_stops_at_once_saying_what_is_on_disk(int_handler, capsys):
    with stopping.StopRequest("train_gpt.py") as stop:
        stop.where, stop.state = "during the compile warm-up", lambda: "nothing was saved. Start again with: X"
        with pytest.raises(errors.Interrupted) as exc:
            signal.raise_signal(signal.SIGTERM)
    assert exc.value.code == 143
    assert str(exc.value) == "stopped by SIGTERM during the compile warm-up; nothing was saved. Start again with: X"
    assert capsys.readouterr().err == f"train_gpt.py: {exc.value}\n"


def test_in_the_loop_a_first_signal_asks_and_a_second_stops_at_once(int_handler, monkeypatch, tmp_path, capsys):
    exits = []
    with stopping.StopRequest("train_gpt.py") as stop:
        stop.deferred, stop.state, stop.exit = True, lambda: "the newest checkpoint is C", exits.append
        signal.raise_signal(signal.SIGTERM)
        assert stop.asked and stop.signal == "SIGTERM" and not exits
        signal.raise_signal(signal.SIGINT)  # within GRACE_S: torchrun forwarding the same request
        assert not exits

        def write(f):  # a save under way when the second signal comes
            f.write(b"partial")
            monkeypatch.setattr(stopping.StopRequest, "GRACE_S", -1.0)
            signal.raise_signal(signal.SIGINT)

        from data.shards import atomic_write
        with pytest.raises(FileNotFoundError):  # stop.exit returns here, and the write finds its file removed
            atomic_write(tmp_path / "step_000001.pt", write)
        assert exits == [130] and list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("train_gpt.py: SIGINT again: stopped at once, without saving; the newest "
                                    "checkpoint is C")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler before is back


def test_a_signal_ignored_from_the_start_stays_ignored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stopping.StopRequest():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_second_signal_during_a_slow_save_leaves_nothing_half_written(tmp_path):
    """In a process of its own: the second signal ends it at once (os._exit) in the middle of an atomic write, with
    one line and exit 143; neither the final file nor the temporary one is there."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from runlib import stopping
        from data.shards import atomic_write
        def write(f):
            f.write(b"x" * 1000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        with stopping.StopRequest("train_gpt.py") as stop:
            stop.deferred, stop.state = True, lambda: "the newest checkpoint is C"
            os.kill(os.getpid(), signal.SIGTERM)
            stopping.StopRequest.GRACE_S = -1.0
            atomic_write({str(tmp_path / "step_000002.pt")!r}, write)
        """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        assert list(tmp_path.iterdir())  # the temporary file is there, half-written
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
    err = proc.stderr.read()
    assert "Traceback" not in err
    assert err.splitlines()[-1] == ("train_gpt.py: SIGTERM again: stopped at once, without saving; the newest "
                                    "checkpoint is C")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_checkpoint_contents(run_b, shared_synthetic_data):
    hp, _, _ = run_b
    ckpt = torch.load(ckpt_path(hp, SAVE_EVERY), map_location="cpu", weights_only=True)
    assert ckpt["format"] == checkpoints.CHECKPOINT_FORMAT and ckpt["version"] == checkpoints.CHECKPOINT_VERSION == 2
    assert ckpt["step"] == SAVE_EVERY and ckpt["run_id"] == "B"
    # the tiny preset's layer pattern ("LS") travels with the sizes: a resume must rebuild the same windows
    assert ckpt["model_config"] == asdict(tg.GPTConfig(num_layers=4, model_dim=64, num_heads=2, head_dim=32,
                                                       no_attn_layer=-1, window_pattern="LS"))
    assert ckpt["hyperparameters"]["model_dim"] == 64 and ckpt["hyperparameters"]["num_iterations"] == N

    fresh = tg.GPT(tg.GPTConfig(**ckpt["model_config"]))
    assert set(ckpt["model"]) == set(fresh.state_dict())
    assert not any("_orig_mod" in k for k in ckpt["model"])
    for k, v in fresh.state_dict().items():
        assert ckpt["model"][k].shape == v.shape and ckpt["model"][k].device.type == "cpu"
    # trained: the zero-initialised head has moved
    assert ckpt["model"]["lm_head.weight"].abs().sum() > 0

    opts = ckpt["optimizers"]
    assert set(opts) == {"adam", "muon"}
    muon_names = {n for n, p in fresh.named_parameters() if n.startswith("blocks.") and p.ndim >= 2}
    assert set(opts["muon"]) == muon_names
    assert all(set(s) == {"momentum_buffer"} for s in opts["muon"].values())
    adam_names = {n for n, _ in fresh.named_parameters()} - muon_names
    assert set(opts["adam"]) == adam_names
    for name, s in opts["adam"].items():
        assert float(s["step"]) == SAVE_EVERY
        assert s["exp_avg"].shape == fresh.get_parameter(name).shape

    # the loader is where a fresh loader is after SAVE_EVERY steps
    loader = tg.TrainLoader(tg.find_shards(str(shared_synthetic_data), hp.train_files, "train"), hp.train_seq_len,
                            hp.seqs_per_step, span_multiplier=hp.max_batch_span_multiplier)
    for _ in range(SAVE_EVERY):
        loader.step_starts()
    assert set(ckpt["loader"]) == {"shard", "pos", "epoch", "files"}
    assert (ckpt["loader"]["shard"], ckpt["loader"]["pos"], ckpt["loader"]["epoch"]) == (loader.shard, loader.pos, 0)
    assert ckpt["loader"]["files"] == ["syn_train_000001.bin", "syn_train_000002.bin"]
    assert isinstance(ckpt["rng"]["torch"], torch.Tensor)
    assert ckpt["train_time_ms"] > 0

    later = torch.load(ckpt_path(hp, 2 * SAVE_EVERY), map_location="cpu", weights_only=True)
    place = lambda c: (c["loader"]["epoch"], c["loader"]["shard"], c["loader"]["pos"])  # noqa: E731
    assert later["step"] == 2 * SAVE_EVERY and place(later) > place(ckpt)
    assert not torch.equal(later["model"]["embed.weight"], ckpt["model"]["embed.weight"])


def test_model_state_strips_the_compile_prefix():
    model = tg.GPT(tg.GPTConfig(vocab_size=50304, num_layers=2, model_dim=32, num_heads=1, head_dim=16,
                                no_attn_layer=-1))
    compiled = torch.compile(model, dynamic=False)  # wrapping only; nothing is compiled until it is called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    state = checkpoints.model_state(compiled)
    assert set(state) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    state["embed.weight"].add_(1.0)  # a copy, not a view of the live weights
    assert not torch.equal(state["embed.weight"], model.embed.weight)


# ----------------------------------------------------------------------------------------------------------------------
# resolve_checkpoint


@pytest.mark.slow
def test_resolve_checkpoint(run_b):
    hp, _, _ = run_b
    root = hp.checkpoint_dir
    f = ckpt_path(hp, SAVE_EVERY)
    assert checkpoints.resolve_checkpoint(str(f), None, root).resolve() == f.resolve()
    newest = ckpt_path(hp, N).resolve()
    assert checkpoints.resolve_checkpoint(str(Path(root) / "B"), None, root).resolve() == newest
    assert checkpoints.resolve_checkpoint("auto", "B", root).resolve() == newest
    assert checkpoints.resolve_checkpoint("auto", None, root).resolve() == newest


def test_resolve_checkpoint_orders_steps_numerically(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    for name in ("step_000002.pt", "step_999999.pt", "step_1000000.pt", "step_abc.pt", "other_000005.pt",
                 ".step_2000000.pt.tmp-1", "step_3000000.pt.partial"):
        (run / name).write_bytes(b"x")
    assert checkpoints.resolve_checkpoint(str(run)).name == "step_1000000.pt"
    assert checkpoints.resolve_checkpoint("auto", "r", str(tmp_path)).name == "step_1000000.pt"


def test_resolve_checkpoint_errors(tmp_path):
    missing = tmp_path / "nope" / "step_000004.pt"
    with pytest.raises(errors.CheckpointError, match="does not exist") as exc:
        checkpoints.resolve_checkpoint(str(missing), None, str(tmp_path))
    assert str(missing) in str(exc.value)
    with pytest.raises(errors.CheckpointError, match="no run has saved one yet"):
        checkpoints.resolve_checkpoint("auto", None, str(tmp_path))
    with pytest.raises(errors.CheckpointError) as exc:
        checkpoints.resolve_checkpoint("auto", "ghost", str(tmp_path))
    assert "ghost" in str(exc.value)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(errors.CheckpointError, match="step_") as exc:
        checkpoints.resolve_checkpoint(str(tmp_path / "empty_run"), None, str(tmp_path))
    assert "empty_run" in str(exc.value)


def test_a_dangling_latest_is_called_so_with_the_runs_that_have_checkpoints(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "step_000004.pt").write_bytes(b"4")
    os.symlink(os.path.join("gone", "step_000010.pt"), tmp_path / "latest")
    with pytest.raises(errors.CheckpointError) as exc:
        checkpoints.resolve_checkpoint("auto", None, str(tmp_path))
    assert str(exc.value) == (f"{tmp_path / 'latest'} points at gone/step_000010.pt, which no longer exists; runs "
                              f"with checkpoints in {tmp_path}: kept (resume one with --resume {tmp_path / 'kept'})")
    shutil.rmtree(tmp_path / "kept")
    with pytest.raises(errors.CheckpointError, match=f"which no longer exists; no run in {tmp_path} has a checkpoint"):
        checkpoints.resolve_checkpoint("auto", None, str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------------
# load_checkpoint and check_model_config errors


class NotAllowed:
    """A class that a weights_only load must refuse to instantiate."""

    def __init__(self):
        self.x = 1


@pytest.mark.slow
def test_load_checkpoint_rejects_bad_files(run_b, tmp_path):
    hp, _, _ = run_b
    good = ckpt_path(hp, SAVE_EVERY)
    assert checkpoints.load_checkpoint(good)["step"] == SAVE_EVERY

    data = good.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, size=5000, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    code = tmp_path / "code.pt"
    torch.save({"format": checkpoints.CHECKPOINT_FORMAT, "version": 1, "obj": NotAllowed()}, code)
    for path in (truncated, noise, empty, code):
        with pytest.raises(errors.CheckpointError, match="not a readable checkpoint") as exc:
            checkpoints.load_checkpoint(path)
        assert str(path) in str(exc.value)

    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, foreign)
    with pytest.raises(errors.CheckpointError, match="not written by this trainer") as exc:
        checkpoints.load_checkpoint(foreign)
    assert str(foreign) in str(exc.value)
    not_a_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_dict)
    with pytest.raises(errors.CheckpointError, match="not written by this trainer"):
        checkpoints.load_checkpoint(not_a_dict)

    newer = tmp_path / "newer.pt"
    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    ckpt["version"] = checkpoints.CHECKPOINT_VERSION + 1
    torch.save(ckpt, newer)
    with pytest.raises(errors.CheckpointError, match="version") as exc:
        checkpoints.load_checkpoint(newer)
    assert str(checkpoints.CHECKPOINT_VERSION + 1) in str(exc.value)


@pytest.mark.slow
def test_check_model_config_names_the_differing_fields(run_b):
    hp, _, _ = run_b
    path = ckpt_path(hp, SAVE_EVERY)
    ckpt = checkpoints.load_checkpoint(path)
    same = tg.GPTConfig.from_hyperparameters(hp)
    checkpoints.check_model_config(ckpt, asdict(same), path)
    other = dataclasses.replace(same, model_dim=128, num_layers=6)
    with pytest.raises(errors.CheckpointError) as exc:
        checkpoints.check_model_config(ckpt, asdict(other), path)
    msg = str(exc.value)
    assert "model_dim=64" in msg and "128" in msg and "num_layers=4" in msg
    assert "head_dim" not in msg and "num_heads" not in msg
    assert str(path) in msg


@pytest.mark.slow
def test_resume_with_a_different_model_size_fails_clearly(run_b, shared_synthetic_data, tmp_path):
    hp, _, _ = run_b
    other = tiny_hp(shared_synthetic_data, tmp_path, model_dim=128, resume=str(ckpt_path(hp, SAVE_EVERY)),
                    run_name="mismatch")
    with pytest.raises(errors.CheckpointError) as exc:
        tg.train(other)
    assert "model_dim=64" in str(exc.value) and "128" in str(exc.value)
    assert not (tmp_path / "checkpoints" / "mismatch").exists()


def test_main_resume_without_checkpoint_exits_2(tmp_path, capsys):
    rc = tg.main(["--resume", "--checkpoint-dir", str(tmp_path / "none")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("train_gpt.py: error:")
    assert "does not exist" in err and "latest" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_main_resume_missing_file_with_preset_exits_2(tmp_path, capsys, shared_synthetic_data):
    flags = tiny_flags(shared_synthetic_data, tmp_path)
    missing = str(tmp_path / "gone" / "step_000004.pt")
    rc = tg.main(flags + ["--resume", missing])
    assert rc == 2
    err = capsys.readouterr().err
    assert missing in err and "does not exist" in err


# ----------------------------------------------------------------------------------------------------------------------
# Atomic save


@pytest.mark.slow
def test_atomic_save_failure_leaves_no_partial_file(shared_synthetic_data, tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(obj.get("step") if isinstance(obj, dict) else None)
        if len(calls) == 1:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the file, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    hp = tiny_hp(shared_synthetic_data, tmp_path, num_iterations=4, save_every=2, run_name="atomic",
                 val_loss_every=0)
    with pytest.raises(OSError, match="the disk is full"):
        tg.train(hp)
    assert calls == [2, 4]
    run_dir = tmp_path / "checkpoints" / "atomic"
    assert sorted(p.name for p in run_dir.iterdir()) == ["step_000002.pt"]  # no step 4, no temp file
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".atomic.lock", "atomic", "latest"]
    assert (root / "latest").resolve() == (run_dir / "step_000002.pt").resolve()
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoints.load_checkpoint(run_dir / "step_000002.pt")["step"] == 2


def test_atomic_save_replaces_existing_file_only_when_complete(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "step_000001.pt"
    checkpoints.atomic_save({"a": torch.ones(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(3))
    before = target.read_bytes()

    def boom(obj, f, *a, **k):
        f.write(b"garbage")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        checkpoints.atomic_save({"a": torch.zeros(3)}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["step_000001.pt"]


def test_point_latest_replaces_the_link(tmp_path):
    a, b = tmp_path / "r" / "step_000001.pt", tmp_path / "r" / "step_000002.pt"
    a.parent.mkdir()
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    checkpoints.point_latest(tmp_path, a)
    assert (tmp_path / "latest").read_bytes() == b"1"
    checkpoints.point_latest(tmp_path, b)
    assert (tmp_path / "latest").read_bytes() == b"2"
    assert os.readlink(tmp_path / "latest") == os.path.join("r", "step_000002.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "r"]


# ----------------------------------------------------------------------------------------------------------------------
# Resume equivalence


@pytest.mark.slow
def test_resume_in_process_matches_an_uninterrupted_run(run_b, shared_synthetic_data, tmp_path):
    hp_b, summary_b, work_b = run_b
    hp_a = tiny_hp(shared_synthetic_data, tmp_path / "a", num_iterations=N, save_every=0, save_final=False,
                   train_loss_every=1, val_loss_every=0, run_name="A")
    summary_a = tg.train(hp_a)
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir()] == [".A.lock"]  # no checkpoint
    train_a, val_a = parse_log(tmp_path / "a" / "logs" / "A.txt")
    assert sorted(train_a) == list(range(1, N + 1)) and sorted(val_a) == [N]
    # saving checkpoints does not change the run
    train_b, val_b = parse_log(work_b / "logs" / "B.txt")
    assert train_b == train_a and val_b == val_a
    assert summary_b["final_val_loss"] == pytest.approx(summary_a["final_val_loss"], abs=1e-6)

    hp_c = tiny_hp(shared_synthetic_data, tmp_path / "c", num_iterations=N, train_loss_every=1, val_loss_every=0,
                   run_name="C", resume=str(ckpt_path(hp_b, SAVE_EVERY)))
    summary_c = tg.train(hp_c)
    log_c = (tmp_path / "c" / "logs" / "C.txt").read_text()
    source = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    assert log_c.startswith(source)  # a new log file, even of a resumed run, begins with the code
    assert f"resumed from {ckpt_path(hp_b, SAVE_EVERY).resolve()} at step {SAVE_EVERY}" in log_c
    train_c, val_c = parse_log(tmp_path / "c" / "logs" / "C.txt")
    assert sorted(train_c) == list(range(SAVE_EVERY + 1, N + 1))
    for step in train_c:
        assert train_c[step] == pytest.approx(train_a[step], abs=1e-6), step
    assert val_c[N] == pytest.approx(val_a[N], abs=1e-6)
    assert summary_c["final_val_loss"] == pytest.approx(summary_a["final_val_loss"], abs=1e-6)
    # the resumed run saved its final checkpoint with the same weights as the uninterrupted one's
    final_b = torch.load(ckpt_path(hp_b, N), weights_only=True)
    final_c = torch.load(ckpt_path(hp_c, N), weights_only=True)
    for k, v in final_b["model"].items():
        torch.testing.assert_close(final_c["model"][k], v, rtol=0, atol=1e-6)
    assert final_c["loader"] == final_b["loader"]


def _launch(flags, log_path):
    env = subprocess_env(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40), OMP_NUM_THREADS="1")
    out = open(log_path, "wb")
    return subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py"), *flags], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, preexec_fn=default_sigint), out


@pytest.mark.slow
def test_sigkill_and_resume_matches_an_uninterrupted_subprocess_run(shared_synthetic_data, tmp_path):
    steps, kill_after = 8, 4
    common = dict(num_iterations=steps, train_loss_every=1, val_loss_every=0, val_tokens=2048)
    ref_flags = tiny_flags(shared_synthetic_data, tmp_path / "ref", run_name="ref", save_every=0, **common)
    kill_flags = tiny_flags(shared_synthetic_data, tmp_path / "kill", run_name="victim", save_every=2, **common)
    ref, ref_out = _launch(ref_flags, tmp_path / "ref.out")  # both at once: one core each
    victim, victim_out = _launch(kill_flags, tmp_path / "victim.out")
    run_dir = tmp_path / "kill" / "checkpoints" / "victim"
    marker = run_dir / f"step_{kill_after:06d}.pt"
    deadline = time.monotonic() + 240
    killed = False
    try:
        while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), (tmp_path / "victim.out").read_text()
        if victim.poll() is None:
            victim.send_signal(signal.SIGKILL)
            killed = True
        victim.wait(timeout=60)
        assert ref.wait(timeout=240) == 0, (tmp_path / "ref.out").read_text()
    finally:
        for p in (ref, victim):
            if p.poll() is None:
                p.kill()
                p.wait()
        ref_out.close()
        victim_out.close()
    if killed:
        assert victim.returncode == -signal.SIGKILL
    # every step file that exists is complete (temp files may be left by the kill, never partial step files)
    saved = sorted(p for p in run_dir.iterdir() if p.name.startswith("step_"))
    for p in saved:
        assert checkpoints.load_checkpoint(p)["step"] == int(p.stem.split("_")[1])
    newest_before = max(int(p.stem.split("_")[1]) for p in saved)

    # resume: the run directory when it was really killed, else explicitly from the step-4 file
    resume_from = str(run_dir) if killed else str(marker)
    env = subprocess_env(OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--resume", resume_from,
                          "--checkpoint-dir", str(tmp_path / "kill" / "checkpoints")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    start = newest_before if killed else kill_after
    assert f"at step {start}" in res.stdout

    train_ref, val_ref = parse_log(tmp_path / "ref" / "logs" / "ref.txt")
    train_kill, val_kill = parse_log(tmp_path / "kill" / "logs" / "victim.txt")
    assert sorted(train_ref) == list(range(1, steps + 1))
    assert sorted(train_kill) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert train_kill[step] == pytest.approx(train_ref[step], abs=1e-6), step
    assert val_kill[steps] == pytest.approx(val_ref[steps], abs=1e-6)
    log = (tmp_path / "kill" / "logs" / "victim.txt").read_text()
    assert sum(line.startswith("resumed from") for line in log.splitlines()) == 1
    source = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    assert log.startswith(source)
    assert log.count(source.splitlines()[0]) == 1  # the resumed run appended to its log, without the code again
    final = checkpoints.load_checkpoint(run_dir / f"step_{steps:06d}.pt")
    assert final["step"] == steps
    assert (tmp_path / "kill" / "checkpoints" / "latest").resolve() == (run_dir / f"step_{steps:06d}.pt").resolve()
    shutil.rmtree(tmp_path / "kill" / "checkpoints")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_prints_the_resume_command(shared_synthetic_data, tmp_path, sig, code):
    """Ctrl-C (or SIGTERM) during training: a checkpoint of the step reached, the exact command to resume it, no
    traceback; that command continues the run to its end."""
    flags = tiny_flags(shared_synthetic_data, tmp_path, run_name="stop", num_iterations=200, val_loss_every=0,
                       val_tokens=2048, save_every_minutes=0)
    proc, out = _launch(flags, tmp_path / "stop.out")
    log = tmp_path / "logs" / "stop.txt"
    try:
        wait_for_text(log, "step:3/200", proc)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
    text = (tmp_path / "stop.out").read_text()
    assert "Traceback" not in text
    (line,) = [x for x in text.splitlines() if x.startswith(f"train_gpt.py: stopped by {sig.name} at step ")]
    step = int(line.split(" at step ")[1].split()[0])
    run_dir = tmp_path / "checkpoints" / "stop"
    assert checkpoints.load_checkpoint(run_dir / f"step_{step:06d}.pt")["step"] == step and 3 <= step < 200
    assert f"; saved {run_dir / f'step_{step:06d}.pt'}. Resume with: " in line
    command = line.split("Resume with: ")[1]
    assert shlex.split(command) == [sys.executable, str(ROOT / "train_gpt.py"), "--resume", str(run_dir)]
    assert line.split("train_gpt.py: ", 1)[1] in log.read_text().splitlines()  # the log says it too
    res = subprocess.run([*shlex.split(command), "--num-iterations", str(step + 2)], cwd=ROOT,
                         env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"at step {step}" in res.stdout and f"step:{step + 2}/{step + 2} val_loss:" in res.stdout


def _long_validation_flags(data, tmp_path, **overrides) -> list[str]:
    """The tiny model validating 38,912 tokens in 38 chunks of 1,024: a validation of some seconds."""
    values = dict(run_name="val", num_iterations=200, val_tokens=38912, val_seq_len=1024, save_every_minutes=0)
    values.update(overrides)
    return tiny_flags(data, tmp_path, **values)


@pytest.mark.slow
def test_a_stop_during_the_first_validation_says_nothing_was_saved_and_how_to_start_again(shared_synthetic_data,
                                                                                         tmp_path):
    """A stop before the first step: no checkpoint is claimed, and the command printed starts the run again (it
    then takes the name: the earlier log, which has no checkpoint, is kept beside the new one)."""
    flags = _long_validation_flags(shared_synthetic_data, tmp_path)
    proc, out = _launch(flags, tmp_path / "val.out")
    try:
        wait_for_text(tmp_path / "val.out", "run val: ", proc)  # the last line before the step-0 validation
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        proc.kill()
        out.close()
    text = (tmp_path / "val.out").read_text()
    assert "Traceback" not in text and "step:0/200 val_loss" not in text
    # at step 0 of 200 (in the step-0 validation) or just before it (a loaded machine: the signal came sooner)
    (line,) = [x for x in text.splitlines() if re.match(r"train_gpt\.py: stopped by SIGTERM (at step 0 of 200|"
                                                        r"before the first step); ", x)]
    assert "nothing was saved" in line and "checkpoint" not in line.split("; ", 1)[1].split("Start again")[0]
    command = line.split("Start again with: ")[1]
    assert shlex.split(command) == [sys.executable, str(ROOT / "train_gpt.py"), *flags]
    assert not (tmp_path / "checkpoints" / "val").exists()
    again = shlex.split(command) + ["--num-iterations", "2", "--val-tokens", "1024"]
    res = subprocess.run(again, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    kept = [p.name for p in (tmp_path / "logs").glob("val.earlier-*.txt")]
    assert len(kept) == 1 and f"logs/{kept[0]}; this run writes a new " in res.stdout
    assert "step:0/200" not in (tmp_path / "logs" / "val.txt").read_text()  # a log of its own


@pytest.mark.slow
def test_a_signal_during_a_validation_stops_within_a_chunk(shared_synthetic_data, tmp_path):
    """A stop asked in the middle of a validation takes effect at the next chunk, not after the validation: bound by
    the run's own first validation (38 chunks), the stop takes well under half of one; the step reached is saved."""
    flags = _long_validation_flags(shared_synthetic_data, tmp_path, val_loss_every=2)
    proc, out = _launch(flags, tmp_path / "val.out")
    try:
        started = wait_for_text(tmp_path / "val.out", "run val: ", proc)
        validation_s = wait_for_text(tmp_path / "val.out", "step:0/200 val_loss:", proc) - started
        wait_for_text(tmp_path / "val.out", "step:2/200 train_time", proc)  # the second validation begins
        time.sleep(validation_s / 4)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        took = time.monotonic() - sent
    finally:
        proc.kill()
        out.close()
    text = (tmp_path / "val.out").read_text()
    assert "step:2/200 val_loss" not in text  # the validation was cut short
    assert took < validation_s / 2, (took, validation_s)
    assert "train_gpt.py: stopped by SIGINT at step 2 of 200; saved " in text
    assert checkpoints.load_checkpoint(tmp_path / "checkpoints" / "val" / "step_000002.pt")["step"] == 2


# ----------------------------------------------------------------------------------------------------------------------
# Resuming from a checkpoint that cannot be resumed: one line, exit 2, before any training


def resume_flags(shared_synthetic_data, tmp_path, path, **overrides) -> list[str]:
    overrides.setdefault("run_name", "again")
    return tiny_flags(shared_synthetic_data, tmp_path, **overrides) + ["--resume", str(path)]


def damaged(run_b, tmp_path, change) -> Path:
    """A copy of run B's step-4 checkpoint with change(ckpt) applied."""
    hp, _, _ = run_b
    ckpt = torch.load(ckpt_path(hp, SAVE_EVERY), weights_only=True)
    change(ckpt)
    path = tmp_path / "damaged" / "step_000004.pt"
    checkpoints.atomic_save(ckpt, path)
    return path


@pytest.mark.parametrize("change,words", [
    (lambda c: c.pop("hyperparameters"), "holds no hyperparameters"),  # read first: they are the settings
    (lambda c: c.pop("run_id"), "lacks or mangles run_id"),
    (lambda c: c.pop("optimizers"), "lacks or mangles optimizers"),
    (lambda c: c.update(loader=None), "lacks or mangles loader"),
    (lambda c: c["optimizers"].pop("adam"), "has no adam optimiser state"),
    (lambda c: c["optimizers"]["muon"]["blocks.0.mlp.c_fc"].update(momentum_buffer=torch.zeros(3, 3)),
     "muon state for 'blocks.0.mlp.c_fc' does not fit"),
    (lambda c: c["model"].update({"skip_weights": torch.zeros(5)}), "its weights do not fit this model (size "
     "mismatch for skip_weights"),
    (lambda c: c["model"].pop("embed.weight"), "its weights do not fit this model (Missing key(s)"),
    (lambda c: c.update(rng={}), "its random-number state is unusable"),
])
@pytest.mark.slow
def test_hollow_or_partial_checkpoints_are_refused_in_one_line(run_b, shared_synthetic_data, tmp_path, capsys,
                                                               change, words):
    path = damaged(run_b, tmp_path, change)
    assert tg.main(resume_flags(shared_synthetic_data, tmp_path, path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train_gpt.py: error: {path}") and words in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not list((tmp_path / "checkpoints").glob("again/step_*.pt"))
    assert not (tmp_path / "logs" / "again.txt").exists()  # a refused resume writes no log


@pytest.mark.slow
def test_a_refused_resume_leaves_the_runs_log_as_it_was(run_b, shared_synthetic_data, tmp_path, capsys):
    """Resuming run B under its own name with another model size: refused, and B's log has no line more."""
    _, _, work = run_b
    shutil.copytree(work, tmp_path / "w")
    log = tmp_path / "w" / "logs" / "B.txt"
    before = log.read_bytes()
    flags = tiny_flags(shared_synthetic_data, tmp_path / "w", run_name="B", model_dim=128, num_iterations=N + 4)
    assert tg.main(flags + ["--resume", str(tmp_path / "w" / "checkpoints" / "B")]) == 2
    assert "holds a different model: model_dim=64 (this run: 128)" in capsys.readouterr().err
    assert log.read_bytes() == before


@pytest.mark.slow
def test_a_fresh_run_may_not_take_the_name_of_a_run_with_checkpoints(run_b, shared_synthetic_data, tmp_path,
                                                                      capsys):
    _, _, work = run_b
    shutil.copytree(work, tmp_path / "w")
    run_dir, log = tmp_path / "w" / "checkpoints" / "B", tmp_path / "w" / "logs" / "B.txt"
    before = sorted(p.name for p in run_dir.iterdir()), log.read_bytes()
    assert tg.main(tiny_flags(shared_synthetic_data, tmp_path / "w", run_name="B", num_iterations=2)) == 2
    assert capsys.readouterr().err == (
        f"train_gpt.py: error: run 'B' already has checkpoints in {run_dir} (newest step_000012.pt): continue it "
        f"with --resume {run_dir}, or give this run another --run-name\n")
    assert (sorted(p.name for p in run_dir.iterdir()), log.read_bytes()) == before


@pytest.mark.slow
def test_resume_without_preset_needs_the_saved_hyperparameters(run_b, tmp_path, capsys):
    path = damaged(run_b, tmp_path, lambda c: c.pop("hyperparameters"))
    assert tg.main(["--resume", str(path)]) == 2  # the settings would come from the checkpoint
    err = capsys.readouterr().err
    assert err == f"train_gpt.py: error: {path} holds no hyperparameters; it is not a complete checkpoint of this " \
                  "trainer\n"


@pytest.mark.slow
def test_resume_past_num_iterations_is_refused(run_b, shared_synthetic_data, tmp_path, capsys):
    hp, _, _ = run_b
    path = ckpt_path(hp, 8)
    assert tg.main(resume_flags(shared_synthetic_data, tmp_path, path, num_iterations=6)) == 2
    err = capsys.readouterr().err
    assert err == (f"train_gpt.py: error: {path.resolve()} is at step 8, past --num-iterations 6: resume with "
                   "--num-iterations 8 or more\n")


@pytest.mark.slow
def test_resume_on_other_train_shards_is_refused(run_b, shared_synthetic_data, tmp_path, capsys):
    """The loader position means nothing in other data; more shards after the saved ones are fine."""
    hp, _, _ = run_b
    other = tmp_path / "other"
    shutil.copytree(shared_synthetic_data, other)
    (other / "syn_train_000001.bin").rename(other / "syn_train_000009.bin")  # the same data in another order
    assert tg.main(resume_flags(other, tmp_path, ckpt_path(hp, SAVE_EVERY))) == 2
    err = capsys.readouterr().err
    assert "was trained on the shards syn_train_000001.bin, syn_train_000002.bin (2), this run reads " \
           "syn_train_000002.bin, syn_train_000009.bin (2)" in err
    more = tmp_path / "more"
    shutil.copytree(shared_synthetic_data, more)
    shutil.copy(more / "syn_train_000002.bin", more / "syn_train_000003.bin")
    assert tg.main(resume_flags(more, tmp_path, ckpt_path(hp, SAVE_EVERY), run_name="more",
                                save_final=False)) == 0


# ----------------------------------------------------------------------------------------------------------------------
# Disk full, and what an interrupted save leaves behind


def test_disk_full_is_named_and_other_write_failures_are_not(tmp_path, monkeypatch):
    """torch.save reports a full disk as "unexpected pos": a failure with the file system (nearly) full is called
    a full disk, with the space left; the same failure with room to spare stays what it was."""
    def torch_on_a_full_disk(obj, f, *a, **k):
        f.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", torch_on_a_full_disk)
    target = tmp_path / "run" / "step_000002.pt"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=3 << 20))
    with pytest.raises(DiskFullError) as exc:
        checkpoints.atomic_save({"a": torch.ones(2)}, target)
    assert exc.value.strerror == (f"cannot write {target}: the disk is full (3 MiB free in {target.parent}); free "
                                  "some space and run again (nothing was replaced)")
    assert list(target.parent.iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        checkpoints.atomic_save({"a": torch.ones(2)}, target)


@pytest.mark.slow
def test_disk_full_while_training_ends_in_one_line(shared_synthetic_data, tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def second_save_fails(obj, f, *a, **k):
        if obj.get("step") == 4:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", second_save_fails)
    flags = tiny_flags(shared_synthetic_data, tmp_path, num_iterations=4, save_every=2, val_loss_every=0,
                       run_name="full")
    assert tg.main(flags) == 2
    err = capsys.readouterr().err
    path = tmp_path / "checkpoints" / "full" / "step_000004.pt"
    assert err.startswith(f"train_gpt.py: error: cannot write {path}: the disk is full") and err.count("\n") == 1
    assert (tmp_path / "checkpoints" / "latest").resolve().name == "step_000002.pt"


@pytest.mark.slow
def test_temporary_files_of_an_interrupted_save_are_removed(run_b, shared_synthetic_data, tmp_path):
    """What a kill during a save leaves (a temporary checkpoint, a temporary latest link of a dead process) goes at
    the next start of the run; another live process's temporary link stays."""
    hp, _, _ = run_b
    work = tmp_path / "w"
    shutil.copytree(Path(hp.checkpoint_dir), work / "checkpoints", symlinks=True)
    run_dir = work / "checkpoints" / "B"
    (run_dir / ".step_000008.pt.tmp-4242").write_bytes(b"PK half")
    dead, alive = work / "checkpoints" / ".latest.tmp-999999999", work / "checkpoints" / f".latest.tmp-{os.getppid()}"
    for link in (dead, alive):
        os.symlink("B/step_000004.pt", link)
    resumed = tiny_hp(shared_synthetic_data, work, num_iterations=N, save_every=SAVE_EVERY, val_loss_every=0,
                      run_name="B", resume=str(run_dir / "step_000008.pt"), save_final=False)
    tg.train(resumed)
    assert not (run_dir / ".step_000008.pt.tmp-4242").exists() and not dead.is_symlink() and alive.is_symlink()
    log = (work / "logs" / "B.txt").read_text(encoding="utf-8")
    assert "removed 2 temporary file(s) that interrupted saves had left behind" in log


GENERATED = "20261203-061114-tiny-6eaf92"


@pytest.mark.parametrize("saved_name, run_id, expected", [(None, GENERATED, GENERATED), ("mine", "mine", "mine"),
                                                          (None, "../elsewhere", None)])
def test_a_resumed_run_keeps_its_name_in_its_settings(tmp_path, saved_name, run_id, expected):
    """The settings of a resumed run name the run it continues (open_run's rule), so that --print-config tells a
    wrapper where its checkpoints go; a name that is not a plain file name is left to open_run to refuse."""
    hp = dataclasses.asdict(dataclasses.replace(tg.preset_hyperparameters("tiny"), run_name=saved_name))
    path = tmp_path / "run" / "step_000002.pt"
    checkpoints.atomic_save({"format": checkpoints.CHECKPOINT_FORMAT, "version": checkpoints.CHECKPOINT_VERSION,
                             "run_id": run_id, "hyperparameters": hp}, path)
    assert tg.parse_args(["--resume", str(path)]).run_name == expected
    assert tg.parse_args(["--resume", str(path), "--run-name", "other"]).run_name == "other"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fill a disk on demand")
def test_a_full_log_disk_stops_the_run_with_a_checkpoint_in_one_line(shared_synthetic_data, tmp_path):
    """The run log's disk fills in the middle of a run (the log replaced by /dev/full, where every write fails with
    ENOSPC): one line saying so, a checkpoint of the step reached on the checkpoints' disk, exit 2."""
    flags = tiny_flags(shared_synthetic_data, tmp_path, run_name="full", num_iterations=200, val_loss_every=0,
                       save_every_minutes=0)
    proc, out = _launch(flags, tmp_path / "full.out")
    log = tmp_path / "logs" / "full.txt"
    try:
        wait_for_text(log, "step:3/200", proc)
        os.symlink("/dev/full", tmp_path / "logs" / "full.tmp")
        os.replace(tmp_path / "logs" / "full.tmp", log)
        assert proc.wait(timeout=120) == 2
    finally:
        proc.kill()
        out.close()
    text = (tmp_path / "full.out").read_text()
    assert "Traceback" not in text and "Errno" not in text
    (line,) = [x for x in text.splitlines() if "cannot be written" in x]
    step = int(line.split(" at step ")[1].split()[0])
    assert line.startswith(f"train_gpt.py: stopped at step {step} of 200: the run log {log} cannot be written (its "
                           f"disk is full); saved ")
    assert checkpoints.load_checkpoint(tmp_path / "checkpoints" / "full" / f"step_{step:06d}.pt")["step"] == step
    assert "Resume with: " in line


def test_a_child_forked_with_the_stop_handlers_ends_at_a_signal(int_handler):
    """A worker forked while the handlers are in place (a pool's, before its initializer runs) that gets a signal
    ends there, with 128 + the signal: an exception raised in it would climb out of the fork into a copy of the
    caller's code and run it on."""
    with stopping.StopRequest() as stop:
        stop.deferred = True
        pid = os.fork()
        if pid == 0:  # the child: the handler must end it here, not raise into this code
            try:
                signal.raise_signal(signal.SIGTERM)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert not stop.asked  # the child's signal was its own
    assert os.waitstatus_to_exitcode(status) == 143
