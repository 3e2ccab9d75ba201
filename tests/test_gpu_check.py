"""bench/gpu_check.sh, the prepared GPU check, on a CPU: its CPU mode end to end, and its plumbing (time limits, the
whole check's budget, failures, a run cut off) with a stand-in interpreter that hangs, fails or writes a result for
one chosen step and runs the real Python for the rest. Also the profile's optimiser categories in bench_train.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, load_bench

SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["env", "train-fp8", "train-bf16", "attention", "a10-memory"]


gpu_check = load_bench("gpu_check")
bench_train = load_bench("bench_train")

# The stand-in interpreter: a step is chosen by the name of the JSON file its tool is given (OUT/STEP.json).
FAKE_PYTHON = r"""#!/usr/bin/env bash
step= prev= out=
for arg in "$@"; do
    if [[ $prev == --json ]]; then out=$arg; step=$(basename "$arg" .json); fi
    prev=$arg
done
if [[ -z $step ]]; then  # gpu_check.py's bookkeeping
    exec "$REAL_PY" "$@"
fi
case $step in
    "${FAKE_HANG:-}") exec "$REAL_PY" -c 'import time; time.sleep(120)' ;;
    "${FAKE_STUBBORN:-}")  # ignores timeout's SIGTERM
        exec "$REAL_PY" -c 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)' ;;
    "${FAKE_FAIL:-}") echo "failing on purpose"; exit 3 ;;
    "${FAKE_OK:-}") printf '{"tokens_per_s": 1234, "lm_head": "bf16", "step_ms_median": 5.0}\n' >"$out"; exit 0 ;;
esac
exec "$REAL_PY" "$@"
"""


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "FAKE_")) and k != "OUT"}
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env.update(PYTHON=str(fake), REAL_PY=sys.executable, TMPDIR=str(tmp_path))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(tmp_path, *args, **extra) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", str(out), *args], capture_output=True, text=True,
                       env=_env(tmp_path, **extra), timeout=300)
    path = out / "gpu_check.json"
    return p, json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.slow
def test_cpu_mode_runs_every_step_and_writes_one_json(tmp_path):
    """The real tools on the tiny configuration: every step is recorded with its status, time and figures, the
    GPU-only ones say so, and each figure is printed as its step ends."""
    t0 = time.monotonic()
    p, data = _run(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert time.monotonic() - t0 < 120
    assert list(data["steps"]) == STEPS
    status = {s: e["status"] for s, e in data["steps"].items()}
    assert status == {"env": "ok", "train-fp8": "ok", "train-bf16": "ok", "attention": "ok",
                      "a10-memory": "skipped: no CUDA"}
    assert data["mode"] == "cpu" and data["complete"] and data["torch"] == torch.__version__
    assert data["device"].startswith("cpu") and data["date"] and 0 < data["seconds"] < 120
    for step in STEPS[:4]:
        entry = data["steps"][step]
        assert entry["exit_code"] == 0 and 0 < entry["seconds"] <= entry["limit_s"]
        assert (tmp_path / "out" / entry["log"]).stat().st_size > 0
    fp8 = data["steps"]["train-fp8"]["figures"]
    assert fp8["preset"] == "tiny" and fp8["tokens_per_s"] > 0 and fp8["timed_steps"] == 1
    assert fp8["profile"] == "skipped: no CUDA"
    assert data["steps"]["train-bf16"]["figures"]["tokens_per_s"] > 0
    att = data["steps"]["attention"]["figures"]
    assert att["passed"] is True and att["zero_block_window"] is True and len(att["window_sizes_blocks"]) >= 3
    assert att["gradients"] == "skipped: no CUDA (forward only)"
    assert f"=== train-fp8: ok (exit 0) after {data['steps']['train-fp8']['seconds']}s: step_ms_median" in p.stdout
    assert "=== a10-memory: skipped: no CUDA" in p.stdout
    assert not list((tmp_path / "out").glob("*.tmp"))


@pytest.mark.parametrize("fake,kill_after,code", [("FAKE_HANG", 5, 124), ("FAKE_STUBBORN", 1, 137)])
def test_a_step_past_its_limit_is_timed_out_and_the_next_one_runs(tmp_path, fake, kill_after, code):
    """A step that ends at its limit (SIGTERM), or that ignores SIGTERM and is killed after the grace time."""
    t0 = time.monotonic()
    p, data = _run(tmp_path, **{fake: "train-fp8", "FAKE_OK": "train-bf16", "GPU_CHECK_LIMIT_train_fp8": 1,
                                "GPU_CHECK_KILL_AFTER": kill_after, "GPU_CHECK_STEPS": "train-fp8 train-bf16"})
    assert time.monotonic() - t0 < 30
    assert p.returncode == 1, p.stdout + p.stderr
    fp8, bf16 = data["steps"]["train-fp8"], data["steps"]["train-bf16"]
    assert fp8["status"] == "timed out" and fp8["exit_code"] == code and fp8["limit_s"] == 1
    assert 1 <= fp8["seconds"] < 1 + kill_after + 3 and "figures" not in fp8
    assert bf16["status"] == "ok" and bf16["figures"]["tokens_per_s"] == 1234 and "fp8_speedup" not in bf16["figures"]
    assert f"=== train-fp8: timed out (exit {code})" in p.stdout and "=== train-bf16: ok" in p.stdout


def test_a_failing_step_is_recorded_with_its_exit_code(tmp_path):
    p, data = _run(tmp_path, FAKE_FAIL="attention", GPU_CHECK_STEPS="attention a10-memory")
    assert p.returncode == 1
    att = data["steps"]["attention"]
    assert att["status"] == "failed" and att["exit_code"] == 3 and "figures" not in att
    assert (tmp_path / "out" / "attention.log").read_text() == "failing on purpose\n"
    assert data["steps"]["a10-memory"]["status"] == "skipped: no CUDA" and data["complete"]


@pytest.mark.slow
def test_the_budget_caps_a_step_and_skips_those_with_no_time_left(tmp_path):
    t0 = time.monotonic()
    p, data = _run(tmp_path, FAKE_HANG="train-fp8", GPU_CHECK_BUDGET=14, GPU_CHECK_KILL_AFTER=1,
                   GPU_CHECK_STEPS="train-fp8 train-bf16")
    assert time.monotonic() - t0 < 16
    assert p.returncode == 1
    fp8 = data["steps"]["train-fp8"]
    assert fp8["status"] == "timed out" and 10 <= fp8["limit_s"] <= 11  # 14 less the grace and the bookkeeping
    assert data["steps"]["train-bf16"]["status"].startswith("skipped: no time left")


def test_a_run_cut_off_mid_step_leaves_what_it_measured(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT), "--device", "cpu", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env=_env(tmp_path, FAKE_OK="train-fp8", FAKE_HANG="train-bf16",
                                     GPU_CHECK_STEPS="train-fp8 train-bf16 attention"))
    try:
        deadline = time.monotonic() + 30
        data = {}
        while time.monotonic() < deadline:
            data = gpu_check.load(out / "gpu_check.json")
            if data.get("steps", {}).get("train-bf16", {}).get("status") == "running":
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    data = json.loads((out / "gpu_check.json").read_text())
    steps = data["steps"]
    assert steps["train-fp8"]["status"] == "ok" and steps["train-fp8"]["figures"]["tokens_per_s"] == 1234
    assert steps["train-bf16"]["status"] == "running" and steps["train-bf16"]["limit_s"] == 150
    assert steps["attention"] == {"status": "pending"} and not data["complete"]


def test_usage_and_bad_arguments(tmp_path):
    env = _env(tmp_path)
    p = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "Steps, in order" in p.stdout and "a10-memory" in p.stdout
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "OUT is not set" in p.stderr
    p = subprocess.run(["bash", str(SCRIPT), "--device", "tpu", str(tmp_path)], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 2 and "--device must be cuda or cpu" in p.stderr
    p = subprocess.run(["bash", str(SCRIPT), "--fast", str(tmp_path)], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "unknown option --fast" in p.stderr
    p = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "a"), "env"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "steps go in GPU_CHECK_STEPS" in p.stderr
    p = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "o")], capture_output=True, text=True,
                       env={**env, "GPU_CHECK_STEPS": "env bogus"})
    assert p.returncode == 2 and "unknown step bogus" in p.stderr and not (tmp_path / "o").exists()


def test_out_is_the_default_output_directory(tmp_path):
    out = tmp_path / "from-env"
    p = subprocess.run(["bash", str(SCRIPT), "--device", "cpu"], capture_output=True, text=True,
                       env=_env(tmp_path, OUT=out, GPU_CHECK_STEPS="a10-memory"))
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "gpu_check.json").read_text())["steps"] == {"a10-memory": {"status": "skipped: no CUDA"}}


def test_a_rerun_of_some_steps_keeps_the_others(tmp_path):
    _run(tmp_path, FAKE_OK="train-fp8", GPU_CHECK_STEPS="train-fp8")
    p, data = _run(tmp_path, FAKE_FAIL="attention", GPU_CHECK_STEPS="attention")
    assert list(data["steps"]) == ["train-fp8", "attention"]
    assert data["steps"]["train-fp8"]["figures"]["tokens_per_s"] == 1234
    assert data["steps"]["attention"]["status"] == "failed"


def test_a_stale_result_is_not_taken_for_this_runs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "attention.json").write_text('{"attention": {"passed": true}}')
    p, data = _run(tmp_path, FAKE_FAIL="attention", GPU_CHECK_STEPS="attention")
    assert data["steps"]["attention"]["status"] == "failed" and "figures" not in data["steps"]["attention"]


def test_figures_of_a_failed_check_and_of_the_a10_limit(tmp_path):
    """A tool that fails after writing its result (a check that did not pass) keeps its figures; the a10 step says
    whether the larger of the warm-up's and the timed steps' peak allocated memory is within 22 GiB."""
    path, raw = tmp_path / "gpu_check.json", tmp_path / "raw.json"
    gpu_check.main(["init", str(path), "--mode", "cuda", "--budget", "540", "--steps", "attention,a10-memory"])
    raw.write_text(json.dumps({"attention": {"passed": False, "backward": True, "cases": [
        {"T": 2048, "kind": "S", "window_blocks": 0, "passed": False}]}}))
    gpu_check.main(["start", str(path), "attention", "--limit", "120"])
    gpu_check.main(["finish", str(path), "attention", "--rc", "1", "--raw", str(raw)])
    att = json.loads(path.read_text())["steps"]["attention"]
    assert att["status"] == "failed" and att["exit_code"] == 1 and att["figures"]["passed"] is False
    assert att["figures"]["gradients"] is True and att["figures"]["window_sizes_blocks"] == [0]
    for timed, warmup, under in [(21.5, 19.0, True), (21.5, 22.5, False), (22.0, 12.0, True)]:
        raw.write_text(json.dumps({"peak_allocated_gib": timed, "warmup_peak_allocated_gib": warmup,
                                   "peak_reserved_gib": 23.0}))
        gpu_check.main(["finish", str(path), "a10-memory", "--rc", "0", "--raw", str(raw)])
        fig = json.loads(path.read_text())["steps"]["a10-memory"]["figures"]
        assert fig["under_limit"] is under and fig["peak_allocated_max_gib"] == max(timed, warmup)
        assert fig["limit_gib"] == 22.0 and fig["reserved_under_limit"] is False


def test_fp8_speedup_needs_an_fp8_head_in_step_two(tmp_path):
    path, raw = tmp_path / "gpu_check.json", tmp_path / "raw.json"
    gpu_check.main(["init", str(path), "--mode", "cuda", "--budget", "540", "--steps", "train-fp8,train-bf16"])
    for head, speedup in [("fp8", 1.25), ("bf16", None)]:
        raw.write_text(json.dumps({"tokens_per_s": 500_000, "lm_head": head}))
        gpu_check.main(["finish", str(path), "train-fp8", "--rc", "0", "--raw", str(raw)])
        raw.write_text(json.dumps({"tokens_per_s": 400_000, "lm_head": "bf16"}))
        gpu_check.main(["finish", str(path), "train-bf16", "--rc", "0", "--raw", str(raw)])
        data = json.loads(path.read_text())
        assert data["steps"]["train-bf16"]["figures"].get("fp8_speedup") == speedup
        assert data["steps"]["train-fp8"]["figures"]["profile"].startswith("not measured")


def _gpu_event(name, start, end, annotation=False):
    return SimpleNamespace(name=name, device_type="DeviceType.CUDA", time_range=SimpleNamespace(start=start, end=end),
                           is_user_annotation=annotation)


def test_profile_puts_kernels_inside_an_optimiser_step_in_its_category():
    """Muon's Newton-Schulz matmuls are cuBLAS kernels like the model's: only the optimiser's GPU range tells them
    apart. Ranges are not kernels (their time is their kernels'), and CPU events have no GPU time."""
    events = [
        _gpu_event("## step", 0, 100, annotation=True),
        _gpu_event("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN", 0, 10),
        _gpu_event("Optimizer.step#Muon.step", 20, 50, annotation=True),
        _gpu_event("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN", 20, 28),
        _gpu_event("triton_poi_fused_mul_0", 30, 33),
        _gpu_event("Optimizer.step#DistAdam.step", 60, 70, annotation=True),
        _gpu_event("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", 61, 63),
        _gpu_event("Optimizer.step#SGD.step", 80, 85, annotation=True),
        _gpu_event("void at::native::vectorized_elementwise_kernel<4>", 80, 81),
        _gpu_event("triton_poi_fused__unsafe_view_pow_relu_16", 90, 95),
        SimpleNamespace(name="aten::mm", device_type="DeviceType.CPU", time_range=SimpleNamespace(start=0, end=99),
                        is_user_annotation=False),
    ]
    got = [(bench_train.kernel_category(k), t) for k, t in bench_train.kernel_times(events)]
    assert got == [("bf16 matmul", 10), ("Muon (optimiser step)", 8), ("Muon (optimiser step)", 3),
                   ("Adam (optimiser step)", 2), ("other optimiser steps", 1), ("other fused elementwise (Triton)", 5)]


def test_kernel_times_reads_a_real_profile():
    """The fields kernel_times reads exist on this torch's profiler events (a CPU profile has no GPU kernels)."""
    from torch.profiler import ProfilerActivity, profile
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = torch.optim.SGD([w], lr=0.1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (w @ w).sum().backward()
        opt.step()
    events = prof.events()
    assert any(e.name.startswith(bench_train.OPTIMIZER_RANGE) for e in events)
    assert all(hasattr(e, "time_range") and hasattr(e, "device_type") for e in events)
    assert bench_train.kernel_times(events) == []


def test_scripts_are_lint_clean():
    shellcheck = shutil.which("shellcheck", path=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    ruff = shutil.which("ruff", path=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    if not (shellcheck and ruff):
        pytest.fail("shellcheck or ruff is missing: pip install -r requirements-dev.txt")
    p = subprocess.run([shellcheck, "-x", "-S", "warning", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([ruff, "check", "bench/gpu_check.py", "tests/test_gpu_check.py"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
