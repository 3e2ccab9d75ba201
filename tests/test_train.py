"""The command line, import hygiene, the run log, learning, distributed equivalence, torch.compile and wandb."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import signal
import struct
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest
import torch

from runlib import checkpoints, devices, errors, runlog, runs
import train_gpt as tg
from conftest import ROOT, parse_log, subprocess_env, tiny_flags, tiny_hp, wait_for_text, write_shard
from data.shards import load_shard

TRAIN_LINE = re.compile(r"^step:\d+/\d+ (train_loss:\d+\.\d{4} )?train_time:\d+ms step_avg:\d+\.\d{2}ms$")
VAL_LINE = re.compile(r"^step:\d+/\d+ val_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms$")
SUMMARY_LINE = re.compile(r"^final val_loss:(\d+\.\d{4}) train_time:(\d+\.\d)s \((\d+) steps, ([\d,]+) tokens, "
                          r"([\d,]+) tokens/s\) peak memory: (\d+\.\d{2}) GiB .*; "
                          r"(no target|target .*: (not )?reached)$")
BOOL_FLAGS = {"compile": "--no-compile", "fp8": "--no-fp8", "save_final": "--no-save-final", "wandb": "--wandb",
              "resume": "--resume", "cpu_ok": "--yes"}
FAST_ENV = dict(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40), OMP_NUM_THREADS="1")


def flag_of(name: str) -> str:
    return BOOL_FLAGS.get(name, "--" + name.replace("_", "-"))


# ----------------------------------------------------------------------------------------------------------------------
# Command line


@pytest.mark.slow
def test_help_lists_every_hyperparameter():
    # no MALLOC_* variables: this also goes through the CPU re-exec of the script
    env = subprocess_env()
    env.pop("MALLOC_MMAP_MAX_", None)
    res = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    names = [f.name for f in fields(tg.Hyperparameters)]
    assert len(names) >= 40
    for name in names:
        if name == "preset":
            continue
        if name in tg.FLAG_FIELDS:
            assert re.search(re.escape(flag_of(name)) + r"\b", out), f"{flag_of(name)} missing from --help"
        else:  # the --set table: name, default, meaning
            assert re.search(rf"^  {name} +\S+ +\S", out, re.M), f"--set {name} missing from --help"
    assert re.search(r"--preset \{speedrun,a10,tiny,auto\}", out)
    assert "--set FIELD=VALUE" in out and "--print-config" in out
    assert "usage: train_gpt.py" in out


def test_parse_args_preset_then_flags():
    assert tg.parse_args([]) == tg.Hyperparameters()
    tiny = tg.parse_args(["--preset", "tiny"])
    assert tiny == dataclasses.replace(tg.Hyperparameters(), preset="tiny", **tg.PRESETS["tiny"])
    assert tiny.model_dim == 128 and tiny.compile is False and tiny.train_seq_len == 1024

    hp = tg.parse_args(["--preset", "tiny", "--set", "model_dim=96", "--set", "cooldown_frac=0.3", "--run-name", "x",
                        "--no-fp8", "--wandb", "--data-dir", "/d", "--val-tokens", "8192", "--set", "attention=dense"])
    assert (hp.model_dim, hp.cooldown_frac, hp.run_name, hp.fp8, hp.wandb, hp.data_dir, hp.val_tokens,
            hp.attention) == (96, 0.3, "x", False, True, "/d", 8192, "dense")
    assert isinstance(hp.val_tokens, int) and isinstance(hp.cooldown_frac, float)
    assert hp.num_layers == 6 and hp.train_seq_len == 1024 and hp.preset == "tiny"  # the rest from the preset
    # the order of flags does not matter: a flag before --preset still wins
    assert tg.parse_args(["--set", "num_layers=3", "--preset", "a10"]).num_layers == 3
    a10 = tg.parse_args(["--preset", "a10", "--no-compile", "--no-save-final"])
    assert a10.train_seq_len == 12 * 1024 and a10.seqs_per_step == 32 and not a10.compile and not a10.save_final
    assert a10.num_layers == tg.Hyperparameters().num_layers
    assert tg.build_arg_parser().parse_args(["--resume"]).resume == "auto"
    assert tg.build_arg_parser().parse_args(["--resume", "ck/run"]).resume == "ck/run"


@pytest.mark.parametrize("argv,words", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--num-iterations", "many"], "--num-iterations"),
    (["--save-every-minutes", "x"], "--save-every-minutes"),
    (["--preset", "huge"], "--preset"),
    (["--model-dim", "64"], "--model-dim is --set model_dim=VALUE"),
])
def test_parse_args_errors_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        tg.parse_args(argv)
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.slow
def test_bad_flag_value_exits_2_from_the_command_line():
    res = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--num-iterations", "ten"], cwd=ROOT,
                         env=subprocess_env(**FAST_ENV), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "--num-iterations" in res.stderr and "ten" in res.stderr
    assert "Traceback" not in res.stderr


def test_config_error_exits_2_without_traceback(tmp_path, shared_synthetic_data, capsys):
    rc = tg.main(tiny_flags(shared_synthetic_data, tmp_path, seqs_per_step=3, val_tokens=1000))
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("train_gpt.py: error:") and "--val-tokens 1000" in err
    rc = tg.main(tiny_flags(tmp_path / "nodata", tmp_path))
    assert rc == 2
    assert "no train shards match" in capsys.readouterr().err


@pytest.mark.parametrize("flags,words", [
    (["--muon-lr", "nan"], "--muon-lr must be a finite number, got nan"),
    (["--adam-lr", "inf"], "--adam-lr must be a finite number, got inf"),
    (["--adam-lr", "1e39"], "--adam-lr must be below 3.403e+38, the largest float32, got 1e+39"),
    (["--set", "max_batch_span_multiplier=nan"], "--set max_batch_span_multiplier must be a finite number"),
    (["--set", "max_batch_span_multiplier=inf"], "--set max_batch_span_multiplier must be a finite number"),
    (["--save-every-minutes", "nan"], "--save-every-minutes must be a finite number"),
    (["--adam-lr", "-1"], "--adam-lr must be 0 or more, got -1.0"),
    (["--set", "head_lr=-0.1"], "--set head_lr must be 0 or more"),
    (["--set", "adam_eps=-1"], "--set adam_eps must be positive, got -1.0"),
    (["--set", "adam_eps=0"], "--set adam_eps must be positive"),
    (["--set", "adam_beta2=1"], "--set adam_beta2 must be in [0, 1), got 1.0"),
    (["--set", "muon_momentum=-0.5"], "--set muon_momentum must be in [0, 1)"),
    (["--val-loss-every", "-5"], "--val-loss-every must be 0 or more"),
    (["--run-name", "../../x"], "--run-name '../../x' must be one file name"),
    (["--run-name", "a/b"], "--run-name 'a/b' must be one file name"),
    (["--run-name", ".hidden"], "must be one file name"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_settings_exit_2_in_one_line(tmp_path, shared_synthetic_data, capsys, flags, words):
    assert tg.main(tiny_flags(shared_synthetic_data, tmp_path) + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_gpt.py: error:") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").glob("*.txt"))
    assert not (tmp_path.parent / "x").exists()


@pytest.mark.parametrize("which", ["log_dir", "checkpoint_dir"])
def test_a_file_where_a_directory_belongs_exits_2(tmp_path, shared_synthetic_data, capsys, which):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert tg.main(tiny_flags(shared_synthetic_data, tmp_path, **{which: str(blocker)})) == 2
    err = capsys.readouterr().err
    flag = "--" + which.replace("_", "-")
    assert err.startswith("train_gpt.py: error: cannot") and flag in err and err.count("\n") == 1, err


def test_a_mistyped_data_dir_gets_no_built_in_corpus(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir"
    assert tg.main(["--preset", "tiny", "--data-dir", str(missing), "--log-dir", str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err
    assert err == (f"train_gpt.py: error: --data-dir {missing} does not exist; the built-in corpus is built on "
                   "first use only in data/builtin (elsewhere: python data/builtin.py --out-dir DIR)\n")
    assert not missing.exists() and not (tmp_path / "no").exists()


@pytest.mark.slow
def test_a_second_run_with_the_same_name_is_refused(tmp_path, shared_synthetic_data, capsys):
    """While a process holds the run's lock (here: this one, as a running trainer would), a second run of the
    same name stops before writing anything; once the holder is gone the name is free again."""
    log_dir, ckpt_dir = tmp_path / "logs", tmp_path / "checkpoints"
    lock = runs.RunLock(ckpt_dir / "twin", log_dir)
    flags = tiny_flags(shared_synthetic_data, tmp_path, run_name="twin", num_iterations=2, val_loss_every=0)
    assert tg.main(flags) == 2
    err = capsys.readouterr().err
    assert err == (f"train_gpt.py: error: run 'twin' is already training (process {os.getpid()} holds "
                   f"{ckpt_dir / '.twin.lock'}): give this run another --run-name, or wait for that one to end\n")
    assert not (log_dir / "twin.txt").exists() and not (ckpt_dir / "twin").exists()
    lock.release()
    assert tg.main(flags) == 0
    assert (ckpt_dir / "twin" / "step_000002.pt").exists()


@pytest.mark.parametrize("shared", ["checkpoint_dir", "log_dir"])
def test_the_run_lock_covers_its_checkpoints_and_its_log(tmp_path, shared):
    """Two runs of one name that share only their checkpoint directory, or only their log directory: the second is
    refused either way (neither may overwrite the other's checkpoints or interleave its log)."""
    (ck_a, log_a), ck_b = (tmp_path / "ck", tmp_path / "la"), tmp_path / ("ck" if shared == "checkpoint_dir" else "cb")
    log_b = tmp_path / ("la" if shared == "log_dir" else "lb")
    first = runs.RunLock(ck_a / "same", log_a)
    try:
        with pytest.raises(errors.ConfigError, match="run 'same' is already training"):
            runs.RunLock(ck_b / "same", log_b)
    finally:
        first.release()
    runs.RunLock(ck_b / "same", log_b).release()  # free again


def test_the_run_lock_rule(tmp_path):
    """The rule alone: one holder per run name (a second open of the lock is refused, naming the holder), other
    names are free, and releasing frees the name."""
    logs, ckpt = tmp_path / "logs", tmp_path / "checkpoints"
    first = runs.RunLock(ckpt / "a", logs)
    with pytest.raises(errors.ConfigError, match=f"run 'a' is already training \\(process {os.getpid()} holds "):
        runs.RunLock(ckpt / "a", logs)
    other = runs.RunLock(ckpt / "b", logs)
    first.release()
    runs.RunLock(ckpt / "a", logs).release()
    other.release()
    assert sorted(p.name for p in logs.iterdir()) == [".a.lock", ".b.lock"]
    assert sorted(p.name for p in ckpt.iterdir()) == [".a.lock", ".b.lock"]  # beside the run directories


@pytest.mark.slow
def test_the_run_lock_is_released_when_its_process_dies(tmp_path):
    """flock belongs to the process: a killed trainer leaves its lock file but no lock."""
    code = ("import sys, time, pathlib; from runlib import runs; lock = runs.RunLock(pathlib.Path(sys.argv[1]), "
            "pathlib.Path(sys.argv[2])); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ck" / "r"), str(tmp_path / "logs")],
                            cwd=ROOT, env=subprocess_env(**FAST_ENV), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "locked\n"
        with pytest.raises(errors.ConfigError, match=f"process {proc.pid} holds"):
            runs.RunLock(tmp_path / "ck" / "r", tmp_path / "logs")
    finally:
        proc.kill()
        proc.wait()
    runs.RunLock(tmp_path / "ck" / "r", tmp_path / "logs").release()


# ----------------------------------------------------------------------------------------------------------------------
# Divergence: stop, save nothing from it, keep the last good checkpoint


@pytest.mark.slow
def test_divergence_stops_the_run_and_saves_nothing_non_finite(tmp_path, shared_synthetic_data, capsys):
    """The issue's case: resume a healthy run with learning rates of 1e30 and a checkpoint every step. The run
    stops with exit 3 and one line naming the last checkpoint; every checkpoint on disk is finite, latest points at
    the newest of them, and the log says why the run ended."""
    good = tiny_flags(shared_synthetic_data, tmp_path, run_name="healthy", num_iterations=3, val_loss_every=0)
    assert tg.main(good) == 0
    start = tmp_path / "checkpoints" / "healthy" / "step_000003.pt"
    capsys.readouterr()
    wild = tiny_flags(shared_synthetic_data, tmp_path, run_name="healthy", num_iterations=8, val_loss_every=0,
                      save_every=1, train_loss_every=0)
    lrs = ["--muon-lr", "1e30", "--adam-lr", "1e30", "--set", "head_lr=1e30", "--set", "scalar_lr=1e30"]
    assert tg.main(wild + lrs + ["--resume", str(start)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("train_gpt.py: error: training diverged: ") and err.count("\n") == 1, err
    saved = sorted(start.parent.glob("step_*.pt"))
    assert len(saved) < 8 - 3 + 1  # it stopped before the end
    assert all(not checkpoints.nonfinite_tensors({k: c[k] for k in ("model", "optimizers")})
               for c in map(checkpoints.load_checkpoint, saved))
    assert (tmp_path / "checkpoints" / "latest").resolve() == saved[-1].resolve()
    assert f"the run's last checkpoint is {saved[-1]}" in err
    log = (tmp_path / "logs" / "healthy.txt").read_text(encoding="utf-8").splitlines()
    assert log[-1] == "stopped: " + err[len("train_gpt.py: error: "):].rstrip("\n")


@pytest.mark.slow
def test_a_non_finite_state_is_never_saved(tmp_path, shared_synthetic_data, capsys, monkeypatch):
    """Step 4's update leaves NaN weights behind a finite loss (an overflow in the optimiser): the save after it
    finds them, writes nothing, and latest stays at step 2."""
    real = tg.Trainer.train_step

    def overflowing(self, batch):
        loss = real(self, batch)
        if self.step == 4:
            with torch.no_grad():
                self.model.lm_head.weight[0, 0] = float("nan")
        return loss
    monkeypatch.setattr(tg.Trainer, "train_step", overflowing)
    flags = tiny_flags(shared_synthetic_data, tmp_path, run_name="overflow", num_iterations=6, save_every=2,
                       val_loss_every=0)
    assert tg.main(flags) == 3
    err = capsys.readouterr().err
    run_dir = tmp_path / "checkpoints" / "overflow"
    assert "training diverged: the state after step 4 holds non-finite values (model.lm_head.weight)" in err
    assert f"the run's last checkpoint is {run_dir / 'step_000002.pt'}" in err
    assert [p.name for p in run_dir.glob("step_*.pt")] == ["step_000002.pt"]
    assert (tmp_path / "checkpoints" / "latest").resolve() == (run_dir / "step_000002.pt").resolve()


@pytest.mark.parametrize("where", ["train_loss_line", "validation"])
@pytest.mark.slow
def test_a_non_finite_loss_is_caught_where_the_loop_syncs(tmp_path, shared_synthetic_data, capsys, monkeypatch,
                                                          where):
    """A NaN loss at step 3 (without a save to catch it): the next train-loss line or validation stops the run."""
    real = tg.Trainer.train_step

    def poisoned(self, batch):
        loss = real(self, batch)
        if self.step == 3:  # what a NaN in the step's forward leaves: the recorded step and a NaN loss
            self.first_nonfinite.fill_(3)
            return loss * float("nan")
        return loss
    monkeypatch.setattr(tg.Trainer, "train_step", poisoned)
    every = dict(train_loss_every=2, val_loss_every=0) if where == "train_loss_line" else dict(val_loss_every=4)
    flags = tiny_flags(shared_synthetic_data, tmp_path, run_name="nan", num_iterations=8, save_final=False, **every)
    assert tg.main(flags) == 3
    err = capsys.readouterr().err
    assert "training diverged: the training loss of step 3 was not finite" in err
    assert "the run has no checkpoint" in err
    steps = [line for line in (tmp_path / "logs" / "nan.txt").read_text(encoding="utf-8").splitlines()
             if line.startswith("step:")]
    assert steps[-1].startswith("step:4/8")  # it stopped at the first sync after step 3, with that step's line


def test_the_first_non_finite_step_is_recorded_on_the_device(tmp_path, shared_synthetic_data):
    hp = tiny_hp(shared_synthetic_data, tmp_path)
    trainer = tg.Trainer(hp, torch.device("cpu"), train_files=tg.find_shards(hp.data_dir, hp.train_files, "train"))
    batch = trainer.loader.next_batch(torch.device("cpu"))
    trainer.train_step(batch)
    trainer.check_finite()  # a healthy step: nothing to report
    assert trainer.first_nonfinite.item() == -1
    with torch.no_grad():
        trainer.model.lm_head.weight.fill_(float("nan"))
    trainer.train_step(batch)
    trainer.train_step(batch)
    assert trainer.first_nonfinite.item() == 2  # the first bad step, not the last
    with pytest.raises(errors.DivergedError, match="the training loss of step 2 was not finite"):
        trainer.check_finite()


@pytest.mark.parametrize("target,val_files,val_tokens,expected", [
    (3.28, "fineweb_val_*.bin", 10_485_760, True),
    (3.28, "/data/fineweb10B/fineweb_val_*.bin", 10_485_760, True),  # an absolute glob of the same shard
    (2.92, "fineweb_val_*.bin", 10_485_760, True),
    (3.28, "code_val_*.bin", 10_485_760, False),  # other text: the record target says nothing
    (3.28, "fineweb_val_*.bin", 1_048_576, False),  # fewer validation tokens: not the record's measurement
    (2.92, "builtin_val_*.bin", 16_384, False),
    (4.5, "code_val_*.bin", 1_048_576, True),  # a target of one's own applies to any data
    (0.0, "fineweb_val_*.bin", 10_485_760, False),  # no target
])
def test_record_targets_compare_only_on_fineweb_validation(target, val_files, val_tokens, expected):
    assert runlog.target_comparable(target, val_files, val_tokens) is expected


def test_import_has_no_side_effects(tmp_path):
    code = ("import os, sys; sys.argv = ['x', '--bogus']; import train_gpt, torch; "
            "print(torch.distributed.is_initialized(), torch.cuda.is_initialized(), "
            "os.environ.get('MALLOC_MMAP_MAX_'), train_gpt._compiled_flex); print('ok')")
    env = subprocess_env()
    env.pop("MALLOC_MMAP_MAX_", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False", "None", "None", "ok"]
    assert list(tmp_path.iterdir()) == []  # no logs/ or checkpoints/ created


# ----------------------------------------------------------------------------------------------------------------------
# One in-process run: the log file, and learning

LOG_STEPS = 16


@pytest.fixture(scope="module")
def logged_run(shared_synthetic_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("logged")
    hp = tiny_hp(shared_synthetic_data, work, num_iterations=LOG_STEPS, val_loss_every=8, train_loss_every=3,
                 save_final=False, run_name="logged")
    summary = tg.train(hp)
    return hp, summary, work / "logs" / "logged.txt"


@pytest.mark.slow
def test_log_file_layout(logged_run):
    hp, summary, log_path = logged_run
    text = log_path.read_text(encoding="utf-8")
    source = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    assert text.startswith(source)
    assert text.splitlines()[:20] == source.splitlines()[:20]
    rest = text[len(source):].lstrip("\n").splitlines()
    rule = "=" * 100
    assert rest[0] == rule
    assert rest[1].startswith("config {")
    end = rest.index(rule, 1)
    config = json.loads("\n".join(rest[1:end])[len("config "):])
    flops = tg.matmul_flops_per_token(tg.GPTConfig.from_hyperparameters(hp))
    assert config == {**asdict(hp), "matmul_flops_per_token": flops}  # the settings, and the FLOPs for MFU
    env_end = rest.index(rule, end + 1)
    env = rest[end + 1:env_end]
    assert env[0].startswith(f"python {platform.python_version()} ")
    assert any(line.startswith(f"torch {torch.__version__}") for line in env)

    body = rest[env_end + 1:]
    step_lines = [line for line in body if line.startswith("step:")]
    for line in step_lines:
        assert TRAIN_LINE.match(line) or VAL_LINE.match(line), line
    val_steps = [int(line.split("/")[0][5:]) for line in step_lines if VAL_LINE.match(line)]
    train_steps = [int(line.split("/")[0][5:]) for line in step_lines if TRAIN_LINE.match(line)]
    assert val_steps == [0, 8, 16]
    assert train_steps == list(range(1, LOG_STEPS + 1))
    with_loss = [int(line.split("/")[0][5:]) for line in step_lines if "train_loss:" in line]
    assert with_loss == [3, 6, 9, 12, 15]
    assert all(line.split("/")[1].split()[0] == str(LOG_STEPS) for line in step_lines)

    summary_lines = [line for line in body if line.startswith("final ")]
    assert len(summary_lines) == 1 and body[-1] == summary_lines[0] and body[-2] == rule
    m = SUMMARY_LINE.match(summary_lines[0])
    assert m, summary_lines[0]
    train, val = parse_log(log_path)
    assert float(m.group(1)) == val[LOG_STEPS]
    assert int(m.group(3)) == LOG_STEPS
    tokens = LOG_STEPS * hp.seqs_per_step * hp.train_seq_len
    assert int(m.group(4).replace(",", "")) == tokens
    assert int(m.group(5).replace(",", "")) == pytest.approx(tokens / summary["train_time_s"], abs=1)
    assert m.group(7) == ("no target" if hp.target_val_loss <= 0 else m.group(7))
    assert float(m.group(6)) > 0
    assert summary["final_val_loss"] == pytest.approx(val[LOG_STEPS], abs=5e-5)
    assert summary["tokens"] == tokens and summary["steps"] == LOG_STEPS


@pytest.mark.slow
def test_tiny_run_learns(logged_run):
    hp, summary, log_path = logged_run
    train, val = parse_log(log_path)
    # the head starts at zero: every logit is equal and the loss is exactly ln(vocab)
    assert val[0] == pytest.approx(math.log(hp.vocab_size), abs=2e-4)
    assert val[8] < val[0] - 1.0
    assert val[LOG_STEPS] < val[8] - 0.5
    assert val[LOG_STEPS] < math.log(hp.vocab_size) - 3.0
    assert train[15] < train[3] - 2.0
    if hp.target_val_loss > 0:
        assert summary["reached_target"] == (summary["final_val_loss"] <= hp.target_val_loss)
    else:  # the tiny preset has no track target
        assert summary["reached_target"] is None


@pytest.mark.parametrize("doc_len,unaligned", [(2000, 3), (100, 0)])
@pytest.mark.slow
def test_unaligned_steps_are_counted_and_logged(shared_synthetic_data, tmp_path, doc_len, unaligned):
    """Documents of 2,000 tokens against the 1,024-token look-ahead of two 256-token sequences: no step can start
    both at a BOS (the record's loader would stop), every step falls back, and the run says so. Documents of 100
    tokens align every step, and the log has no loader line."""
    data = tmp_path / "data"
    docs = np.arange(160_000, dtype=np.int64) % 1000
    docs[::doc_len] = tg.BOS_ID
    write_shard(data / "docs_train_000001.bin", docs)
    write_shard(data / "docs_val_000000.bin", np.asarray(load_shard(shared_synthetic_data / "syn_val_000000.bin")))
    hp = tiny_hp(data, tmp_path, num_iterations=3, val_loss_every=0, save_final=False, run_name="docs",
                 train_files="docs_train_*.bin", val_files="docs_val_*.bin")
    summary = tg.train(hp)
    assert summary["unaligned_steps"] == unaligned
    loader_lines = [line for line in (tmp_path / "logs" / "docs.txt").read_text(encoding="utf-8").splitlines()
                    if line.startswith("loader:")]
    expected = f"loader: {unaligned} step(s) of this session started sequences inside documents"
    assert [line[:len(expected)] for line in loader_lines] == ([expected] if unaligned else [])


# ----------------------------------------------------------------------------------------------------------------------
# Distributed equivalence (gloo, CPU)


@pytest.mark.slow
def test_a_two_process_config_error_is_one_line(shared_synthetic_data, tmp_path):
    """Both workers meet the error; one says it, and the launcher adds no traceback of its own."""
    flags = tiny_flags(shared_synthetic_data, tmp_path, seqs_per_step=3)
    res = subprocess.run([sys.executable, str(ROOT / "lib" / "torchrun.py"), "--standalone", "--nproc_per_node=2",
                          str(ROOT / "train_gpt.py"), *flags], cwd=ROOT, env=subprocess_env(**FAST_ENV),
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 2
    assert res.stderr == ("train_gpt.py: error: --set seqs_per_step 3 must be a multiple of the number of processes "
                          "(2) so every process accumulates the same number of sequences\n"), res.stderr


@pytest.mark.slow
def test_a_sigterm_to_the_launcher_stops_the_workers_with_a_checkpoint_quietly(shared_synthetic_data, tmp_path):
    """SIGTERM to lib/torchrun.py (what docker stop, Slurm or a CI runner sends): the workers finish the step, save
    and say so; the launcher exits 143 without a traceback of its own."""
    flags = tiny_flags(shared_synthetic_data, tmp_path, run_name="term", num_iterations=500, val_loss_every=0,
                       save_every_minutes=0)
    log = tmp_path / "logs" / "term.txt"
    with open(tmp_path / "term.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "lib" / "torchrun.py"), "--standalone",
                                 "--nproc_per_node=2", str(ROOT / "train_gpt.py"), *flags], cwd=ROOT,
                                env=subprocess_env(**FAST_ENV), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_text(log, "step:3/500", proc)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 143
        finally:
            proc.kill()
    text = (tmp_path / "term.out").read_text()
    assert "Traceback" not in text and "SignalException" not in text, text[-3000:]
    (line,) = [x for x in text.splitlines() if x.startswith("train_gpt.py: stopped by SIGTERM at step ")]
    step = int(line.split(" at step ")[1].split()[0])
    assert f"saved checkpoint {tmp_path / 'checkpoints' / 'term' / f'step_{step:06d}.pt'}" in log.read_text()
    assert "Resume with: torchrun --standalone --nproc_per_node=2 " in line


def test_the_launcher_gives_workers_time_to_save_at_a_signal(monkeypatch):
    sys.path.insert(0, str(ROOT / "lib"))
    try:
        import torchrun
    finally:
        sys.path.remove(str(ROOT / "lib"))
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert torchrun.with_shutdown_timeout(["--standalone", "x.py"]) == [
        f"--shutdown-timeout={torchrun.SHUTDOWN_TIMEOUT_S}", "--standalone", "x.py"]
    assert torchrun.SHUTDOWN_TIMEOUT_S > 30  # torchrun's own default, shorter than a slow step and a save
    assert torchrun.with_shutdown_timeout(["--shutdown_timeout=5", "x.py"]) == ["--shutdown_timeout=5", "x.py"]
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "60")
    assert torchrun.with_shutdown_timeout(["x.py"]) == ["x.py"]


@pytest.mark.slow
def test_the_launcher_reports_a_worker_crash(tmp_path):
    """A failure the worker did not explain (here: an uncaught exception) keeps torchrun's report of it."""
    script = tmp_path / "crash.py"
    script.write_text("import os, sys\nsys.exit(7 if os.environ['RANK'] == '1' else 0)\n")
    res = subprocess.run([sys.executable, str(ROOT / "lib" / "torchrun.py"), "--standalone", "--nproc_per_node=2",
                          str(script)], cwd=ROOT, env=subprocess_env(**FAST_ENV), capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 7
    assert "crash.py FAILED" in res.stderr and "exitcode  : 7" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_two_processes_match_one(shared_synthetic_data, tmp_path):
    steps = 6
    # a rolling checkpoint falls due at every step: process 0 decides, both take part in the collective saves, each
    # replacing the one before (the last at step 5: never one at the last step)
    common = dict(num_iterations=steps, train_loss_every=1, val_loss_every=3, seqs_per_step=2, val_tokens=2048,
                  save_final=False, save_every_minutes=1e-6)
    env = subprocess_env(**FAST_ENV)
    with open(tmp_path / "one.out", "wb") as out:  # both at once: the single process runs beside the two workers
        one = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py"),
                                *tiny_flags(shared_synthetic_data, tmp_path / "one", run_name="one", **common)],
                               cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            two = subprocess.run([sys.executable, str(ROOT / "lib" / "torchrun.py"), "--standalone",  # the wrappers'
                                  "--nproc_per_node=2", str(ROOT / "train_gpt.py"),
                                  *tiny_flags(shared_synthetic_data, tmp_path / "two", run_name="two", **common)],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
            one.wait(timeout=400)
        finally:
            if one.poll() is None:
                one.kill()
                one.wait()
    assert one.returncode == 0, (tmp_path / "one.out").read_text()
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    log_two = (tmp_path / "two" / "logs" / "two.txt").read_text()
    assert "run two: 2 process(es) on cpu, 1 micro-step(s)" in log_two
    assert "run one: 1 process(es) on cpu, 2 micro-step(s)" in (tmp_path / "one" / "logs" / "one.txt").read_text()
    train_one, val_one = parse_log(tmp_path / "one" / "logs" / "one.txt")
    train_two, val_two = parse_log(tmp_path / "two" / "logs" / "two.txt")
    assert sorted(train_one) == sorted(train_two) == list(range(1, steps + 1))
    assert sorted(val_one) == sorted(val_two) == [0, 3, 6]
    # equal within 1e-4, plus one unit of the log's 4-decimal rounding
    for step in train_one:
        assert train_two[step] == pytest.approx(train_one[step], abs=2e-4), step
    for step in val_one:
        assert val_two[step] == pytest.approx(val_one[step], abs=2e-4), step
    assert train_one[steps] < train_one[1] - 0.1  # it trained, so the comparison means something
    for run in ("one", "two"):
        assert [p.name for p in (tmp_path / run / "checkpoints" / run).iterdir()] == ["step_000005.pt"]
    rolled = torch.load(tmp_path / "two" / "checkpoints" / "two" / "step_000005.pt", weights_only=True)
    single = torch.load(tmp_path / "one" / "checkpoints" / "one" / "step_000005.pt", weights_only=True)
    assert rolled["step"] == single["step"] == 5
    for name, w in single["model"].items():
        torch.testing.assert_close(rolled["model"][name], w, atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------------------------------
# torch.compile on CPU


@pytest.mark.slow
def test_compiled_forward_backward_matches_eager():
    torch.manual_seed(0)
    cfg = tg.GPTConfig(vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, head_dim=16, no_attn_layer=-1)
    eager = tg.GPT(cfg).configure(torch.device("cpu"), "dense", fp8=False)
    with torch.no_grad():  # non-zero head, projections and gates so every gradient is non-trivial
        for name, p in eager.named_parameters():
            if name.endswith(("lm_head.weight", "c_proj.weight", "gate.weight")):
                p.normal_(0, 0.05)
    compiled_model = tg.GPT(cfg).configure(torch.device("cpu"), "dense", fp8=False)
    compiled_model.load_state_dict(eager.state_dict())
    compiled_model.reserve_rotary(256)  # as the trainer does: the compiled graph reads the tables from buffers
    compiled = torch.compile(compiled_model, dynamic=False)
    tokens = torch.randint(0, cfg.vocab_size, (257,))  # one document of two blocks: the 1-block window shapes the mask
    inputs, targets = tokens[:-1].to(torch.int32), tokens[1:].long()
    window = torch.tensor(1, dtype=torch.int32)

    loss_e = eager(inputs, targets, window)  # training mode: summed over the 256 tokens
    loss_e.backward()
    loss_c = compiled(inputs, targets, window)
    loss_c.backward()
    assert torch.isfinite(loss_c)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0)  # a sum of 256 fp32 losses of about 7
    for name in ("lm_head.weight", "blocks.0.attn.qkv_w", "blocks.0.attn.gate.weight", "blocks.1.mlp.c_fc",
                 "embed.weight", "skip_weights"):
        ge = eager.get_parameter(name).grad
        gc = compiled_model.get_parameter(name).grad
        assert ge is not None and gc is not None and ge.abs().sum() > 0, name
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.slow
def test_trainer_reserves_rotary_tables_for_its_longest_sequence(shared_synthetic_data, tmp_path):
    for train_len, val_len in ((256, 1024), (2048, 512)):
        hp = tiny_hp(shared_synthetic_data, tmp_path, train_seq_len=train_len, val_seq_len=val_len,
                     val_tokens=val_len)
        trainer = tg.Trainer(hp, torch.device("cpu"))
        assert trainer.model.rope_cos.shape == (max(train_len, val_len), hp.head_dim // 2)


# ----------------------------------------------------------------------------------------------------------------------
# Weights & Biases, offline


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline run file (run-<id>.wandb): a LevelDB-style log of 32 KiB blocks after a
    7-byte header; each piece has a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        piece = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(piece)
        elif kind == 2:
            pending = piece
        elif kind == 3:
            pending += piece
        elif kind == 4:
            out.append(pending + piece)
            pending = b""
    records = []
    for raw in out:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


@pytest.mark.slow
def test_wandb_offline_logs_metrics(shared_synthetic_data, tmp_path, monkeypatch):
    import wandb  # noqa: F401  (a test requirement: wandb is in requirements.txt)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # the trainer's dir= (its log dir) must win
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    hp = tiny_hp(shared_synthetic_data, tmp_path, num_iterations=2, train_loss_every=1, val_loss_every=0,
                 val_tokens=1024, save_final=False, wandb=True, run_name="wb")
    summary = tg.train(hp)
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, sorted(str(p) for p in tmp_path.rglob("*"))
    run_files = list(runs[0].glob("run-*.wandb"))
    assert len(run_files) == 1
    deadline = time.monotonic() + 30  # wandb's writer is a separate process: under load it may trail finish()
    while True:
        records = read_wandb_records(run_files[0])
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "run" in kinds and "history" in kinds and kinds[-1] == "exit"

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_id == "wb" and run.project == hp.wandb_project
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model_dim"] == 64 and config["num_iterations"] == 2 and config["wandb"] is True

    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history[row["_step"]] = row
    train, val = parse_log(tmp_path / "logs" / "wb.txt")
    assert sorted(history) == [1, 2]
    for step in (1, 2):
        assert history[step]["train/loss"] == pytest.approx(train[step], abs=1e-4)
        assert history[step]["window_blocks"] == tg.window_blocks(step - 1, hp)
        assert history[step]["lr_multiplier"] == pytest.approx(tg.lr_multiplier(step - 1, hp))
        assert history[step]["tokens_per_s"] > 0
        mult = tg.lr_multiplier(step - 1, hp)
        for key, base in (("lr/muon", hp.muon_lr), ("lr/embed", hp.adam_lr), ("lr/head", hp.head_lr),
                          ("lr/scalar", hp.scalar_lr)):
            assert history[step][key] == pytest.approx(base * mult), key
        assert history[step]["muon_momentum"] == pytest.approx(tg.muon_momentum(step - 1, hp))
        assert history[step]["step_avg_ms"] == pytest.approx(history[step]["train_time_ms"] / step)
    assert history[2]["val/loss"] == pytest.approx(summary["final_val_loss"], abs=1e-6)
    assert history[2]["val/loss"] == pytest.approx(val[2], abs=1e-4)
    assert history[2]["final/val_loss"] == pytest.approx(summary["final_val_loss"], abs=1e-6)
    final = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            final.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                          for item in r.summary.update})
    assert final["val/loss"] == pytest.approx(summary["final_val_loss"], abs=1e-6)
    assert "artifact" in kinds  # the run log is attached
    assert not (tmp_path / "elsewhere").exists() or not list((tmp_path / "elsewhere").rglob("*.wandb"))


@pytest.mark.parametrize("capability,ok", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_training_refuses_gpus_without_bfloat16(monkeypatch, capability, ok):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    if ok:
        assert devices.resolve_device("auto", 1) == torch.device("cuda", 1)
        return
    with pytest.raises(errors.ConfigError, match=rf"GPU 1 \(Fake GPU\) has compute capability "
                                             rf"{capability[0]}\.{capability[1]}; training needs 8\.0"):
        devices.resolve_device("cuda", 1)


def test_cpu_threads_are_the_cores_other_work_leaves_free(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices, "busy_cores", lambda: 1.3)  # one of 2 cores busy with something else
    assert devices.choose_cpu_threads(2) == (1, "2 core(s), 1.3 busy with other work; OMP_NUM_THREADS=N chooses")
    monkeypatch.setattr(devices, "busy_cores", lambda: 0.2)
    assert devices.choose_cpu_threads(2) == (2, "2 core(s) free; OMP_NUM_THREADS=N chooses")
    monkeypatch.setattr(devices, "busy_cores", lambda: 7.9)  # a loaded machine: still one thread
    assert devices.choose_cpu_threads(2)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert devices.choose_cpu_threads(2) == (torch.get_num_threads(), "OMP_NUM_THREADS")  # set: not second-guessed


def test_busy_cores_reads_the_machine():
    busy = devices.busy_cores(0.05)
    if os.path.exists("/proc/stat"):
        assert busy is not None and 0 <= busy <= os.cpu_count()
    else:
        assert busy is None


@pytest.mark.slow
def test_a_signal_during_the_warm_up_stops_at_once_saying_nothing_was_saved(shared_synthetic_data, tmp_path):
    """Before the loop nothing new can be saved: the stop is immediate (not at the end of a warm-up that may be a
    compile of minutes), one line, the command that starts the run again."""
    flags = tiny_flags(shared_synthetic_data, tmp_path, run_name="warm", warmup_steps=10_000, num_iterations=5)
    with open(tmp_path / "warm.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py"), *flags], cwd=ROOT,
                                env=subprocess_env(**FAST_ENV), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_text(tmp_path / "warm.out", "run warm: ", proc)
            time.sleep(1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 143
        finally:
            proc.kill()
    text = (tmp_path / "warm.out").read_text()
    assert "Traceback" not in text and "warm-up: " not in text  # it did not finish the 10,000 steps first
    (line,) = [x for x in text.splitlines() if "stopped by SIGTERM" in x]
    assert line.startswith("train_gpt.py: stopped by SIGTERM during the compile warm-up; nothing was saved (no step "
                           "had finished). Start again with: ")
    assert line.split(": ", 1)[1] in (tmp_path / "logs" / "warm.txt").read_text()  # the log says it too


def test_a_run_too_big_for_the_cpu_is_refused_unless_asked_for():
    """The estimate is the run's matmul FLOPs at CPU_FLOPS_PER_CORE on every core: the tiny preset fits 2 cores (about
    4 minutes), the record's run does not (weeks), nor does the tiny model for 100,000 steps."""
    tiny = tg.preset_hyperparameters("tiny")
    tg.check_cpu_budget(tiny, 2)
    seconds = tiny.num_iterations * tiny.global_batch_tokens * tg.matmul_flops_per_token(
        tg.GPTConfig.from_hyperparameters(tiny)) / (2 * tg.CPU_FLOPS_PER_CORE)
    assert 60 < seconds < 600  # measured: 226 s of training on 2 cores (README)
    with pytest.raises(tg.ConfigError, match=r"--preset speedrun on the CPU: 1,695 steps of 393,216 tokens would take "
                                             r"about \d+ days on 2 core\(s\).*; --preset tiny trains in minutes"):
        tg.check_cpu_budget(tg.preset_hyperparameters("speedrun"), 2)
    long = dataclasses.replace(tiny, num_iterations=100_000)
    with pytest.raises(tg.ConfigError, match="fewer --num-iterations, a GPU runs it, and --yes starts it"):
        tg.check_cpu_budget(long, 2)
    tg.check_cpu_budget(dataclasses.replace(long, cpu_ok=True), 2)  # --yes
    assert tg.matmul_flops_per_token(tg.GPTConfig.from_hyperparameters(tg.Hyperparameters())) == pytest.approx(
        0.727e9, rel=1e-3)  # FACTS: 0.727 GFLOP of matmuls per token at record 28's shapes
