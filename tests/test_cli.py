"""train_gpt.py's command line: the flags a speedrun user turns, --set FIELD=VALUE for every other field, --help's
list of both, and --print-config (the resolved settings, for people and for the wrappers)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import asdict, fields

import numpy as np
import pytest

from runlib import cli, devices, errors
import train_gpt as tg
import train_gpt_medium as medium
from conftest import ROOT, subprocess_env
from data.fineweb import shards_needed


def main_output(argv, capsys, **kw) -> tuple[int, str, str]:
    rc = tg.main(argv, **kw)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(argv, capsys) -> str:
    """train_gpt.py ARGV refused: exit 2 and one line."""
    try:
        rc, out, err = main_output(argv, capsys)
    except SystemExit as e:  # argparse's own exit
        rc, (out, err) = e.code, capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("train_gpt.py: error: "), (rc, err)
    return err.rstrip("\n")


# ----------------------------------------------------------------------------------------------------------------------
# Flags and --set


def test_flags_and_set_fields_split_the_fields_between_them():
    names = [f.name for f in fields(tg.Hyperparameters)]
    assert set(tg.FLAG_FIELDS) <= set(names) and 20 <= len(tg.FLAG_FIELDS) <= 25
    assert tg.CLI.set_fields() == [n for n in names if n not in tg.FLAG_FIELDS]
    options = {s for a in tg.build_arg_parser()._actions for s in a.option_strings}
    for name in names:
        if name in tg.FLAG_FIELDS:
            assert tg.CLI.field_flag(name) in options, name
        else:
            assert "--" + name.replace("_", "-") not in options, name  # one spelling per field
    assert {"--set", "--print-config", "--preset", "--resume"} <= options


def test_set_parses_each_type():
    hp = tg.parse_args(["--preset", "tiny", "--set", "model_dim=64", "--set", "cooldown_frac=0.3", "--set",
                        "adam_eps=1e-8", "--set", "window_pattern=SSL", "--set", "no_attn_layer=-1"])
    assert (hp.model_dim, hp.cooldown_frac, hp.adam_eps, hp.window_pattern, hp.no_attn_layer) == (64, 0.3, 1e-8,
                                                                                                   "SSL", -1)
    assert type(hp.model_dim) is int and type(hp.cooldown_frac) is float
    assert hp.num_layers == 6 and hp.preset == "tiny"  # the rest from the preset
    # the types no --set field has today, through the same parser: switches and optional text
    assert tg.CLI.parse_value("compile", "false") is False and tg.CLI.parse_value("fp8", "True") is True
    assert tg.CLI.parse_value("run_name", "none") is None and tg.CLI.parse_value("run_name", "x") == "x"
    with pytest.raises(errors.ConfigError, match="compile takes true or false, got 'no'"):
        tg.CLI.parse_value("compile", "no")


def test_set_repeated_later_wins_and_order_against_flags_does_not_matter():
    hp = tg.parse_args(["--set", "model_dim=64", "--set", "num_layers=2", "--set", "model_dim=96"])
    assert (hp.model_dim, hp.num_layers) == (96, 2)
    assert tg.parse_args(["--set", "num_layers=3", "--preset", "a10"]).num_layers == 3  # before --preset: still wins
    assert tg.parse_args(["--preset", "a10", "--set", "seqs_per_step=16"]).train_seq_len == 12 * 1024


def test_set_overrides_a_resumed_checkpoints_settings(tmp_path):
    import torch

    saved = dataclasses.replace(tg.preset_hyperparameters("tiny"), model_dim=96, num_iterations=10)
    path = tmp_path / "step_000005.pt"
    torch.save({"format": tg.CHECKPOINT_FORMAT, "version": tg.CHECKPOINT_VERSION,
                "hyperparameters": asdict(saved)}, path)
    hp = tg.parse_args(["--resume", str(path), "--set", "num_layers=3", "--num-iterations", "20"])
    assert (hp.model_dim, hp.num_layers, hp.num_iterations, hp.preset) == (96, 3, 20, "tiny")
    assert hp.resume == str(path)
    # the checkpoint's own preset changes nothing; another one would replace the run's settings: refused
    assert tg.parse_args(["--preset", "tiny", "--resume", str(path)]).model_dim == 96
    with pytest.raises(errors.ConfigError, match=r"^--preset speedrun with --resume: .* was trained with --preset "
                                                 r"tiny, and a resumed run keeps its checkpoint's settings; leave "
                                                 r"--preset out"):
        tg.parse_args(["--preset", "speedrun", "--resume", str(path)])


@pytest.mark.parametrize("argv,words", [
    (["--set", "model_dim=abc"], "--set model_dim=abc: model_dim takes a whole number, got 'abc'"),
    (["--set", "model_dim=1.5"], "model_dim takes a whole number, got '1.5'"),
    (["--set", "cooldown_frac=half"], "--set cooldown_frac=half: cooldown_frac takes a number, got 'half'"),
    (["--set", "modeldim=64"], "--set modeldim=64: no field 'modeldim' (did you mean model_dim?); --set takes "
                               "seqs_per_step, max_batch_span_multiplier, "),
    (["--set", "num_iterations=5"], "num_iterations has a flag of its own, --num-iterations"),
    (["--set", "compile=false"], "compile has a flag of its own, --no-compile"),
    (["--set", "model_dim"], "--set model_dim: expected FIELD=VALUE"),
    (["--model-dim", "64"], "unrecognized arguments: --model-dim 64; --model-dim is --set model_dim=VALUE"),
    (["--num-iterations", "many"], "argument --num-iterations: invalid int value: 'many'"),
    (["--set"], "argument --set: expected one argument"),
])
def test_bad_set_or_flag_is_one_line(argv, words, capsys):
    line = one_line_error(argv, capsys)
    assert words in line, line


def test_unknown_field_lists_every_set_field(capsys):
    line = one_line_error(["--set", "bogus=1"], capsys)
    assert line.endswith("--set takes " + ", ".join(tg.CLI.set_fields()))
    assert "did you mean" not in line


def test_help_lists_the_flags_then_every_set_field_with_default_and_meaning():
    text = tg.build_arg_parser().format_help()
    helps, defaults = tg.CLI.field_help(), tg.Hyperparameters()
    table = text[text.index("--set FIELD=VALUE (repeatable)"):text.index("\nExamples:\n")]
    assert "python train_gpt.py --preset auto --print-config" in text[text.index("\nExamples:\n"):]
    assert "  a10: train_seq_len=12288, seqs_per_step=32, val_seq_len=65536" in text  # what each preset sets
    rows = {line.split()[0]: line for line in table.splitlines() if line.startswith("  ") and not line[2] == " "}
    assert list(rows) == tg.CLI.set_fields()
    for name, row in rows.items():
        value = getattr(defaults, name)
        assert row.split()[1] == (str(value).lower() if isinstance(value, bool) else str(value)), row
        assert " ".join(helps[name].split()[:3]) in " ".join(row.split()), row  # the field's own comment
    for name in tg.FLAG_FIELDS:
        assert tg.CLI.field_flag(name) in text[:text.index("--set FIELD=VALUE (repeatable)")], name
    medium_help = tg.build_arg_parser(medium.PRESETS, "medium").format_help()
    assert "their medium defaults" in medium_help and "  num_layers                  16 " in medium_help
    assert "Examples:" not in medium_help  # the examples are train_gpt.py's


# ----------------------------------------------------------------------------------------------------------------------
# --print-config


def shell_values(text: str, names: list[str]) -> dict[str, str]:
    """NAME=VALUE lines as bash reads them after eval."""
    script = 'set -eu; eval "$1"; shift; for n in "$@"; do printf "%s\\0" "${!n}"; done'
    p = subprocess.run(["bash", "-c", script, "_", text, *names], capture_output=True, text=True, check=True)
    return dict(zip(names, p.stdout.split("\0")[:-1]))


def shell_word(value) -> str:
    return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("argv,presets,default", [
    ([], None, "speedrun"), (["--preset", "a10"], None, "speedrun"), (["--preset", "tiny"], None, "speedrun"),
    ([], medium.PRESETS, "medium"),
])
def test_print_config_shell_is_eval_able_and_the_preset(argv, presets, default, capsys):
    rc, out, err = main_output([*argv, "--print-config=shell"], capsys, presets=presets, default_preset=default)
    assert rc == 0 and err == ""
    hp = tg.preset_hyperparameters(argv[1] if argv else default, presets)
    derived = ["global_batch_tokens", "train_tokens", "fineweb_shards"]
    got = shell_values(out, [f.name for f in fields(hp)] + derived + ["cpu_refusal"])
    assert {k: got[k] for k in asdict(hp)} == {k: shell_word(v) for k, v in asdict(hp).items()}
    batch = hp.seqs_per_step * hp.train_seq_len
    fineweb = hp.train_files == "fineweb_train_*.bin"
    assert [int(got[k]) for k in derived] == [batch, hp.num_iterations * batch,
                                              min(103, shards_needed(hp.num_iterations, batch)) if fineweb else 0]
    # one line each; on a machine without a GPU, whether the run is too big for its CPU
    assert [line.split("=", 1)[0] for line in out.splitlines()] == [*asdict(hp), *derived, "cpu_refusal"]
    assert ("would take about" in got["cpu_refusal"]) == (hp.preset != "tiny")


def test_print_config_shell_quotes_what_a_shell_would_expand(tmp_path, capsys):
    odd = str(tmp_path / "it's a $HOME `x` dir;*")
    rc, out, _ = main_output(["--preset", "tiny", "--data-dir", odd, "--train-files", "a b*.bin", "--set",
                              "wandb_project=$(touch pwned)", "--print-config=shell"], capsys)
    assert rc == 0
    got = shell_values(out, ["data_dir", "train_files", "wandb_project", "run_name", "compile"])
    assert got == {"data_dir": odd, "train_files": "a b*.bin", "wandb_project": "$(touch pwned)", "run_name": "",
                   "compile": "false"}
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_print_config_shell_refuses_a_value_of_two_lines(capsys):
    line = one_line_error(["--data-dir", "a\nb", "--print-config=shell"], capsys)
    assert "data_dir holds a newline" in line


def test_print_config_values_read_back_through_set(capsys):
    # what --print-config=shell prints, --set takes back: the same settings
    base = ["--preset", "tiny", "--set", "model_dim=96", "--set", "cooldown_frac=0.25"]
    rc, out, _ = main_output([*base, "--print-config=shell"], capsys)
    got = shell_values(out, tg.CLI.set_fields())
    again = tg.parse_args(["--preset", "tiny", *[w for n in tg.CLI.set_fields() for w in ("--set", f"{n}={got[n]}")]])
    assert again == tg.parse_args(base)


def test_print_config_json(capsys):
    rc, out, err = main_output(["--preset", "tiny", "--set", "model_dim=64", "--print-config"], capsys)
    assert rc == 0 and err == ""
    doc = json.loads(out)
    hp = tg.parse_args(["--preset", "tiny", "--set", "model_dim=64"])
    assert doc["settings"] == asdict(hp)
    assert doc["derived"] == {"global_batch_tokens": 2048, "train_tokens": 200 * 2048, "fineweb_shards": 0,
                              "cpu_refusal": ""}  # no GPU here, and the tiny preset fits a CPU


def test_print_config_checks_the_settings(capsys):
    line = one_line_error(["--preset", "tiny", "--val-tokens", "1000", "--print-config=shell"], capsys)
    assert "--val-tokens 1000 must be a multiple of --val-seq-len 4096" in line


@pytest.mark.slow
def test_print_config_runs_nothing(tmp_path):
    """As a script, on a machine without a GPU, under a launcher's environment, with no data anywhere: it prints and
    exits (no process group, no data, no CPU re-exec), quickly."""
    env = subprocess_env(CUDA_VISIBLE_DEVICES="", RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT="9")
    env.pop("MALLOC_MMAP_MAX_", None)
    p = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--data-dir", str(tmp_path / "none"),
                        "--print-config=shell"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert f"data_dir={tmp_path / 'none'}" in p.stdout.splitlines() and "fineweb_shards=8" in p.stdout
    assert list(tmp_path.iterdir()) == []  # no logs/, no checkpoints/, no data


def test_print_config_skips_the_cpu_re_exec(monkeypatch):
    def execve(*args):
        raise AssertionError("re-exec")

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.setattr(tg.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(sys, "argv", ["train_gpt.py", "--preset", "tiny", "--print-config=shell"])
    devices.reexec_with_cpu_malloc_settings()  # returns: nothing to gain for a command that trains nothing
    monkeypatch.setattr(sys, "argv", ["train_gpt.py", "--preset", "tiny"])
    with pytest.raises(AssertionError, match="re-exec"):
        devices.reexec_with_cpu_malloc_settings()


def test_medium_print_config(capsys):
    rc = medium.main(["--num-iterations", "100", "--print-config"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["settings"]["preset"] == "medium" and doc["settings"]["num_layers"] == 16
    assert doc["derived"]["train_tokens"] == 100 * 8 * 64 * 1024


def test_a_prepared_directory_is_found_by_its_manifest(tmp_path, capsys):
    """--data-dir of a corpus data/prepare.py wrote, with a preset whose globs are the built-in corpus's: the trainer
    (and so train.sh, which asks it) reads the manifest's globs, and says so."""
    from data.shards import write_shard

    mine = tmp_path / "mytext"
    mine.mkdir()
    for name in ("mytext_val_000000.bin", "mytext_train_000001.bin"):
        write_shard(mine / name, np.full(5000, 50256, dtype=np.uint16))
    (mine / "manifest.json").write_text(json.dumps({"format": "nanogpt-speedrun-kit/prepared-corpus", "version": 1,
                                                    "train_files": "mytext_train_*.bin",
                                                    "val_files": "mytext_val_*.bin"}), encoding="utf-8")
    assert tg.main(["--preset", "tiny", "--data-dir", str(mine), "--print-config"]) == 0
    out, err = capsys.readouterr()
    settings = json.loads(out)["settings"]
    assert (settings["train_files"], settings["val_files"]) == ("mytext_train_*.bin", "mytext_val_*.bin")
    assert f"--data-dir {mine} holds no builtin_train_*.bin; its manifest names mytext_train_*.bin" in err
    # globs that match stay as given; a directory without a manifest is left alone
    assert tg.main(["--preset", "tiny", "--data-dir", str(mine), "--train-files", "mytext_val_*.bin",
                    "--print-config"]) == 0
    assert json.loads(capsys.readouterr()[0])["settings"]["train_files"] == "mytext_val_*.bin"
    (mine / "manifest.json").unlink()
    assert tg.main(["--preset", "tiny", "--data-dir", str(mine), "--print-config"]) == 0
    assert json.loads(capsys.readouterr()[0])["settings"]["train_files"] == "builtin_train_*.bin"


def test_an_abbreviated_flag_is_a_mistake_with_the_flag_it_was_meant_to_be(capsys):
    """argparse takes --num-iteration for --num-iterations unless told not to: here it is an error, one line."""
    line = one_line_error(["--preset", "tiny", "--num-iteration", "5", "--print-config"], capsys)
    assert line == ("train_gpt.py: error: unrecognized arguments: --num-iteration 5; did you mean --num-iterations? "
                    "(see --help)")
    line = one_line_error(["--preset", "tiny", "--frobnicate", "--print-config"], capsys)
    assert line == "train_gpt.py: error: unrecognized arguments: --frobnicate (see --help)"  # nothing close


def test_every_argument_parser_refuses_abbreviations():
    """Each ArgumentParser(...) in the kit's sources sets allow_abbrev=False (cli.OneLineParser does it itself)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = [p for p in root.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    calls = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = getattr(node.func, "attr", getattr(node.func, "id", "")) if isinstance(node, ast.Call) else ""
            if name == "ArgumentParser":
                ok = any(k.arg == "allow_abbrev" and isinstance(k.value, ast.Constant) and k.value.value is False
                         for k in node.keywords)
                calls.append((f"{path.relative_to(root)}:{node.lineno}", ok))
    assert len(calls) >= 8, calls  # the entry points were found
    assert [where for where, ok in calls if not ok] == []
    assert cli.OneLineParser(prog="x").allow_abbrev is False
