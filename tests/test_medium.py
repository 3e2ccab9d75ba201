"""Track 2 (train_gpt_medium.py): only sizes, batch, schedule and learning rates differ from track 1."""

import dataclasses
import inspect
import json

import pytest
import torch

import train_gpt as tg
import train_gpt_medium as medium
from conftest import parse_log, tiny_flags


def test_medium_preset_has_the_track2_recipe():
    hp = tg.parse_args([], medium.PRESETS, "medium")
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.head_dim) == (16, 1024, 8, 128)
    assert hp.train_seq_len == 64 * 1024 and hp.seqs_per_step == 8 and hp.global_batch_tokens == 8 * 64 * 1024
    assert hp.num_iterations == 5960 and hp.cooldown_frac == 0.7
    assert (hp.muon_lr, hp.adam_lr, hp.head_lr, hp.scalar_lr) == (0.025, 0.3, 1 / 320, 0.015)
    assert hp.target_val_loss == 2.92 and hp.preset == "medium"
    # Record8's per-block windows: long for blocks 0, 4, 11 and 15
    assert [i for i, k in enumerate(hp.window_pattern) if k == "L"] == [0, 4, 11, 15] and len(hp.window_pattern) == 16
    # its loss is summed over each GPU's 64K tokens and averaged over 8: one GPU scales each micro-step by 1/8
    assert tg.loss_scale(hp, 1) == 1 / 8 and tg.loss_scale(hp, 8) == 1


def test_the_docstring_names_the_record_and_its_deviations():
    doc = medium.__doc__
    assert "2025-04-22_Record8/075_640429f2-e726-4e83-aa27-684626239ffc.txt" in doc
    assert "It is not that record's function or update rule" in doc


def test_everything_else_is_track1():
    hp = tg.parse_args([], medium.PRESETS, "medium")
    track1 = tg.Hyperparameters()
    for f in dataclasses.fields(tg.Hyperparameters):
        if f.name not in medium.MEDIUM and f.name != "preset":
            assert getattr(hp, f.name) == getattr(track1, f.name), f.name


def test_no_second_copy_of_the_trainer():
    classes = [name for name, obj in vars(medium).items() if inspect.isclass(obj) and obj.__module__ == medium.__name__]
    assert classes == []
    assert medium.main.__code__.co_names.count("main") == 1  # it hands over to train_gpt.main


def test_flags_override_the_medium_preset():
    hp = tg.parse_args(["--num-iterations", "10", "--muon-lr", "0.01"], medium.PRESETS, "medium")
    assert hp.num_iterations == 10 and hp.muon_lr == 0.01 and hp.num_layers == 16


def test_medium_model_size():
    hp = tg.preset_hyperparameters("medium", medium.PRESETS)
    with torch.device("meta"):
        model = tg.GPT(tg.GPTConfig.from_hyperparameters(hp))
    d = hp.model_dim
    attn_blocks = hp.num_layers - (1 if 0 <= hp.no_attn_layer < hp.num_layers else 0)
    matrices = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim >= 2)
    gate = hp.num_heads * (d // 64)  # the attention gate: heads x (model_dim / 64)
    assert matrices == attn_blocks * (4 * d * d + gate) + hp.num_layers * 8 * d * d


@pytest.mark.slow
def test_medium_runs_and_logs_both_sources(shared_synthetic_data, tmp_path, capsys):
    flags = tiny_flags(shared_synthetic_data, tmp_path, num_iterations=3, run_name="med")
    flags = [f for f in flags if f not in ("--preset", "tiny")]
    # small sizes so that it runs on a CPU in seconds; everything not given comes from the medium preset
    rc = medium.main(flags + ["--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    log = (tmp_path / "logs" / "med.txt").read_text()
    assert log.startswith(inspect.getsource(medium).splitlines()[0])
    assert "# train_gpt.py\n" + inspect.getsource(tg).splitlines()[0] in log
    config = json.loads(log.rsplit("\nconfig ", 1)[1].split("\n" + "=" * 100, 1)[0])
    assert config["preset"] == "medium" and config["cooldown_frac"] == 0.7 and config["target_val_loss"] == 2.92
    train, val = parse_log(tmp_path / "logs" / "med.txt")
    assert sorted(val) == [0, 3]
    # the record target holds for FineWeb's validation set only; this run validated on synthetic tokens
    assert "target 2.92 not compared: it holds for the first 10,485,760 tokens of fineweb_val_*.bin" in log


def test_medium_help_shows_its_defaults(capsys):
    try:
        medium.main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "train_gpt_medium.py" in out and "(medium default: 5960)" in out
