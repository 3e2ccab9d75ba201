"""--preset auto: the record's recipe fitted to the GPUs found, tested with made-up GPUs (no GPU needed)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from runlib import devices, errors, runs
import train_gpt as tg
from conftest import ROOT, subprocess_env

RECORD = tg.Hyperparameters()


def gpus(count: int, total_gib: float, capability=(9, 0), name="GPU") -> list[devices.GPUInfo]:
    """count GPUs of total_gib with what a fresh process finds free on them (the driver keeps about 0.6 GiB)."""
    return [devices.GPUInfo(name, total_gib, total_gib - 0.6, capability)] * count


def auto(count: int, total_gib: float, **changes) -> tuple[tg.Hyperparameters, str]:
    hp = dataclasses.replace(tg.preset_hyperparameters("auto"), **changes)
    return tg.fit_to_gpus(hp, gpus(count, total_gib), count)


# Cards by memory: 24 GB (A10, 3090, 4090, L4: 22.5 GiB), A100 40 GB (39.4 GiB), 80 GB (79.2 GiB), H200 (139.8 GiB).
SIZES = {24: 22.5, 40: 39.4, 80: 79.2, 141: 139.8}
# The sequence length each is expected to get: the estimate devices.peak_gib x 1.1 + 1 GiB must be at most the free
# memory. Compiled: 4.06 + 0.000713 x T GiB: 12,288 -> 15.1 GiB, 24,576 -> 24.7, 49,152 -> 44.0.
EXPECTED_LEN = {24: 12288, 40: 24576, 80: 49152, 141: 49152}


@pytest.mark.parametrize("count", [1, 2, 4, 8])
@pytest.mark.parametrize("size", [24, 40, 80, 141])
def test_auto_keeps_the_record_batch_in_the_longest_sequences_that_fit(count, size):
    hp, why = auto(count, SIZES[size])
    assert hp.train_seq_len == EXPECTED_LEN[size]
    assert hp.global_batch_tokens == RECORD.global_batch_tokens == 393_216  # the record's update on any hardware
    assert hp.seqs_per_step % count == 0
    assert hp.num_iterations == RECORD.num_iterations and hp.loss_sum_tokens == RECORD.loss_sum_tokens
    assert hp.val_tokens % hp.val_seq_len == 0 and hp.val_seq_len % tg.FLEX_BLOCK_SIZE == 0
    # validation chunks shrink with the sequences, in the record's proportion (262,144 for 49,152)
    assert hp.val_seq_len == {12288: 65536, 24576: 131072, 49152: 262144}[hp.train_seq_len]
    peak = devices.peak_gib(hp.train_seq_len, True) * devices.PEAK_MARGIN + devices.PEAK_RESERVE_GIB
    assert peak <= SIZES[size] - 0.6
    assert why.startswith(f"{count} x GPU ({SIZES[size] - 0.6:.1f} GiB free): {hp.train_seq_len:,}-token sequences, "
                          f"{hp.seqs_per_step // count} micro-step(s) per step")
    tg.check_hyperparameters(hp, count)


def test_a_24_gb_card_gets_the_a10_presets_shape_and_says_why():
    hp, why = tg.fit_to_gpus(tg.preset_hyperparameters("auto"), gpus(1, 22.5, (8, 6), "NVIDIA A10"), 1)
    a10 = tg.preset_hyperparameters("a10")
    assert (hp.train_seq_len, hp.seqs_per_step, hp.val_seq_len) == (a10.train_seq_len, a10.seqs_per_step,
                                                                   a10.val_seq_len)
    assert why.startswith("1 x NVIDIA A10 (21.9 GiB free): 12,288-token sequences, 32 micro-step(s) per step")
    assert "FP8 off (compute capability 8.6)" in why and "compiled" in why


def test_eager_needs_more_memory_than_compiled():
    # eager at 24,576 tokens: (4.06 + 0.001091 x 24,576) x 1.1 + 1 = 34.9 GiB, over the 34 free; compiled: 24.7
    assert auto(1, 34.6)[0].train_seq_len == 24576
    assert auto(1, 34.6, compile=False)[0].train_seq_len == 12288


def test_fp8_follows_the_compute_capability_and_the_flag():
    assert "FP8 on" in tg.fit_to_gpus(tg.preset_hyperparameters("auto"), gpus(1, 80, (9, 0)), 1)[1]
    assert "FP8 off;" in auto(1, 80, fp8=False)[1]


def test_process_counts_that_do_not_divide_eight_still_get_the_record_batch():
    hp, _ = auto(3, 79.2)
    assert hp.global_batch_tokens == 393_216 and hp.seqs_per_step % 3 == 0 and hp.train_seq_len == 32768


def test_the_smallest_gpu_decides():
    mixed = gpus(1, 79.2) + gpus(1, 22.5)
    hp, why = tg.fit_to_gpus(tg.preset_hyperparameters("auto"), mixed, 2)
    assert hp.train_seq_len == 12288 and "21.9 GiB free" in why


def test_given_values_win_even_when_they_do_not_fit():
    hp, why = auto(1, 22.5, train_seq_len=49152)
    assert (hp.train_seq_len, hp.seqs_per_step) == (49152, 8) and "more than fits" in why
    hp, _ = auto(1, 79.2, seqs_per_step=16)
    assert (hp.train_seq_len, hp.seqs_per_step) == (24576, 16)
    hp, _ = auto(1, 79.2, val_seq_len=65536)
    assert (hp.train_seq_len, hp.val_seq_len) == (49152, 65536)
    explicit = tg.preset_hyperparameters("a10")
    assert tg.fit_to_gpus(explicit, gpus(1, 22.5), 1) == (explicit, "")  # a preset of fixed shape: nothing to fit


def test_no_fitting_shape_is_one_clear_error():
    with pytest.raises(errors.ConfigError, match="no sequence length splits a global batch of 393,216 tokens over 1"):
        auto(1, 79.2, train_seq_len=1000)


def test_old_gpus_are_refused_with_the_cpu_alternative():
    with pytest.raises(errors.DeviceError, match=r"compute capability 7\.5; training needs 8\.0.*--device cpu"):
        tg.fit_to_gpus(tg.preset_hyperparameters("auto"), gpus(1, 15, (7, 5), "Tesla T4"), 1)


def test_without_a_gpu_auto_is_the_tiny_preset_with_what_was_given():
    hp, why = tg.fit_to_gpus(tg.parse_args(["--preset", "auto", "--num-iterations", "7"]), [], 1)
    tiny = tg.preset_hyperparameters("tiny")
    assert dataclasses.replace(hp, num_iterations=tiny.num_iterations) == tiny
    assert hp.num_iterations == 7 and why.startswith("no GPU")
    assert hp.preset == "tiny"  # what it runs: the run id and the log say tiny, not auto
    assert "-tiny-" in runs.new_run_id(hp.preset)


def test_print_config_resolves_auto_and_says_why():
    """On this CPU-only machine: the tiny settings; the reason is among the derived values, for the wrappers."""
    out = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--preset", "auto", "--print-config"],
                         capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config["settings"]["train_seq_len"] == tg.PRESETS["tiny"]["train_seq_len"]
    assert config["derived"]["fit"] == "no GPU: the tiny preset's settings, on the CPU"
    assert config["derived"]["global_batch_tokens"] == tg.preset_hyperparameters("tiny").global_batch_tokens


def test_sequence_shapes_are_exact_splits_halvings_first():
    shapes = devices.sequence_shapes(393_216, 2, 49152, 128)
    assert all(n * k == 393_216 and k % 2 == 0 and n % 128 == 0 and 1024 <= n <= 49152 for n, k in shapes)
    assert [n for n, _ in shapes[:6]] == [49152, 24576, 12288, 6144, 3072, 1536]
    rest = [n for n, _ in shapes[6:]]
    assert rest == sorted(rest, reverse=True) and 16384 in rest and len(set(shapes)) == len(shapes)
    assert devices.sequence_shapes(393_216, 3, 49152, 128)[0] == (32768, 12)
