"""Shared helpers for the trainer's tests: the repo root on sys.path, shard writing, a small learnable corpus and the
hyper-parameters of a very small, fast CPU run on it."""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

# Idle OpenMP threads sleep instead of spinning: with 2 cores, a spinning thread that waits for one descheduled by
# another process (a subprocess run of a test, torchrun's workers) makes every step several times slower. It must be
# set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import train_gpt  # noqa: E402


def load_bench(name: str):
    """A script of bench/ as a module (bench/ is not a package; its scripts import each other as a script would)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end to end (real training runs, subprocesses, torchrun, compiles); "
                                       "./test.sh --fast leaves these out")


def _keep_freed_memory_in_heap() -> None:
    """What train_gpt.py's CPU re-exec does with MALLOC_MMAP_MAX_=0 / MALLOC_TRIM_THRESHOLD_, for the in-process
    runs of the tests: without it glibc unmaps every large freed tensor and each step faults its pages in again."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


_keep_freed_memory_in_heap()

BOS = 50256
MAGIC = 20240520
VERSION = 1

VAL_TOKENS_WRITTEN = 40_000
TRAIN_TOKENS_PER_SHARD = 150_000


def write_shard(path, tokens) -> Path:
    """Write tokens in the speedrun shard format: 256 little-endian int32 header ints, then uint16 LE tokens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1 and (tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < 2**16))
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    return path


@pytest.fixture(name="write_shard")
def write_shard_fixture():
    """The shard writer as a fixture (it is also importable from conftest)."""
    return write_shard


def synthetic_tokens(n: int, seed: int) -> np.ndarray:
    """n tokens of documents: BOS, then an arithmetic progression mod 1000 with random start and stride
    (random length 30..600)."""
    rng = np.random.default_rng(seed)
    out, total = [], 0
    while total < n:
        length = int(rng.integers(30, 601))
        start, stride = int(rng.integers(0, 1000)), int(rng.integers(1, 10))
        doc = np.empty(length, dtype=np.int64)
        doc[0] = BOS
        doc[1:] = (start + stride * np.arange(length - 1)) % 1000
        out.append(doc)
        total += length
    return np.concatenate(out)[:n]


def make_synthetic_data(directory) -> Path:
    directory = Path(directory)
    write_shard(directory / "syn_val_000000.bin", synthetic_tokens(VAL_TOKENS_WRITTEN, seed=1))
    write_shard(directory / "syn_train_000001.bin", synthetic_tokens(TRAIN_TOKENS_PER_SHARD, seed=2))
    write_shard(directory / "syn_train_000002.bin", synthetic_tokens(TRAIN_TOKENS_PER_SHARD, seed=3))
    return directory


@pytest.fixture
def synthetic_data(tmp_path) -> Path:
    """Directory holding syn_val_000000.bin (~40K tokens) and syn_train_00000{1,2}.bin (~150K tokens each)."""
    return make_synthetic_data(tmp_path / "data")


@pytest.fixture(scope="session")
def shared_synthetic_data(tmp_path_factory) -> Path:
    """The same corpus, written once per session (for tests that only read it)."""
    return make_synthetic_data(tmp_path_factory.mktemp("syndata"))


TINY_OVERRIDES = dict(
    model_dim=64, num_layers=4, num_heads=2, head_dim=32, train_seq_len=256, val_seq_len=512, val_tokens=4096,
    seqs_per_step=2, num_iterations=12, attention="dense", compile=False, device="cpu",
    train_files="syn_train_*.bin", val_files="syn_val_*.bin",
)


def tiny_hp(data_dir, work_dir, **overrides) -> "train_gpt.Hyperparameters":
    """Preset tiny, shrunk to a run of a few seconds on CPU over the synthetic corpus."""
    work_dir = Path(work_dir)
    hp = train_gpt.preset_hyperparameters("tiny")
    values = dict(TINY_OVERRIDES, data_dir=str(data_dir), log_dir=str(work_dir / "logs"),
                  checkpoint_dir=str(work_dir / "checkpoints"))
    values.update(overrides)
    return dataclasses.replace(hp, **values)


def tiny_flags(data_dir, work_dir, **overrides) -> list[str]:
    """The command-line flags of tiny_hp (with --preset tiny) for subprocess runs."""
    work_dir = Path(work_dir)
    values = dict(TINY_OVERRIDES, data_dir=str(data_dir), log_dir=str(work_dir / "logs"),
                  checkpoint_dir=str(work_dir / "checkpoints"))
    values.update(overrides)
    flags = ["--preset", "tiny"]
    for k, v in values.items():
        if k == "compile":
            if not v:
                flags.append("--no-compile")
        elif k == "save_final":
            if not v:
                flags.append("--no-save-final")
        elif k == "wandb":
            if v:
                flags.append("--wandb")
        elif k in train_gpt.FLAG_FIELDS:
            flags += ["--" + k.replace("_", "-"), str(v)]
        else:  # the fields without a flag of their own
            flags += ["--set", f"{k}={v}"]
    return flags


STEP_TRAIN = re.compile(r"^step:(\d+)/(\d+) (?:train_loss:(\d+\.\d{4}) )?train_time:\d+ms step_avg:\d+\.\d{2}ms$")
STEP_VAL = re.compile(r"^step:(\d+)/(\d+) val_loss:(\d+\.\d{4}) train_time:\d+ms step_avg:\d+\.\d{2}ms$")


def parse_log(path) -> tuple[dict[int, float], dict[int, float]]:
    """(train losses by step, val losses by step) from a run log. A resumed run appends to its log: later lines win."""
    train, val = {}, {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = STEP_VAL.match(line)
        if m:
            val[int(m.group(1))] = float(m.group(3))
            continue
        m = STEP_TRAIN.match(line)
        if m and m.group(3) is not None:
            train[int(m.group(1))] = float(m.group(3))
    return train, val


def default_sigint() -> None:
    """preexec_fn for a subprocess that a test sends SIGINT to: SIGINT as an interactive shell leaves it (a suite
    started with nohup ... & ignores SIGINT, children inherit that, and the trainer keeps an ignored signal so)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_text(path, text: str, proc, limit_s: float = 300) -> float:
    """Waits until the file at path holds text, the process proc still running; returns when (time.monotonic)."""
    import time

    path, deadline = Path(path), time.monotonic() + limit_s
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        assert proc.poll() is None, path.read_text()[-3000:] if path.exists() else f"no {path}"
        assert time.monotonic() < deadline, f"{text!r} not in {path} after {limit_s} s"
        time.sleep(0.02)
    return time.monotonic()


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env
