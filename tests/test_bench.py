"""The benchmark helpers that produce data or interpret measurements: the code corpus, the profile's kernel
categories and the GPU suite's driver script (the GPU steps themselves need a GPU)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import ROOT, load_bench


code_corpus = load_bench("code_corpus")
bench_train = load_bench("bench_train")


def _tree(root):
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__pycache__").mkdir()
    (root / ".hidden").mkdir()
    (root / "a.py").write_text("print('a')\n", encoding="utf-8")
    (root / "pkg" / "b.py").write_text("# é ü\nx = 1\n", encoding="utf-8")
    (root / "pkg" / "sub" / "c.py").write_text("def c():\n    return 3\n", encoding="utf-8")
    (root / "pkg" / "latin1.py").write_bytes(b"s = '\xe9'\n")  # not UTF-8: left out
    (root / "pkg" / "empty.py").write_text("", encoding="utf-8")  # left out
    (root / "pkg" / "big.py").write_text("x = 0\n" * 400_000, encoding="utf-8")  # 2.4 MB: over the file limit
    (root / "pkg" / "notes.txt").write_text("not python", encoding="utf-8")
    (root / "pkg" / "__pycache__" / "b.py").write_text("cached = 1\n", encoding="utf-8")
    (root / ".hidden" / "h.py").write_text("hidden = 1\n", encoding="utf-8")


def test_code_corpus_is_deterministic_and_skips_what_it_cannot_use(tmp_path, capsys):
    _tree(tmp_path / "src")
    out = tmp_path / "code.jsonl"
    assert code_corpus.main(["--out", str(out), str(tmp_path / "src")]) == 0
    docs = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert docs == ["print('a')\n", "# é ü\nx = 1\n", "def c():\n    return 3\n"]  # sorted path order
    said = capsys.readouterr().out
    assert said.startswith("3 files") and "(3 left out: empty, too large or not UTF-8)" in said
    first = out.read_bytes()
    assert code_corpus.main(["--out", str(out), str(tmp_path / "src")]) == 0
    assert out.read_bytes() == first
    assert not list(tmp_path.glob("*.tmp"))


def test_code_corpus_stops_at_its_size_cap(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"m{i}.py").write_text("y = 1\n" * 50_000, encoding="utf-8")  # 0.3 MB each
    out = tmp_path / "code.jsonl"
    assert code_corpus.main(["--out", str(out), "--max-mb", "1", str(src)]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 4  # stops at the first file that reaches 1 MB


def test_code_corpus_reads_a_root_once_when_another_contains_it(tmp_path):
    _tree(tmp_path / "src")
    out = tmp_path / "code.jsonl"
    assert code_corpus.main(["--out", str(out), str(tmp_path / "src"), str(tmp_path / "src" / "pkg")]) == 0
    docs = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(docs) == len(set(docs)) == 3


# Kernel names as the H100 profile of the speedrun preset reported them (records/h100-2026-11-24.md).
@pytest.mark.parametrize("kernel,category", [
    ("triton_tem_fused_flex_attention_backward_transpose_view_10", "attention (flex, fwd + bwd)"),
    ("triton_per_fused_flex_attention_backward_transpose_view_9", "attention (flex, fwd + bwd)"),
    ("triton_tem_fused__to_copy__unsafe_view_add_arange_bitwise_and_bitwise_not_bitwise_or_embedding_eq_"
     "flex_attention_ge_le_lt_mul_select_sort_split_sub_tr", "attention (flex, fwd + bwd)"),
    ("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN", "bf16 matmul"),
    ("nvjet_sm90_qqtst_128x160_128x5_2x1_v_bz_coopA_algo2_TNT", "fp8 matmul (lm_head)"),
    ("nvjet_sm90_qrsss_128x160_128x5_1x2_h_bz_coopA_algo2_TNT", "fp8 matmul (lm_head)"),
    ("triton_poi_fused__fused_rms_norm__scaled_mm__to_copy_clamp_clone_div_mul_select_sigmoid_sigmoid_backward_t_2",
     "fp8 casts and scales (Triton)"),
    ("triton_red_fused__log_softmax__to_copy_amax_div_mul_sigmoid_sub_33", "cross-entropy + soft-cap (fp32 logits)"),
    ("triton_red_fused__fused_rms_norm__to_copy__unsafe_view_add_arange_cat_cos_div_mul_neg_pow_sin_split_sub_"
     "unsqueeze_view_9", "norms + rotary (fused)"),
    ("triton_poi_fused__unsafe_view_pow_relu_16", "other fused elementwise (Triton)"),
    ("Memcpy HtoD (Pageable -> Device)", "memcpy / memset"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other (eager kernels: "
     "optimisers, ...)"),
])
def test_profile_kernel_categories(kernel, category):
    assert next(name for name, test in bench_train.KERNEL_CATEGORIES if test(kernel)) == category


def test_gpu_suite_usage_and_unknown_step(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh")], capture_output=True, text=True)
    assert p.returncode == 2 and "Steps (run in the order given)" in p.stdout
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), str(tmp_path / "out"), "nonsense"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert p.returncode == 1 and "unknown step nonsense" in p.stdout
    assert (tmp_path / "out" / "nonsense.log").read_text() == "unknown step nonsense\n"


@pytest.mark.slow
def test_check_cuda_on_cpu_runs_the_forward_checks(tmp_path, capsys):
    """On a CPU the correctness script runs the attention forward comparison and says what it skipped; its JSON
    holds every case, the verdict and the time each check took."""
    check_cuda = load_bench("check_cuda")
    out = tmp_path / "check.json"
    assert check_cuda.main(["--device", "cpu", "--checks", "attention,fp8,compile", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fp8: skipped" in printed and "compile: skipped" in printed and "all checks passed" in printed
    results = json.loads(out.read_text())
    attention = results["attention"]
    assert results["passed"] and attention["passed"] and not attention["backward"]
    assert [c["T"] for c in attention["cases"]] == [2048, 4096, 4096]  # the CPU leaves out the long sequences
    for case in attention["cases"]:  # both bf16 paths differ from fp32 by bf16 rounding: neither is exact
        assert 1e-4 < case["dense_bf16_rel_err"] < 2e-2 and 1e-4 < case["flex_bf16_rel_err"] < 2e-2
    assert attention["seconds_total"] > 0 and "fp8" not in results and "compile" not in results
    with pytest.raises(SystemExit):
        check_cuda.main(["--device", "cpu", "--checks", "attention,bogus"])


@pytest.mark.slow
def test_bench_memory_reports_peak_memory_and_step_time(shared_synthetic_data, tmp_path, capsys):
    """The memory benchmark runs the trainer in a subprocess (here a 2 x 64 model on 256-token sequences of the
    synthetic corpus) and reports its peak resident memory and step times, printed and in its JSON."""
    bench_memory = load_bench("bench_memory")
    out = tmp_path / "memory.json"
    flags = ["--data-dir", str(shared_synthetic_data), "--train-files", "syn_train_*.bin", "--val-files",
             "syn_val_*.bin", "--set", "model_dim=64", "--set", "num_layers=2", "--set", "num_heads=2", "--set",
             "head_dim=32", "--train-seq-len", "256", "--val-seq-len", "512", "--val-tokens", "512"]
    assert bench_memory.main(["--steps", "4", "--threads", "1", "--json", str(out), "--", *flags]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["steps"] == 4 and result["extra_flags"] == flags and list(result["runs"]) == ["trainer"]
    run = result["runs"]["trainer"]
    # the 50304-token tables alone (embedding, 3 value embeddings, head: weights, gradients, Adam) are 0.2 GB
    assert 0.2 < run["peak_rss_gib"] < 8
    assert run["steps_timed"] == 2  # steps 3 and 4: the first two (--skip 2) allocate the optimiser state
    assert 0 < run["step_ms_min"] <= run["step_ms_median"] < 60_000
    assert 0 < run["final_val_loss"] < 12  # ln(50304) = 10.8 for uniform predictions
    assert run["background_load"] is None or 0 <= run["background_load"] <= 1
    assert "--num-iterations" in run["command"] and run["command"][-len(flags):] == flags
    assert f"peak resident {run['peak_rss_gib']:.2f} GiB" in printed
    with pytest.raises(SystemExit):
        bench_memory.main(["--env", "MALLOC_MMAP_MAX_"])  # not KEY=VALUE


@pytest.mark.slow
def test_bench_train_on_cpu_reports_step_time_and_flops(tmp_path, capsys):
    """One timed step of the tiny preset on the CPU, at the end-of-training window: the printed line and the JSON
    agree, and the figures are consistent with each other (tokens/s is the global batch over the step time)."""
    out = tmp_path / "train.json"
    assert bench_train.main(["--device", "cpu", "--steps", "1", "--warmup-steps", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    hp = tg.preset_hyperparameters("tiny")
    assert result["timed_steps"] == 1 and result["global_batch_tokens"] == hp.global_batch_tokens
    assert result["window_blocks"] == tg.window_blocks(hp.num_iterations - 1, hp)
    assert result["tokens_per_s"] == pytest.approx(hp.global_batch_tokens / (result["step_ms_median"] / 1000), rel=1e-3)
    assert result["model_flops_per_token"] > 6 * sum(p.numel() for p in tg.GPT(tg.GPTConfig.from_hyperparameters(hp))
                                                     .blocks.parameters())
    assert 0 < result["final_loss"] < 12 and result["mfu"] is None  # no known peak for a CPU
    assert f"step {result['step_ms_median']:.1f} ms (median of 1)" in capsys.readouterr().out



def test_every_bench_train_flag_has_help(monkeypatch):
    bench_train = load_bench("bench_train")
    seen = []
    real_parse = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        seen.extend(a for a in self._actions if a.option_strings and a.dest != "help")
        return real_parse(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    bench_train.parse_args([])
    assert len(seen) >= 12 and [a.option_strings[0] for a in seen if not a.help] == []
