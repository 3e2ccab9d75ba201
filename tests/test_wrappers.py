"""The shell front door: build.sh, train.sh, generate.sh, lib/common.sh, the image's build steps (lib/image_setup.sh)
and the entry points of the Docker end-to-end test (test.sh --docker, .ci/run, tests/docker/e2e.sh's own skip).

Docker and nvidia-smi are replaced by fakes first on PATH: the fake docker appends its argv (one JSON list per line)
to $FAKE_DOCKER_LOG and its process id, DOCKER_BUILDKIT and a Dockerfile read from stdin to $FAKE_DOCKER_LOG.meta,
answers `image inspect` with success for the images in $FAKE_DOCKER_IMAGES, `info` with the runtimes in
$FAKE_DOCKER_RUNTIMES, `version` with client $FAKE_DOCKER_CLIENT and `buildx version` as installed unless
$FAKE_DOCKER_BUILDX=0, fails `build` with $FAKE_DOCKER_BUILD_RC, a GPU `run` as a daemon without the NVIDIA runtime
does when $FAKE_DOCKER_NO_GPU_DRIVER=1, a `run` of `--print-config=shell` (train.sh asks the trainer for the run's
settings) by running that command in the directory mounted at /workspace (for this repository: as its main() in the
test process, which has torch imported already; $FAKE_DOCKER_PRINT_CONFIG, when set, is printed instead), and
otherwise exits 0; the fake nvidia-smi lists
$FAKE_GPUS GPUs (Kit.hide_nvidia_smi takes any nvidia-smi off PATH, the fake and a real one). The wrappers run with
stdin not a terminal (except in the pty test), and the tests check what reached docker, torchrun and train_gpt.py,
and how generate.py's and train_gpt.py's own parsers read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pty
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import train_gpt
from tests.conftest import ROOT

IMAGE = "nanogpt-speedrun:latest"
SECRET = "wandb-secret-value-9f3c1d"
TRAIN_SH = ROOT / "train.sh"
GENERATE_SH = ROOT / "generate.sh"
BUILD_SH = ROOT / "build.sh"
VENV_BIN = Path(sys.executable).parent
# the tiny preset takes 2 sequences a step, so at most 2 processes: with these words any count up to 16 x 3
ANY_COUNT = ("--set", "seqs_per_step=48")

FAKE_DOCKER = """#!{python}
import json, os, socket, subprocess, sys
args, env = sys.argv[1:], os.environ
meta = {{"pid": os.getpid(), "DOCKER_BUILDKIT": env.get("DOCKER_BUILDKIT")}}
if args[:1] == ["build"] and "-" in args and args[args.index("-") - 1] == "-f":
    meta["stdin"] = sys.stdin.read()
with open(env["FAKE_DOCKER_LOG"], "a", encoding="utf-8") as f:
    f.write(json.dumps(args) + "\\n")
with open(env["FAKE_DOCKER_LOG"] + ".meta", "a", encoding="utf-8") as f:
    f.write(json.dumps(meta) + "\\n")
if env.get("FAKE_DOCKER_SOCKET_DENIED") == "1":
    print("permission denied while trying to connect to the Docker daemon socket at unix:///var/run/docker.sock: "
          "Get http://%2Fvar%2Frun%2Fdocker.sock/v1.47/images/x/json: dial unix /var/run/docker.sock: connect: "
          "permission denied", file=sys.stderr)
    sys.exit(1)
if args[:2] == ["image", "inspect"]:
    if args[2] not in env.get("FAKE_DOCKER_IMAGES", "").split(","):
        print(f"Error response from daemon: No such image: {{args[2]}}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
if args[:1] == ["info"]:
    print(env.get("FAKE_DOCKER_RUNTIMES", "io.containerd.runc.v2 nvidia runc "))
if args[:1] == ["version"]:
    print(env.get("FAKE_DOCKER_CLIENT", "28.2.2"))
if args[:2] == ["buildx", "version"] and env.get("FAKE_DOCKER_BUILDX", "1") == "0":
    print("docker: unknown command: docker buildx", file=sys.stderr)
    sys.exit(1)
if args[:1] == ["run"] and "--gpus" in args and env.get("FAKE_DOCKER_NO_GPU_DRIVER") == "1":
    print('docker: Error response from daemon: could not select device driver "" with capabilities: [[gpu]].',
          file=sys.stderr)
    sys.exit(125)
if args[:1] == ["build"] and env.get("FAKE_DOCKER_BUILD_RC", "0") != "0":
    print("ERROR: failed to solve: fake build failure", file=sys.stderr)
    sys.exit(int(env["FAKE_DOCKER_BUILD_RC"]))
if args[:1] == ["run"] and "--print-config=shell" in args:
    if "FAKE_DOCKER_PRINT_CONFIG" in env:
        print(env["FAKE_DOCKER_PRINT_CONFIG"])
        sys.exit(0)
    inner = args[args.index("{image}") + 1:]
    mounts = dict(reversed(spec.split(",")[1:3]) for flag, spec in zip(args, args[1:]) if flag == "--mount")
    workspace = mounts["target=/workspace"].removeprefix("source=")
    assert inner[0] == "python", inner
    pairs = [v.split("=", 1) for k, v in zip(args, args[1:args.index("{image}")]) if k == "-e" and "=" in v]
    if env.get("FAKE_DOCKER_CONFIG_SOCKET") and os.path.realpath(workspace) == {root!r}:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(120)
            s.connect(env["FAKE_DOCKER_CONFIG_SOCKET"])
            s.sendall(json.dumps(dict(argv=inner[1:], world_size=dict(pairs).get("WORLD_SIZE"))).encode())
            s.shutdown(socket.SHUT_WR)
            p = json.loads(b"".join(iter(lambda: s.recv(65536), b"")))
    else:  # in the container's environment: its -e NAME=VALUE pairs (WORLD_SIZE, ...)
        run = subprocess.run([sys.executable, *inner[1:]], cwd=workspace, capture_output=True, text=True,
                             env={{**env, **dict(pairs)}})
        p = dict(rc=run.returncode, out=run.stdout, err=run.stderr)
    sys.stdout.write(p["out"])
    sys.stderr.write(p["err"])
    sys.exit(p["rc"])
if args[:1] == ["run"] and "train_gpt.py" in args and env.get("FAKE_DOCKER_TRAIN_SLEEP"):
    import signal, time
    def stopped(signum, frame):
        with open(env["FAKE_DOCKER_LOG"] + ".signals", "a", encoding="utf-8") as f:
            f.write(signal.Signals(signum).name + "\\n")
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    open(env["FAKE_DOCKER_LOG"] + ".training", "w").close()
    time.sleep(float(env["FAKE_DOCKER_TRAIN_SLEEP"]))
if args[:1] == ["run"] and "train_gpt.py" in args:
    sys.exit(int(env.get("FAKE_DOCKER_TRAIN_RC", "0")))
sys.exit(0)
"""

FAKE_NVIDIA_SMI = """#!/bin/sh
i=0
while [ "$i" -lt "${FAKE_GPUS:-0}" ]; do
  echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-fake-$i)"
  i=$((i + 1))
done
"""


class Kit:
    """Runs the wrappers with the fakes on PATH and reads back what the fake docker was called with."""

    def __init__(self, tmp_path: Path, config_socket: Path | None = None):
        self.tmp = tmp_path
        self.bin = tmp_path / "fakebin"
        self.bin.mkdir()
        self.log = tmp_path / "docker.log"
        fake = FAKE_DOCKER.format(python=sys.executable, image=IMAGE, root=os.path.realpath(ROOT))
        (self.bin / "docker").write_text(fake, encoding="utf-8")
        (self.bin / "nvidia-smi").write_text(FAKE_NVIDIA_SMI, encoding="utf-8")
        for exe in self.bin.iterdir():
            exe.chmod(0o755)
        self.home = tmp_path / "home"
        self.home.mkdir()
        inherited = ("WANDB_", "HF_", "NCCL_", "CUDA_VISIBLE", "KIT_", "TORCHINDUCTOR_", "TRITON_")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
        self.env.update(PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}", HOME=str(self.home),
                        FAKE_DOCKER_LOG=str(self.log), FAKE_DOCKER_IMAGES=IMAGE, FAKE_GPUS="2",
                        KIT_VENV=sys.prefix)
        if config_socket:
            self.env["FAKE_DOCKER_CONFIG_SOCKET"] = str(config_socket)

    def hide_nvidia_smi(self) -> None:
        """A machine without nvidia-smi: the fake goes, and each PATH directory that holds a real one is replaced by a
        directory of links to everything else in it."""
        (self.bin / "nvidia-smi").unlink()
        dirs = []
        for i, d in enumerate(self.env["PATH"].split(os.pathsep)):
            if (Path(d) / "nvidia-smi").exists():
                shadow = self.tmp / f"path-without-nvidia-smi-{i}"
                shadow.mkdir()
                for entry in Path(d).iterdir():
                    if entry.name != "nvidia-smi":
                        (shadow / entry.name).symlink_to(entry)
                d = str(shadow)
            dirs.append(d)
        self.env["PATH"] = os.pathsep.join(dirs)

    def break_nvidia_smi(self) -> None:
        """nvidia-smi is there but fails (a driver/library mismatch, no driver loaded)."""
        (self.bin / "nvidia-smi").write_text("#!/bin/sh\necho 'Failed to initialize NVML: Driver/library version "
                                             "mismatch' >&2\nexit 9\n", encoding="utf-8")

    def run(self, script: Path, *args: str, stdin=subprocess.DEVNULL, **env) -> subprocess.CompletedProcess:
        return subprocess.run([str(script), *args], cwd=self.tmp, env={**self.env, **env}, stdin=stdin,
                              capture_output=True, text=True, timeout=120)

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines()]

    def runs(self) -> list[list[str]]:
        """The docker runs, but for train.sh's question to the trainer (config_runs)."""
        return [c for c in self.calls() if c[:1] == ["run"] and not is_config_run(c)]

    def config_runs(self) -> list[list[str]]:
        return [c for c in self.calls() if c[:1] == ["run"] and is_config_run(c)]

    def metas(self) -> list[dict]:
        """For each call of calls(): the fake's process id, DOCKER_BUILDKIT and a Dockerfile it read from stdin."""
        meta = Path(f"{self.log}.meta")
        return [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines()] if meta.exists() else []

    def train(self, *args: str, **env) -> tuple[list[str], list[str], subprocess.CompletedProcess]:
        """./train.sh ARGS in Docker: (docker run options before the image, the command inside, the process)."""
        p = self.run(TRAIN_SH, *args, **env)
        assert p.returncode == 0, p.stderr
        opts, inner = split_run(self.runs()[-1])
        return opts, inner, p


def is_config_run(call: list[str]) -> bool:
    return call[-1:] == ["--print-config=shell"]


def split_run(call: list[str]) -> tuple[list[str], list[str]]:
    """A `docker run` argv -> (its options, the command after the image)."""
    i = call.index(IMAGE)
    return call[1:i], call[i + 1:]


def pairs(argv: list[str]) -> list[tuple[str, str]]:
    return list(zip(argv, argv[1:]))


def bind_mounts(opts: list[str]) -> dict[str, str]:
    """The mounts of `docker run` options, {target: source}. Each must be `--mount type=bind,source=S,target=T` as
    Docker reads it (fields split at commas, each KEY=VALUE); no -v is left (it splits its spec at colons)."""
    assert "-v" not in opts and "--volume" not in opts, opts
    mounts = {}
    for flag, spec in pairs(opts):
        if flag == "--mount":
            fields = [f.split("=", 1) for f in spec.split(",")]
            assert [f[0] for f in fields] == ["type", "source", "target"] and fields[0][1] == "bind", spec
            assert fields[2][1] not in mounts, f"two mounts at {fields[2][1]}"
            mounts[fields[2][1]] = fields[1][1]
    return mounts


def parse_forwarded(parser, argv: list[str]):
    """argv as the program's own argparse parser reads it (a value it takes for a flag fails the test)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{parser.prog} could not parse {argv}: {err.getvalue().strip()}")


def one_error_line(p: subprocess.CompletedProcess, script: str) -> str:
    """The wrapper's refusal: exit 2 and one line on stderr."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), p.stderr
    return lines[0]


def usage_error_line(p: subprocess.CompletedProcess, script: str) -> str:
    """A bad flag or combination: exit 2, the error line, then the pointer to --help."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{script}: error: ") and "--help" in lines[1], p.stderr
    return lines[0]


def dry_run_commands(stdout: str) -> list[list[str]]:
    """The command lines a --dry-run printed (the lines that are not the wrapper's own messages, nor the mkdir -p
    that Docker's mounts need first)."""
    return [shlex.split(line) for line in stdout.splitlines()
            if line and not re.match(r"^\w+\.sh: ", line) and not line.startswith("mkdir -p ")]


def run_trainer_main(argv: list[str], world_size: str | None = None) -> dict:
    """`python SCRIPT WORDS...` for this repository's trainers, as their main() in this process: status and output;
    world_size: the container's WORLD_SIZE."""
    import train_gpt_medium

    script, *words = argv
    entry = {"train_gpt.py": train_gpt.main, "train_gpt_medium.py": train_gpt_medium.main}[script]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.MonkeyPatch.context() as mp:
        if world_size is not None:
            mp.setenv("WORLD_SIZE", world_size)
        try:
            rc = entry(words)
        except SystemExit as e:  # argparse's exits
            rc = e.code if isinstance(e.code, int) else 1
        except Exception:  # reported as the program would
            import traceback
            traceback.print_exc()
            rc = 1
    return dict(rc=rc, out=out.getvalue(), err=err.getvalue())


@pytest.fixture(scope="session")
def config_socket(tmp_path_factory):
    """Where the fake docker asks for --print-config=shell answers (a subprocess would import torch: 2 s a run)."""
    path = tmp_path_factory.mktemp("print-config") / "socket"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed at the end of the session
                return
            with conn:
                asked = json.loads(b"".join(iter(lambda: conn.recv(65536), b"")))
                conn.sendall(json.dumps(run_trainer_main(asked["argv"], asked["world_size"])).encode())

    threading.Thread(target=serve, daemon=True).start()
    yield path
    server.close()


@pytest.fixture
def kit(tmp_path, config_socket) -> Kit:
    return Kit(tmp_path, config_socket)


@pytest.fixture
def bin_dir(tmp_path) -> Path:
    """A data directory outside the repository that already holds a shard (so nothing is downloaded)."""
    d = tmp_path / "mydata"
    d.mkdir()
    (d / "x_train_000001.bin").write_bytes(b"")
    return d


# --- train.sh in Docker ----------------------------------------------------------------------------------------------

# train.sh's own flags aside, the words go to train_gpt.py as given; only the paths are translated (to --flag=PATH)
FLAG_CASES = [
    (["--wandb"], ["--wandb"]),
    (["--train-seq-len", "1024"], ["--train-seq-len", "1024"]),
    (["--val-seq-len=2048"], ["--val-seq-len=2048"]),
    (["--set", "max_batch_span_multiplier=1.5"], ["--set", "max_batch_span_multiplier=1.5"]),
    (["--set", "model_dim=64", "--set", "num_layers=2"], ["--set", "model_dim=64", "--set", "num_layers=2"]),
    (["--no-compile"], ["--no-compile"]),
    (["--num-iterations", "3"], ["--num-iterations", "3"]),
    (["--muon-lr", "2e-2"], ["--muon-lr", "2e-2"]),
    (["--preset", "tiny"], ["--preset", "tiny"]),
    (["--save-every-minutes", "7.5"], ["--save-every-minutes", "7.5"]),
    (["--run-name", "my-run"], ["--run-name", "my-run"]),
    (["--resume"], ["--resume"]),
    (["--resume", "checkpoints/old-run"], ["--resume=checkpoints/old-run"]),
    (["--resume=checkpoints/old-run"], ["--resume=checkpoints/old-run"]),
    (["--", "--seed", "5", "--no-fp8"], ["--seed", "5", "--no-fp8"]),
]


def contains(seq: list[str], sub: list[str]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("flags,expected", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_train_flag_reaches_train_gpt(kit, flags, expected):
    # --preset tiny: the built-in corpus, so no download call; --resume PATH is given relative to the repository,
    # and names no checkpoint: the trainer's answer is the tiny preset's (a resumed run takes no --preset)
    resume = flags[0].startswith("--resume")
    preset = [] if flags[:1] == ["--preset"] or resume else ["--preset", "tiny"]
    kit.tmp = ROOT if resume else kit.tmp
    answer = {"FAKE_DOCKER_PRINT_CONFIG": shell_config("--preset", "tiny")} if resume else {}
    _, inner, _ = kit.train(*preset, *flags, **answer)
    script = inner.index("train_gpt.py")
    assert contains(inner[script + 1:], expected), inner
    if flags == ["--resume"]:
        assert inner[-1] == "--resume"
    (config,) = kit.config_runs()  # the trainer read the same words first
    assert split_run(config)[1] == ["python", *inner[script:], "--print-config=shell"]


def test_train_docker_run_options(kit):
    opts, inner, p = kit.train("--preset", "tiny", *ANY_COUNT, FAKE_GPUS="8")
    assert opts[:1] == ["--rm"]
    assert "-t" not in opts and "-i" not in opts and "-it" not in opts  # stdin is not a terminal
    assert "--init" in opts  # PID 1 passes SIGTERM on
    assert "--ipc=host" in opts
    assert ("--user", f"{os.getuid()}:{os.getgid()}") in pairs(opts)
    assert ("-e", "HOME=/tmp") in pairs(opts)
    assert ("--ulimit", "memlock=-1") in pairs(opts) and ("--ulimit", "stack=67108864") in pairs(opts)
    mounts = bind_mounts(opts)
    assert mounts["/workspace"] == str(ROOT)
    for name in ("data", "checkpoints", "logs"):
        assert f"/workspace/{name}" in mounts, mounts
    assert mounts["/hf-cache"] == f"{kit.home}/.cache/huggingface"
    assert ("-w", "/workspace") in pairs(opts)
    assert ("--gpus", "all") in pairs(opts)
    assert "--network" not in opts
    assert inner[:4] == ["python", "lib/torchrun.py", "--standalone", "--nproc_per_node=8"]  # FAKE_GPUS=8
    assert "NCCL_P2P_DISABLE" not in json.dumps(kit.calls()) + p.stdout + p.stderr
    assert "WANDB_API_KEY" not in json.dumps(kit.calls())
    for key in ("preset:", "GPUs:", "nodes:", "runtime:", "data:", "run name:"):
        assert key in p.stdout
    # first the trainer's settings, read the same way: same image and mounts, no GPU, no terminal
    (config,) = kit.config_runs()
    config_opts, config_inner = split_run(config)
    assert config_inner == ["python", "train_gpt.py", "--preset", "tiny", *ANY_COUNT, "--print-config=shell"]
    assert "--gpus" not in config_opts and ("--ulimit", "memlock=-1") not in pairs(config_opts)
    assert bind_mounts(config_opts) == mounts and "--init" in config_opts


def test_the_run_knows_how_it_was_started_and_where(kit, tmp_path):
    """What the trainer needs for the commands it prints at a stop: the wrapper with its runtime and path flags, the
    whole command, the repository and the current directory on this host. The settings are checked for the run's
    number of processes before any starts."""
    args = ["--preset", "tiny", "--gpus", "0,1", "--no-memlock", "--checkpoint-dir", str(tmp_path / "ck"),
            "--num-iterations", "5", "--set", "model_dim=64"]
    opts, _, _ = kit.train(*args)
    env = dict(b.split("=", 1) for a, b in pairs(opts) if a == "-e" and "=" in b)
    assert shlex.split(env["KIT_LAUNCH"]) == [str(TRAIN_SH), "--gpus", "0,1", "--no-memlock", "--checkpoint-dir",
                                              str(tmp_path / "ck")]
    assert shlex.split(env["KIT_COMMAND"]) == [str(TRAIN_SH), *args]
    assert env["KIT_HOST_ROOT"] == str(ROOT) and env["KIT_HOST_CWD"] == str(kit.tmp)
    assert bind_mounts(opts)[str(tmp_path / "ck")] == str(tmp_path / "ck")  # mounted: nothing lost in a container
    config_opts, _ = split_run(kit.config_runs()[0])
    assert ("-e", "WORLD_SIZE=2") in pairs(config_opts)


def test_train_hf_home_is_mounted(kit, tmp_path):
    opts, _, _ = kit.train("--preset", "tiny", HF_HOME=str(tmp_path / "hf"))
    assert (tmp_path / "hf").is_dir()
    assert bind_mounts(opts)["/hf-cache"] == str(tmp_path / "hf")


def test_compile_cache_persists_on_the_host(kit):
    # the container's /tmp goes with it: without a mounted cache every run would compile from scratch
    opts, _, p = kit.train("--preset", "tiny")
    host = kit.home / ".cache" / "nanogpt-speedrun" / "compile"
    assert host.is_dir()  # created by the wrapper, so Docker does not create it owned by root
    assert bind_mounts(opts)["/compile-cache"] == str(host)
    assert ("-e", "TORCHINDUCTOR_CACHE_DIR=/compile-cache/inductor") in pairs(opts)
    assert ("-e", "TRITON_CACHE_DIR=/compile-cache/triton") in pairs(opts)
    assert f"compile cache: {host}" in p.stdout


def test_compile_cache_location(kit, tmp_path):
    opts, _, _ = kit.train("--preset", "tiny", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert bind_mounts(opts)["/compile-cache"] == str(tmp_path / "xdg" / "nanogpt-speedrun" / "compile")
    opts, _, _ = kit.train("--preset", "tiny", KIT_COMPILE_CACHE="rel/cache")  # relative to where it is run
    assert bind_mounts(opts)["/compile-cache"] == str(kit.tmp / "rel" / "cache")
    assert (kit.tmp / "rel" / "cache").is_dir()


@pytest.mark.slow  # runs the local trainer's --print-config (a torch import)
def test_local_compile_cache_unless_set(kit, tmp_path):
    host = kit.home / ".cache" / "nanogpt-speedrun" / "compile"
    tiny = ["--preset", "tiny", "--num-gpus", "2"]  # the tiny preset's 2 sequences a step: at most 2 processes
    def cache_env(cmd):  # the env words but the run's own (KIT_*: how it was started)
        return [w for w in cmd[:cmd.index("lib/torchrun.py") - 1] if not w.startswith("KIT_")]

    p = kit.run(TRAIN_SH, "--local", "--dry-run", *tiny)
    (cmd,) = dry_run_commands(p.stdout)
    assert cache_env(cmd) == ["env", f"TORCHINDUCTOR_CACHE_DIR={host}/inductor", f"TRITON_CACHE_DIR={host}/triton"]
    p = kit.run(TRAIN_SH, "--local", "--dry-run", *tiny, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "mine"))
    (cmd,) = dry_run_commands(p.stdout)
    assert cache_env(cmd) == ["env", f"TRITON_CACHE_DIR={host}/triton"]
    assert "TORCHINDUCTOR_CACHE_DIR" not in " ".join(cmd)
    assert f"compile cache: {tmp_path / 'mine'} (from TORCHINDUCTOR_CACHE_DIR)" in p.stdout


def test_train_tty_adds_t_and_i(kit):
    master, slave = pty.openpty()
    try:
        p = kit.run(TRAIN_SH, "--preset", "tiny", stdin=slave)
    finally:
        os.close(slave)
        os.close(master)
    assert p.returncode == 0, p.stderr
    opts, _ = split_run(kit.runs()[-1])
    assert "-t" in opts and "-i" in opts
    config_opts, _ = split_run(kit.config_runs()[0])  # its output is read back: a terminal would mix stderr in
    assert "-t" not in config_opts and "-i" not in config_opts


def test_wandb_key_passed_by_name_only(kit):
    opts, inner, p = kit.train("--preset", "tiny", "--wandb", WANDB_API_KEY=SECRET)
    assert ("-e", "WANDB_API_KEY") in pairs(opts)
    assert "--wandb" in inner
    assert SECRET not in kit.log.read_text(encoding="utf-8")
    assert SECRET not in p.stdout + p.stderr
    dry = kit.run(TRAIN_SH, "--dry-run", "--preset", "tiny", "--wandb", WANDB_API_KEY=SECRET)
    assert dry.returncode == 0 and "WANDB_API_KEY" in dry.stdout
    assert SECRET not in dry.stdout + dry.stderr


def test_gpu_list(kit):
    opts, inner, _ = kit.train("--preset", "tiny", "--gpus", "0,2", FAKE_GPUS="8")
    assert ("--gpus", '"device=0,2"') in pairs(opts)
    assert "--nproc_per_node=2" in inner


def test_num_gpus(kit):
    opts, inner, _ = kit.train("--preset", "tiny", "--num-gpus", "3", *ANY_COUNT, FAKE_GPUS="8")
    assert ("--gpus", '"device=0,1,2"') in pairs(opts)
    assert inner[:4] == ["python", "lib/torchrun.py", "--standalone", "--nproc_per_node=3"]


def test_nccl_p2p_disable(kit):
    opts, _, _ = kit.train("--preset", "tiny", "--nccl-p2p-disable")
    assert ("-e", "NCCL_P2P_DISABLE=1") in pairs(opts)


def test_multi_node(kit):
    opts, inner, _ = kit.train("--preset", "tiny", "--num-gpus", "8", "--nnodes", "2", "--node-rank", "1",
                               "--master-addr", "10.1.2.3", "--master-port", "29611", *ANY_COUNT, FAKE_GPUS="8")
    assert ("--network", "host") in pairs(opts)
    assert inner[:2] == ["python", "lib/torchrun.py"] and "--standalone" not in inner
    launcher = inner[:inner.index("train_gpt.py")]
    for arg in ("--nnodes=2", "--node_rank=1", "--master_addr=10.1.2.3", "--master_port=29611",
                "--nproc_per_node=8"):
        assert arg in launcher


def test_custom_data_dir_outside_repo_is_mounted(kit, bin_dir):
    opts, inner, _ = kit.train("--data-dir", str(bin_dir))
    assert bind_mounts(opts)[str(bin_dir)] == str(bin_dir)
    assert f"--data-dir={bin_dir}" in inner
    assert len(kit.runs()) == 1  # files there: nothing downloaded


def test_host_paths_with_colons_are_bind_mounted(kit, tmp_path):
    # `-v a:b:c` is no volume spec: every host path the wrappers mount goes through --mount, in --dry-run too
    data = tmp_path / "my:data"
    data.mkdir()
    (data / "x_train_000001.bin").write_bytes(b"")
    hf, cache = tmp_path / "hf:cache", tmp_path / "compile:cache"
    opts, inner, _ = kit.train("--data-dir", str(data), HF_HOME=str(hf), KIT_COMPILE_CACHE=str(cache))
    mounts = bind_mounts(opts)
    assert (mounts[str(data)], mounts["/hf-cache"], mounts["/compile-cache"]) == (str(data), str(hf), str(cache))
    assert f"--data-dir={data}" in inner
    ckpt = tmp_path / "run:1"
    ckpt.mkdir()
    p = kit.run(GENERATE_SH, "--dry-run", "--checkpoint", str(ckpt), HF_HOME=str(hf))
    (cmd,) = dry_run_commands(p.stdout)
    mounts = bind_mounts(cmd[2:cmd.index(IMAGE)])
    assert (mounts[str(ckpt)], mounts["/hf-cache"]) == (str(ckpt), str(hf))


def test_repository_and_its_symlinked_dirs_with_colons_are_bind_mounted(kit, tmp_path):
    # a copy of the wrapper in a directory with a colon, its logs/ a symlink to another one
    root = tmp_path / "kit:copy"
    (root / "lib").mkdir(parents=True)
    shutil.copy2(TRAIN_SH, root / "train.sh")
    shutil.copy2(ROOT / "lib" / "common.sh", root / "lib" / "common.sh")
    (root / "train_gpt.py").write_text("", encoding="utf-8")
    logs = tmp_path / "logs:elsewhere"
    logs.mkdir()
    (root / "logs").symlink_to(logs)
    # the copy's trainer is an empty file: the settings come from the real one's answer
    p = kit.run(root / "train.sh", "--preset", "tiny", FAKE_DOCKER_PRINT_CONFIG=shell_config("--preset", "tiny"))
    assert p.returncode == 0, p.stderr
    mounts = bind_mounts(split_run(kit.runs()[-1])[0])
    assert mounts["/workspace"] == str(root) and mounts["/workspace/logs"] == str(logs)
    assert mounts["/workspace/data"] == str(root / "data")


@pytest.mark.parametrize("char", [",", '"'])
@pytest.mark.parametrize("where", ["--data-dir", "--resume", "--checkpoint", "HF_HOME", "KIT_COMPILE_CACHE"])
def test_host_path_that_mount_cannot_take_is_refused(kit, tmp_path, where, char):
    # Docker splits a --mount spec at commas (and a double quote starts a quoted field): such a path is refused
    bad = tmp_path / f"a{char}b"
    bad.mkdir()
    (bad / "x_train_000001.bin").write_bytes(b"")
    if where == "--checkpoint":
        p = kit.run(GENERATE_SH, "--checkpoint", str(bad))
    elif where.startswith("--"):
        p = kit.run(TRAIN_SH, "--preset", "tiny", where, str(bad))
    else:
        p = kit.run(TRAIN_SH, "--preset", "tiny", **{where: str(bad)})
    line = one_error_line(p, "generate.sh" if where == "--checkpoint" else "train.sh")
    assert str(bad) in line and "comma" in line and "--local" in line and where in line
    assert not kit.runs()


def test_missing_path_outside_the_repo_is_not_mounted(kit, tmp_path):
    # nothing to mount (a bind mount would fail on it; -v made it, owned by root): the program reports it missing
    missing = tmp_path / "runs" / "step_000005.pt"
    p = kit.run(GENERATE_SH, "--dry-run", "--checkpoint", str(missing))
    (cmd,) = dry_run_commands(p.stdout)
    mounts = bind_mounts(cmd[2:cmd.index(IMAGE)])
    assert str(missing) not in mounts and str(missing.parent) not in mounts
    assert f"--checkpoint={missing}" in cmd
    opts, inner, _ = kit.train("--resume", str(missing), FAKE_DOCKER_PRINT_CONFIG=shell_config("--preset", "tiny"))
    assert str(missing) not in bind_mounts(opts) and f"--resume={missing}" in inner


def test_readme_interactive_example_mounts_like_the_wrapper(kit):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "docker run --rm -it" in b]
    assert len(blocks) == 1, "README's interactive `docker run` example"
    command = blocks[0].replace("\\\n", " ")
    argv = shlex.split(command[command.index("docker run"):].splitlines()[0])
    readme_opts = argv[2:argv.index(IMAGE)]
    readme = bind_mounts(readme_opts)
    opts, _, _ = kit.train("--preset", "tiny")
    wrapper = bind_mounts(opts)
    assert set(readme) == {"/workspace", "/hf-cache", "/compile-cache"} and set(readme) <= set(wrapper)
    assert {b for a, b in pairs(readme_opts) if a == "-e"} <= {b for a, b in pairs(opts) if a == "-e"}
    assert "--init" in readme_opts and "--init" in opts
    # tests/docker/e2e.sh runs this block on a machine without GPUs: it drops exactly these and replaces bash
    assert " --gpus all" in command and " --ulimit memlock=-1" in command and command.rstrip().endswith(" bash")


def shell_config(*argv: str, presets=None, default_preset="speedrun") -> str:
    """What train_gpt.py ARGV --print-config=shell prints (in this process: no torch import of its own)."""
    hp = train_gpt.parse_args(list(argv), presets, default_preset)
    return train_gpt.format_config(hp, "shell")


def test_download_computed_by_the_trainer(kit, tmp_path):
    empty = tmp_path / "fw"
    _, inner, p = kit.train("--preset", "speedrun", "--data-dir", str(empty))
    download, train = kit.runs()
    _, dl_inner = split_run(download)
    # the speedrun: 1695 steps x 393,216 tokens x 1.1 / 1e8 -> 8 shards (data/fineweb.py's shards_needed)
    assert dl_inner == ["python", "data/cached_fineweb10B.py", "8", f"--data-dir={empty}"]
    assert "--gpus" not in download
    assert empty.is_dir()  # created before docker runs: a bind mount needs its source, and it is not root's
    assert bind_mounts(split_run(download)[0])[str(empty)] == str(empty)
    assert bind_mounts(split_run(train)[0])[str(empty)] == str(empty)
    assert "8 train shards, downloading the missing ones first" in p.stdout


@pytest.mark.parametrize("flags", [["--preset", "speedrun", "--num-iterations", "100"],
                                   ["--preset", "a10", "--set", "seqs_per_step=64"],
                                   ["--preset=speedrun", "--num-iterations", "1000", "--set", "seqs_per_step=64"],
                                   ["--train-seq-len", "1024", "--", "--preset", "speedrun", "--num-iterations=20000"],
                                   ["--medium"]])
def test_download_count_is_the_trainers(kit, tmp_path, flags):
    """The shard count is train_gpt.py's fineweb_shards for the same words (train.sh knows no preset's numbers)."""
    import train_gpt_medium

    kit.train(*flags, "--data-dir", str(tmp_path / "fw"))
    _, dl_inner = split_run(kit.runs()[0])
    words = [f for f in flags if f not in ("--medium", "--")]
    if "--medium" in flags:
        hp = train_gpt.parse_args(words, train_gpt_medium.PRESETS, "medium")
        assert "train_gpt_medium.py" in split_run(kit.config_runs()[0])[1]
    else:
        hp = train_gpt.parse_args(words)
    assert int(dl_inner[2]) == train_gpt.derived_settings(hp)["fineweb_shards"]
    assert int(dl_inner[2]) != train_gpt.derived_settings(train_gpt.Hyperparameters())["fineweb_shards"]


def test_download_count_comes_from_print_config_alone(kit, tmp_path):
    # an answer no preset gives: the wrapper downloads what the trainer says, computing nothing itself
    answer = shell_config().replace("fineweb_shards=8", "fineweb_shards=5")
    assert answer != shell_config()
    kit.train("--data-dir", str(tmp_path / "fw"), FAKE_DOCKER_PRINT_CONFIG=answer)
    _, dl_inner = split_run(kit.runs()[0])
    assert dl_inner[:3] == ["python", "data/cached_fineweb10B.py", "5"]
    kit.log.unlink()
    kit.train("--data-dir", str(tmp_path / "fw"), FAKE_DOCKER_PRINT_CONFIG=answer.replace("=5", "=0"))
    assert len(kit.runs()) == 1  # 0: not FineWeb's files, nothing to download


def test_resume_plans_with_the_checkpoints_settings(kit, tmp_path):
    # without --preset a resumed run has the checkpoint's settings: the trainer reads them, train.sh plans with them
    import torch

    hp = dataclasses.replace(train_gpt.Hyperparameters(), num_iterations=100, run_name="old")
    ckpt = tmp_path / "runs" / "old" / "step_000050.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"format": train_gpt.CHECKPOINT_FORMAT, "version": train_gpt.CHECKPOINT_VERSION,
                "hyperparameters": dataclasses.asdict(hp)}, ckpt)
    p = kit.run(TRAIN_SH, "--dry-run", "--resume", str(ckpt), "--data-dir", str(tmp_path / "fw"))
    assert p.returncode == 0, p.stderr
    download, train = dry_run_commands(p.stdout)
    assert download[download.index("data/cached_fineweb10B.py") + 1] == "1"  # its 100 steps, not the preset's 1695
    assert "run name:  old" in p.stdout and f"--resume={ckpt}" in train
    assert "preset:    speedrun (the checkpoint's settings; flags given override them)" in p.stdout
    assert bind_mounts(split_run(kit.config_runs()[0])[0])[str(ckpt.parent)] == str(ckpt.parent)  # it read it


def test_default_is_preset_auto_asked_on_the_runs_gpus(kit, tmp_path):
    """Without --preset or --resume, train.sh asks for --preset auto, and asks the trainer about it in a container
    with the run's GPUs and WORLD_SIZE, so that the fit is measured where the run will be; it prints the reason."""
    answer = shell_config("--preset", "speedrun") + "\nfit='2 x GPU (21.9 GiB free): 12,288-token sequences'"
    _, inner, p = kit.train("--data-dir", str(tmp_path / "fw"), FAKE_GPUS="2", FAKE_DOCKER_PRINT_CONFIG=answer)
    config_opts, config_inner = split_run(kit.config_runs()[0])
    assert config_inner[2:4] == ["--preset", "auto"] and inner[inner.index("train_gpt.py") + 1:][:2] == ["--preset",
                                                                                                        "auto"]
    assert "--gpus" in config_opts and "WORLD_SIZE=2" in [config_opts[i + 1] for i, o in enumerate(config_opts)
                                                         if o in ("-e", "--env")]
    assert "fitted:    2 x GPU (21.9 GiB free): 12,288-token sequences" in p.stdout


@pytest.mark.parametrize("flags", [["--preset", "a10"], ["--preset=tiny"], ["--", "--preset", "speedrun"],
                                   ["--medium"]])
def test_a_chosen_preset_is_asked_without_gpus(kit, tmp_path, flags):
    kit.train(*flags, "--data-dir", str(tmp_path / "fw"), FAKE_GPUS="2",
              FAKE_DOCKER_PRINT_CONFIG=shell_config("--preset", "tiny"))
    config_opts, config_inner = split_run(kit.config_runs()[0])
    assert "auto" not in config_inner and "--gpus" not in config_opts
    assert ("-e", "WORLD_SIZE=2") in pairs(config_opts)  # checked for the run's processes, before they start


def test_download_shards_flag(kit, tmp_path):
    kit.train("--preset", "speedrun", "--data-dir", str(tmp_path / "fw"), "--shards", "3")
    _, dl_inner = split_run(kit.runs()[0])
    assert dl_inner[:3] == ["python", "data/cached_fineweb10B.py", "3"]


def test_no_download_for_tiny(kit):
    _, _, p = kit.train("--preset", "tiny")
    assert len(kit.runs()) == 1
    assert "data:      data/builtin (builtin_train_*.bin; nothing to download)" in p.stdout


def test_medium(kit):
    p = kit.run(TRAIN_SH, "--medium", "--shards", "1")
    assert p.returncode == 0, p.stderr
    assert "train_gpt_medium.py" in kit.runs()[-1] and "preset:    medium (train_gpt_medium.py)" in p.stdout
    assert kit.run(TRAIN_SH, "--medium", "--preset", "medium", "--shards", "1").returncode == 0


def test_medium_refuses_a_track_1_preset_before_any_download(kit):
    kit.log.unlink(missing_ok=True)
    p = kit.run(TRAIN_SH, "--medium", "--preset", "a10")
    assert p.returncode == 2
    assert p.stderr.strip().endswith("train_gpt_medium.py: error: argument --preset: invalid choice: 'a10' (choose "
                                     "from 'medium') (see --help)")
    assert not kit.runs()  # no download, no training: only the trainer's answer was asked for


@pytest.mark.parametrize("flags,words", [
    (["--num-iterations", "abc"], "argument --num-iterations: invalid int value: 'abc'"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--set", "model_dim=wide"], "--set model_dim=wide: model_dim takes a whole number, got 'wide'"),
    (["--no-torch-compile"], "unrecognized arguments: --no-torch-compile"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--", "--val-tokens", "1000"], "--val-tokens 1000 must be a multiple of --val-seq-len"),
])
@pytest.mark.parametrize("runtime", ["docker", pytest.param("local", marks=pytest.mark.slow)])
def test_trainer_flag_error_is_the_trainers_one_line(kit, runtime, flags, words):
    # train.sh checks none of them: train_gpt.py does, before anything runs, and its line is all the user sees
    local = ["--local"] if runtime == "local" else []
    p = kit.run(TRAIN_SH, *local, "--preset", "tiny", *flags)
    line = one_error_line(p, "train_gpt.py")
    assert words in line
    assert not kit.runs() and len(kit.config_runs()) == (runtime == "docker")
    assert "train.sh: preset:" not in p.stdout  # it stopped before planning the run


@pytest.mark.slow  # runs the local trainer's --print-config (a torch import)
def test_trainer_help_comes_from_the_trainer(kit):
    # train.sh's own help lists only its flags; -- --help (or -h) is the trainer's, from the trainer, on no GPU
    kit.hide_nvidia_smi()
    p = kit.run(TRAIN_SH, "--preset", "tiny", "--", "-h")
    assert p.returncode == 0, p.stderr
    (run,) = kit.runs()
    opts, inner = split_run(run)
    assert inner == ["python", "train_gpt.py", "--help"] and "--gpus" not in opts
    p = kit.run(TRAIN_SH, "--local", "--", "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: train_gpt.py") and "--set FIELD=VALUE" in p.stdout


@pytest.mark.parametrize("runtime", ["docker", pytest.param("local", marks=pytest.mark.slow)])
def test_train_values_that_look_like_flags_stay_values(kit, bin_dir, runtime):
    # the paths train.sh translates go as --flag=PATH (argparse would read `--data-dir -x` as two flags); the other
    # words go as given, so they stay what train_gpt.py makes of them: --run-name=-x, --seed -5
    local = ["--local"] if runtime == "local" else []
    if local:  # the real trainer answers --print-config, so --resume needs a checkpoint's settings to read
        hp = dataclasses.asdict(train_gpt.preset_hyperparameters("tiny"))
        from runlib import checkpoints
        checkpoints.atomic_save({"format": checkpoints.CHECKPOINT_FORMAT, "hyperparameters": hp,
                                 "version": checkpoints.CHECKPOINT_VERSION}, bin_dir / "step_000001.pt")
    p = kit.run(TRAIN_SH, "--dry-run", *local, "--data-dir", str(bin_dir), "--run-name=-x", "--seed", "-5",
                "--set", "no_attn_layer=-1", "--resume", str(bin_dir), "--num-gpus", "2",
                FAKE_DOCKER_PRINT_CONFIG=shell_config("--preset", "tiny"))
    assert p.returncode == 0, p.stderr
    cmd = dry_run_commands(p.stdout)[-1]
    ns = parse_forwarded(train_gpt.build_arg_parser(), cmd[cmd.index("train_gpt.py") + 1:])
    assert (ns.run_name, ns.seed, ns.set) == ("-x", -5, ["no_attn_layer=-1"])
    assert ns.data_dir == str(bin_dir) and ns.resume == str(bin_dir)


def test_train_data_dir_that_looks_like_a_flag_stays_a_value(kit):
    # inside the repository the path goes relative: "-new" (not there, so downloaded first; --dry-run makes nothing)
    from data import fineweb

    kit.tmp = ROOT
    p = kit.run(TRAIN_SH, "--dry-run", "--preset", "speedrun", "--data-dir", "-new")
    assert p.returncode == 0, p.stderr
    download, train = dry_run_commands(p.stdout)
    args = download[download.index("data/cached_fineweb10B.py") + 1:]
    assert parse_forwarded(fineweb.build_arg_parser("fineweb10B"), args).data_dir == "-new"
    ns = parse_forwarded(train_gpt.build_arg_parser(), train[train.index("train_gpt.py") + 1:])
    assert ns.data_dir == "-new"
    assert not (ROOT / "-new").exists()


# --- train.sh --local (dry run) --------------------------------------------------------------------------------------

@pytest.mark.slow  # runs the local trainer's --print-config (a torch import)
def test_local_single_process_is_plain_python(kit):
    p = kit.run(TRAIN_SH, "--local", "--dry-run", "--preset", "tiny", "--num-iterations", "3", FAKE_GPUS="0")
    assert p.returncode == 0, p.stderr
    (cmd,) = dry_run_commands(p.stdout)
    python = cmd.index(str(Path(sys.prefix) / "bin" / "python"))
    assert cmd[0] == "env" and all("=" in pair for pair in cmd[1:python])  # only the compile cache's variables
    assert cmd[python + 1:] == ["train_gpt.py", "--preset", "tiny", "--num-iterations", "3"]
    assert "local virtualenv" in p.stdout
    assert not kit.calls()  # no docker at all


@pytest.mark.slow  # runs the local trainer's --print-config (a torch import)
def test_local_gpu_list_and_nccl(kit):
    p = kit.run(TRAIN_SH, "--local", "--dry-run", "--preset", "tiny", "--gpus", "0,2", "--nccl-p2p-disable",
                FAKE_GPUS="8")
    assert p.returncode == 0, p.stderr
    (cmd,) = dry_run_commands(p.stdout)
    assert cmd[:3] == ["env", "CUDA_VISIBLE_DEVICES=0,2", "NCCL_P2P_DISABLE=1"]
    python = cmd.index(str(Path(sys.prefix) / "bin" / "python"))
    assert cmd[python + 1:python + 5] == ["lib/torchrun.py", "--standalone", "--nproc_per_node=2", "train_gpt.py"]


@pytest.mark.slow  # runs the local trainer's --print-config (a torch import)
@pytest.mark.parametrize("gpus", ["no nvidia-smi", "nvidia-smi lists none"])
def test_local_run_without_gpus_starts_cpu_processes(kit, gpus):
    # a CPU machine either way: --num-gpus N is N processes on the CPU (gloo), and the settings say so
    if gpus == "no nvidia-smi":
        kit.hide_nvidia_smi()
    p = kit.run(TRAIN_SH, "--local", "--dry-run", "--preset", "tiny", "--num-gpus", "2", FAKE_GPUS="0")
    assert p.returncode == 0, p.stderr
    (cmd,) = dry_run_commands(p.stdout)
    assert "--nproc_per_node=2" in cmd
    assert "devices: none (CPU)" in p.stdout


def test_local_gpu_list_without_nvidia_smi_is_refused(kit):
    # --gpus names GPUs that cannot be counted: CUDA_VISIBLE_DEVICES=0,3 with fewer GPUs would train on the CPU
    kit.hide_nvidia_smi()
    p = kit.run(TRAIN_SH, "--local", "--preset", "tiny", "--gpus", "0,3")
    line = one_error_line(p, "train.sh")
    assert "--gpus 0,3 cannot be checked" in line and "nvidia-smi is not on PATH" in line
    p = kit.run(TRAIN_SH, "--local", "--dry-run", "--preset", "tiny", "--gpus", "0,3")  # printed, with a warning
    assert p.returncode == 0 and "the commands below are for 2 GPU(s), unchecked" in p.stderr


@pytest.mark.slow  # runs the local trainer's --print-config (a torch import)
def test_local_cuda_visible_devices_are_the_visible_gpus(kit):
    def local(*flags, cvd):
        return kit.run(TRAIN_SH, "--local", "--dry-run", "--preset", "tiny", *flags, CUDA_VISIBLE_DEVICES=cvd,
                       FAKE_GPUS="8")

    p = local(cvd="2,3")  # of the fake's 8: the default is these two
    assert p.returncode == 0, p.stderr
    (cmd,) = dry_run_commands(p.stdout)
    assert "--nproc_per_node=2" in cmd
    p = local("--num-gpus", "3", cvd="2,3")
    assert p.returncode == 2 and "--num-gpus 3" in p.stderr and "CUDA_VISIBLE_DEVICES=2,3 leaves (2)" in p.stderr
    p = local("--gpus", "4,5,6", "--set", "seqs_per_step=6", cvd="2,3")  # --gpus replaces it
    assert p.returncode == 0, p.stderr
    (cmd,) = dry_run_commands(p.stdout)
    assert "CUDA_VISIBLE_DEVICES=4,5,6" in cmd and "--nproc_per_node=3" in cmd
    for cvd in ("", "-1"):  # no GPU visible: the CPU
        p = local(cvd=cvd)
        assert p.returncode == 0, p.stderr
        assert "devices: none (CPU)" in p.stdout
        (cmd,) = dry_run_commands(p.stdout)
        assert cmd[cmd.index("train_gpt.py") - 1].endswith("/python")


# --- errors ----------------------------------------------------------------------------------------------------------

def test_unknown_flag(kit):
    # train.sh hands the flags it does not know to train_gpt.py (test_trainer_flag_error_is_the_trainers_one_line)
    for script in (GENERATE_SH, BUILD_SH):
        p = kit.run(script, "--bogus")
        assert p.returncode == 2
        assert p.stderr.splitlines() == [f"{script.name}: error: unknown flag --bogus",
                                         f"Run '{script.name} --help' for the list of flags."]
    p = kit.run(GENERATE_SH, "--promt", "x")  # a typo: the flag it is closest to
    assert p.returncode == 2 and "generate.sh: error: unknown flag --promt (did you mean --prompt?)" in p.stderr
    p = kit.run(BUILD_SH, "--no-cach")
    assert "build.sh: error: unknown flag --no-cach (did you mean --no-cache?)" in p.stderr
    assert not kit.runs()


TRAIN_NUMERIC = ["--num-gpus", "--nnodes", "--node-rank", "--master-port", "--shards"]
GENERATE_NUMERIC = ["--max-tokens", "--top-k", "--seed", "--num-samples", "--temperature", "--top-p"]


@pytest.mark.parametrize("script,flag", [(TRAIN_SH, f) for f in TRAIN_NUMERIC]
                         + [(GENERATE_SH, f) for f in GENERATE_NUMERIC])
def test_non_number_names_the_flag(kit, script, flag):
    p = kit.run(script, flag, "abc")
    assert p.returncode == 2
    assert flag in p.stderr and "abc" in p.stderr
    assert not kit.runs()


def test_missing_value(kit):
    p = kit.run(TRAIN_SH, "--data-dir")
    assert p.returncode == 2 and "--data-dir needs a value" in p.stderr


@pytest.mark.parametrize("flags", [["--num-gpus", "4"], ["--gpus", "0,3"]])
def test_too_many_gpus(kit, flags):
    p = kit.run(TRAIN_SH, "--preset", "tiny", *flags, FAKE_GPUS="2")
    assert p.returncode == 2
    assert flags[0] in p.stderr and "nvidia-smi" in p.stderr
    assert not kit.runs()


@pytest.mark.parametrize("nvidia_smi", ["absent", "failing"])
@pytest.mark.parametrize("flags", [["--num-gpus", "99"], ["--gpus", "0,1"], []],
                         ids=["--num-gpus 99", "--gpus 0,1", "default"])
def test_docker_run_without_a_gpu_count_is_refused(kit, nvidia_smi, flags):
    # a Docker run is a GPU run; without nvidia-smi no request can be checked against the GPUs there are
    kit.hide_nvidia_smi() if nvidia_smi == "absent" else kit.break_nvidia_smi()
    p = kit.run(TRAIN_SH, "--preset", "tiny", *flags)
    line = one_error_line(p, "train.sh")
    assert ("nvidia-smi is not on PATH" if nvidia_smi == "absent" else "nvidia-smi -L failed") in line
    assert " ".join(flags) in line and "--local" in line and "--cpu" in line
    assert not kit.runs()


def test_docker_run_with_no_gpu_is_refused(kit):
    line = one_error_line(kit.run(TRAIN_SH, "--preset", "tiny", FAKE_GPUS="0"), "train.sh")
    assert "no GPU" in line and "--cpu" in line and "--local" in line
    assert not kit.runs()


@pytest.mark.parametrize("device", [["--", "--device", "cpu"], ["--", "--device=cpu"], ["--device", "cpu"]])
def test_docker_cpu_run_needs_no_gpu(kit, device):
    kit.hide_nvidia_smi()
    opts, inner, p = kit.train("--preset", "tiny", "--num-gpus", "2", *device)
    assert "--gpus" not in opts
    assert inner[:4] == ["python", "lib/torchrun.py", "--standalone", "--nproc_per_node=2"]
    assert "devices: none (CPU)" in p.stdout
    p = kit.run(TRAIN_SH, "--preset", "tiny", "--gpus", "0", *device, FAKE_GPUS="1")
    assert p.returncode == 2 and "--gpus 0" in p.stderr and "--device cpu" in p.stderr


def test_multi_node_needs_master_addr(kit):
    p = kit.run(TRAIN_SH, "--nnodes", "2")
    assert p.returncode == 2 and "--master-addr" in p.stderr


def test_missing_image(kit):
    for script, args in ((TRAIN_SH, ["--preset", "tiny"]), (GENERATE_SH, ["--dry-run"])):
        p = kit.run(script, *args, FAKE_DOCKER_IMAGES="")
        assert "./build.sh" in p.stderr
    p = kit.run(TRAIN_SH, "--preset", "tiny", FAKE_DOCKER_IMAGES="")
    assert p.returncode != 0 and not kit.runs()


def test_help(kit):
    for script in (TRAIN_SH, GENERATE_SH, BUILD_SH):
        p = kit.run(script, "--help")
        assert p.returncode == 0 and p.stdout.startswith("Usage:")


# --- CPU mode, GPU runtime, ulimits, signals -------------------------------------------------------------------------

def gpu_only(opts: list[str]) -> list[str]:
    """The options of a docker run that only a GPU run has."""
    return [f"{a} {b}" for a, b in pairs(opts) if a == "--gpus" or (a, b) == ("--ulimit", "memlock=-1")]


@pytest.mark.parametrize("num_gpus", [[], ["--num-gpus", "2"]], ids=["one process", "--num-gpus 2"])
def test_train_cpu_flag(kit, num_gpus):
    # no nvidia-smi and no NVIDIA runtime either: --cpu asks for neither
    kit.hide_nvidia_smi()
    opts, inner, p = kit.train("--cpu", "--preset", "tiny", *num_gpus, FAKE_DOCKER_RUNTIMES="runc",
                               FAKE_DOCKER_NO_GPU_DRIVER="1")
    assert gpu_only(opts) == []
    assert "--init" in opts and ("--ulimit", "stack=67108864") in pairs(opts)
    assert inner[:4] == ["python", "lib/torchrun.py", "--standalone", f"--nproc_per_node={2 if num_gpus else 1}"]
    ns = parse_forwarded(train_gpt.build_arg_parser(), inner[inner.index("train_gpt.py") + 1:])
    assert ns.device == "cpu"
    assert "devices: none (CPU)" in p.stdout
    assert [c[:1] for c in kit.calls()] == [["image"], ["run"], ["run"]]  # no `docker info`, no GPU probe
    assert is_config_run(kit.calls()[1])


@pytest.mark.slow  # runs the local trainer's --print-config (a torch import)
def test_train_cpu_flag_local(kit):
    p = kit.run(TRAIN_SH, "--local", "--dry-run", "--cpu", "--preset", "tiny")  # the fake lists 8 GPUs
    assert p.returncode == 0, p.stderr
    (cmd,) = dry_run_commands(p.stdout)
    assert cmd[cmd.index("train_gpt.py") - 1] == str(Path(sys.prefix) / "bin" / "python")
    assert "--device=cpu" in cmd and not any(w.startswith("CUDA_VISIBLE_DEVICES") for w in cmd)


@pytest.mark.parametrize("flags,named", [
    (["--gpus", "0"], "--gpus 0"),
    (["--nccl-p2p-disable"], "--nccl-p2p-disable"),
    (["--", "--device", "cuda"], "--device cuda"),
    (["--", "--device=cuda:1"], "--device cuda:1"),
])
def test_train_cpu_flag_conflicts(kit, flags, named):
    line = usage_error_line(kit.run(TRAIN_SH, "--cpu", "--preset", "tiny", *flags), "train.sh")
    assert "--cpu" in line and named in line
    assert not kit.runs()


@pytest.mark.parametrize("flags", [["--cpu"], ["--device", "cpu"], ["--", "--device", "cpu"]])
def test_generate_cpu(kit, flags):
    p = kit.run(GENERATE_SH, *flags, FAKE_DOCKER_RUNTIMES="runc", FAKE_DOCKER_NO_GPU_DRIVER="1")
    assert p.returncode == 0, p.stderr
    (run,) = kit.runs()
    opts, inner = split_run(run)
    assert gpu_only(opts) == [] and "--init" in opts
    generate = pytest.importorskip("generate")
    assert parse_forwarded(generate.build_arg_parser(), inner[inner.index("generate.py") + 1:]).device == "cpu"


def test_generate_prints_its_settings_on_stderr(kit, tmp_path):
    """Its stdout is the sampled text, so the wrapper's lines go to stderr: runtime, GPUs, and the checkpoint."""
    p = kit.run(GENERATE_SH, "--cpu", "--prompt", "Hi")
    assert p.returncode == 0 and "generate.sh" not in p.stdout, p.stdout
    assert f"generate.sh: runtime:    docker image {IMAGE}; GPUs: none (CPU)" in p.stderr
    assert "generate.sh: checkpoint: the default of generate.py (the newest of the --run, else of any run)" in p.stderr
    ckpt = tmp_path / "run" / "step_000001.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    p = kit.run(GENERATE_SH, "--checkpoint", str(ckpt), "--prompt", "Hi")
    assert p.returncode == 0 and f"generate.sh: checkpoint: {ckpt}" in p.stderr and "GPUs: all" in p.stderr


@pytest.mark.parametrize("machine,reason", [("none listed", "nvidia-smi lists none"),
                                            ("no nvidia-smi", "nvidia-smi is not on PATH")])
def test_generate_without_a_gpu_samples_on_the_cpu_and_says_so(kit, machine, reason):
    if machine == "no nvidia-smi":
        kit.hide_nvidia_smi()
    p = kit.run(GENERATE_SH, "--prompt", "Hi", FAKE_GPUS="0")
    assert p.returncode == 0, p.stderr
    assert f"GPUs: none found ({reason}): sampling on the CPU" in p.stderr and "GPUs: all" not in p.stderr
    (run,) = kit.runs()
    assert "--gpus" not in split_run(run)[0]  # Docker is asked for none


@pytest.mark.parametrize("flags", [["--device", "cuda"], ["--", "--device", "cuda:0"]])
def test_generate_cpu_conflicts(kit, flags):
    line = usage_error_line(kit.run(GENERATE_SH, "--cpu", *flags), "generate.sh")
    assert "--cpu" in line and "--device cuda" in line
    assert not kit.runs()


@pytest.mark.parametrize("script", [TRAIN_SH, GENERATE_SH])
def test_memlock_only_on_gpu_runs_and_can_be_turned_off(kit, script):
    args = ["--preset", "tiny"] if script == TRAIN_SH else []
    for flags, memlock in (([], True), (["--no-memlock"], False), (["--cpu"], False)):
        kit.log.unlink(missing_ok=True)
        p = kit.run(script, *args, *flags)
        assert p.returncode == 0, p.stderr
        opts, _ = split_run(kit.runs()[-1])
        assert (("--ulimit", "memlock=-1") in pairs(opts)) == memlock, flags
        assert ("--gpus" in opts) == (flags != ["--cpu"]), flags
        assert ("--ulimit", "stack=67108864") in pairs(opts)


@pytest.mark.parametrize("script", [TRAIN_SH, GENERATE_SH])
def test_gpu_run_without_nvidia_runtime_is_one_line(kit, script):
    # docker lists no nvidia runtime and the daemon cannot select a GPU driver: one line, nothing started
    args = ["--preset", "tiny", "--gpus", "0,2"] if script == TRAIN_SH else []
    p = kit.run(script, *args, FAKE_DOCKER_RUNTIMES="io.containerd.runc.v2 runc", FAKE_DOCKER_NO_GPU_DRIVER="1",
                FAKE_GPUS="8")
    line = one_error_line(p, script.name)
    assert "--cpu" in line and "NVIDIA Container Toolkit" in line and "could not select device driver" in line
    (probe,) = kit.runs()  # only the probe ran
    opts, inner = split_run(probe)
    assert opts[:1] == ["--rm"] and ("--entrypoint", "true") in pairs(opts) and inner == []
    assert ("--gpus", '"device=0,2"' if script == TRAIN_SH else "all") in pairs(opts)


def test_gpu_run_through_the_toolkit_hook_goes_ahead(kit):
    # no nvidia runtime listed, but --gpus works (the toolkit's hook): the probe passes and the run goes ahead
    opts, inner, _ = kit.train("--preset", "tiny", FAKE_DOCKER_RUNTIMES="runc")
    probe, train = kit.runs()
    assert ("--entrypoint", "true") in pairs(probe) and ("--gpus", "all") in pairs(opts) and "train_gpt.py" in inner
    kit.log.unlink()
    kit.train("--preset", "tiny")  # an nvidia runtime listed: no probe (the runs: the settings, the training)
    assert [c[:2] for c in kit.calls()] == [["image", "inspect"], ["info", "--format"], ["run", "--rm"],
                                            ["run", "--rm"]]


def test_dry_run_asks_docker_nothing_about_gpus(kit):
    p = kit.run(TRAIN_SH, "--dry-run", "--preset", "tiny", FAKE_DOCKER_RUNTIMES="runc", FAKE_DOCKER_NO_GPU_DRIVER="1")
    assert p.returncode == 0, p.stderr
    # only the image and the trainer's settings (a run that only reads, on no GPU)
    assert [c[:1] for c in kit.calls()] == [["image"], ["run"]] and kit.config_runs()
    assert "--gpus" not in kit.config_runs()[0]


@pytest.mark.parametrize("script", [TRAIN_SH, GENERATE_SH])
def test_docker_client_replaces_the_wrapper(kit, script):
    # exec: the process a signal reaches is the docker client itself (no shell left to die and orphan it)
    args = ["--preset", "tiny"] if script == TRAIN_SH else []
    p = subprocess.Popen([str(script), *args], cwd=kit.tmp, env=kit.env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    runs = [m for c, m in zip(kit.calls(), kit.metas()) if c[:1] == ["run"]]
    assert runs[-1]["pid"] == p.pid
    assert all(m["pid"] != p.pid for m in kit.metas()[:-1])  # the checks before it are children


FAKE_VENV_PYTHON = """#!/bin/sh
# a virtualenv that is ready (venv_ready reads a script from stdin) and logs the program's process id; it answers
# --print-config=shell with the tiny preset's settings
[ "$1" = - ] && exit 0
echo "$$ $*" >>"$FAKE_PYTHON_LOG"
case "$*" in *--print-config=shell) cat "$FAKE_CONFIG" ;; esac
"""


@pytest.mark.parametrize("script", [TRAIN_SH, GENERATE_SH])
def test_local_program_replaces_the_wrapper(kit, tmp_path, script):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_VENV_PYTHON, encoding="utf-8")
    (venv / "bin" / "python").chmod(0o755)
    log = tmp_path / "python.log"
    args = ["--local", "--cpu"] + (["--preset", "tiny"] if script == TRAIN_SH else [])
    config = tmp_path / "config.sh"
    config.write_text(shell_config("--preset", "tiny") + "\n", encoding="utf-8")
    p = subprocess.Popen([str(script), *args], cwd=kit.tmp, env={**kit.env, "KIT_VENV": str(venv),
                         "FAKE_PYTHON_LOG": str(log), "FAKE_CONFIG": str(config)}, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    pid, program = log.read_text(encoding="utf-8").splitlines()[-1].split()[:2]
    assert int(pid) == p.pid and program == ("train_gpt.py" if script == TRAIN_SH else "generate.py")


# --- generate.sh -----------------------------------------------------------------------------------------------------

GENERATE_CASES = [
    (["--prompt", "Once upon a time"], ["--prompt=Once upon a time"]),
    (["--max-tokens", "17"], ["--max-tokens=17"]),
    (["--temperature", "0.7"], ["--temperature=0.7"]),
    (["--top-k", "40"], ["--top-k=40"]),
    (["--top-p", "0.9"], ["--top-p=0.9"]),
    (["--num-samples", "3"], ["--num-samples=3"]),
    (["--seed", "11"], ["--seed=11"]),
    (["--device", "cpu"], ["--device=cpu"]),
    (["--", "--no-stop-at-eot", "--prompt-file", "p.txt"], ["--no-stop-at-eot", "--prompt-file", "p.txt"]),
    (["--run", "my-run"], ["--run=my-run"]),
]


@pytest.mark.parametrize("runtime", ["docker", "local"])
@pytest.mark.parametrize("flags,expected", GENERATE_CASES, ids=[" ".join(c[0]) for c in GENERATE_CASES])
def test_generate_flag_reaches_generate_py(kit, runtime, flags, expected):
    local = ["--local"] if runtime == "local" else []
    p = kit.run(GENERATE_SH, "--dry-run", *local, *flags)
    assert p.returncode == 0, p.stderr
    (cmd,) = dry_run_commands(p.stdout)
    script = cmd.index("generate.py")
    assert not any(w.startswith("--checkpoint") for w in cmd[script + 1:])  # generate.py's default: the newest
    assert contains(cmd[script + 1:], expected)
    if runtime == "docker":
        assert cmd[:3] == ["docker", "run", "--rm"] and "-t" not in cmd and "-i" not in cmd
        assert ("--gpus", "all") in pairs(cmd) or flags == ["--device", "cpu"]
    else:
        assert cmd[script - 1] == str(Path(sys.prefix) / "bin" / "python")


@pytest.mark.parametrize("runtime", ["docker", "local"])
def test_generate_values_that_look_like_flags_stay_values(kit, runtime):
    # `--prompt --x` reached generate.py as two flags; every value now goes as --flag=VALUE
    generate = pytest.importorskip("generate")
    local = ["--local"] if runtime == "local" else []
    p = kit.run(GENERATE_SH, "--dry-run", *local, "--prompt", "--x", "--device", "-d", "--temperature", "-1e-3",
                "--checkpoint", "-ckpt")
    assert p.returncode == 0, p.stderr
    (cmd,) = dry_run_commands(p.stdout)
    ns = parse_forwarded(generate.build_arg_parser(), cmd[cmd.index("generate.py") + 1:])
    assert (ns.prompt, ns.device, ns.temperature) == ("--x", "-d", -1e-3)
    assert Path(ns.checkpoint).name == "-ckpt"
    p = kit.run(GENERATE_SH, "--dry-run", *local, "--prompt", "")
    (cmd,) = dry_run_commands(p.stdout)
    assert parse_forwarded(generate.build_arg_parser(), cmd[cmd.index("generate.py") + 1:]).prompt == ""


def test_generate_checkpoint_path(kit, tmp_path):
    ckpt = tmp_path / "runs" / "r1"
    ckpt.mkdir(parents=True)
    p = kit.run(GENERATE_SH, "--dry-run", "--checkpoint", str(ckpt), WANDB_API_KEY=SECRET)
    (cmd,) = dry_run_commands(p.stdout)
    assert bind_mounts(cmd[2:cmd.index(IMAGE)])[str(ckpt)] == str(ckpt)
    assert contains(cmd, ["generate.py", f"--checkpoint={ckpt}"])
    assert ("--user", f"{os.getuid()}:{os.getgid()}") in pairs(cmd) and "--ipc=host" in cmd
    assert ("-e", "TORCHINDUCTOR_CACHE_DIR=/compile-cache/inductor") in pairs(cmd)  # --compile reuses it
    assert SECRET not in p.stdout + p.stderr


def test_generate_prompt_from_stdin_gets_i_only(kit):
    p = kit.run(GENERATE_SH, "--dry-run", "--prompt", "-")
    (cmd,) = dry_run_commands(p.stdout)
    opts = cmd[:cmd.index(IMAGE)]
    assert "-i" in opts and "-t" not in opts


# --- build.sh --------------------------------------------------------------------------------------------------------

def pinned_base() -> str:
    m = re.search(r"^PINNED_BASE=(\S+)$", BUILD_SH.read_text(encoding="utf-8"), re.M)
    assert m
    return m.group(1)


def build_call(kit) -> list[str]:
    (call,) = [c for c in kit.calls() if c[:1] == ["build"]]
    return call


def test_pinned_base_matches_dockerfile():
    assert f"ARG BASE_IMAGE={pinned_base()}\n" in (ROOT / "Dockerfile").read_text(encoding="utf-8")


@pytest.mark.parametrize("images,args,base", [
    ("cvlization-torch-gpu", [], "cvlization-torch-gpu"),
    ("", [], None),
    ("cvlization-torch-gpu", ["--base", "my/base:1"], "my/base:1"),
])
def test_build_base(kit, images, args, base):
    base = base or pinned_base()
    p = kit.run(BUILD_SH, *args, FAKE_DOCKER_IMAGES=images)
    assert p.returncode == 0, p.stderr
    call = build_call(kit)
    assert ("--build-arg", f"BASE_IMAGE={base}") in pairs(call)
    assert ("-t", IMAGE) in pairs(call) and "--no-cache" not in call
    assert call[-1] == str(ROOT)
    assert base in p.stdout


def test_build_tag_and_no_cache(kit):
    p = kit.run(BUILD_SH, "--tag", "mine:dev", "--no-cache")
    assert p.returncode == 0, p.stderr
    call = build_call(kit)
    assert ("-t", "mine:dev") in pairs(call) and "--no-cache" in call


def test_build_failure(kit):
    p = kit.run(BUILD_SH, FAKE_DOCKER_BUILD_RC="17")
    assert p.returncode == 17
    assert "fake build failure" in p.stderr and "docker build failed" in p.stderr


def test_pinned_base_is_torch_2_13_with_cuda_12_8():
    # the torch of the CPU test suite; CUDA 12.8 covers Hopper and Blackwell
    assert pinned_base() == "pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime"
    pins = [line for line in (ROOT / "requirements-torch.txt").read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert pins == ["torch==2.13.0"] and pinned_base().startswith(f"pytorch/pytorch:{pins[0][7:]}-")


def venv_commands(kit, tmp_path, **env) -> list[str]:
    """What ./train.sh --local --dry-run would run to create a missing virtualenv."""
    p = kit.run(TRAIN_SH, "--local", "--dry-run", "--preset", "tiny", KIT_VENV=str(tmp_path / "new-venv"), **env)
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()


def test_local_virtualenv_gets_the_pinned_cpu_torch_without_a_gpu(kit, tmp_path):
    kit.hide_nvidia_smi()
    out = venv_commands(kit, tmp_path)
    py = str(tmp_path / "new-venv" / "bin" / "python")
    assert f"{py} -m pip install --progress-bar on --retries 1 --timeout 30 --index-url " \
           "https://download.pytorch.org/whl/cpu torch==2.13.0" in out
    assert any("installing torch==2.13.0, the CPU build (no NVIDIA GPU here)" in line for line in out)
    assert not any(line.startswith(py) and "--quiet" in line for line in out)  # pip shows its progress


def test_local_virtualenv_gets_cuda_torch_with_a_gpu(kit, tmp_path):
    out = venv_commands(kit, tmp_path, FAKE_GPUS="2")
    py = str(tmp_path / "new-venv" / "bin" / "python")
    assert f"{py} -m pip install --progress-bar on torch==2.13.0" in out
    assert any("installing torch==2.13.0 with CUDA" in line for line in out)
    assert any("--index-url" in line for line in venv_commands(kit, tmp_path, FAKE_GPUS="2", KIT_TORCH_BUILD="cpu"))


def test_cpu_index_unreachable_falls_back_to_the_default_index_and_says_so(kit, tmp_path):
    """A fake python3 whose virtualenv's pip fails for the CPU index: the wrapper says what it does, then uses the
    default index (the fake's trainer answers nothing, so the run stops after the install: not checked here)."""
    log = tmp_path / "pip.log"
    fake = tmp_path / "fakepy"
    fake.mkdir()
    venv_python = (f"#!/bin/sh\n[ \"$1\" = - ] && exit 1\necho \"$*\" >>{log}\n"
                   "case \"$*\" in *--index-url*) exit 1 ;; esac\nexit 0\n")
    (fake / "python3").write_text(f"#!/bin/sh\n# python3 -m venv DIR\nmkdir -p \"$3/bin\"\n"
                                  f"cat >\"$3/bin/python\" <<'X'\n{venv_python}X\nchmod +x \"$3/bin/python\"\n",
                                  encoding="utf-8")
    (fake / "python3").chmod(0o755)
    kit.hide_nvidia_smi()
    p = subprocess.run([str(TRAIN_SH), "--local", "--preset", "tiny"], cwd=kit.tmp, capture_output=True, text=True,
                       timeout=60, env={**kit.env, "PATH": f"{fake}{os.pathsep}{kit.env['PATH']}",
                                        "KIT_VENV": str(tmp_path / "v")})
    calls = log.read_text(encoding="utf-8").splitlines()
    torch_calls = [c for c in calls if c.endswith("torch==2.13.0")]
    assert len(torch_calls) == 2 and "--index-url" in torch_calls[0] and "--index-url" not in torch_calls[1]
    assert "could not install torch==2.13.0 from https://download.pytorch.org/whl/cpu" in p.stdout + p.stderr


def secrets_of(call: list[str]) -> dict[str, str]:
    """A docker build's --secret options: {id: the rest of the spec}."""
    found = {}
    for flag, spec in pairs(call):
        if flag == "--secret":
            first, rest = spec.split(",", 1)
            assert first.startswith("id="), spec
            found[first.removeprefix("id=")] = rest
    return found


def test_build_secrets(kit, tmp_path):
    ca = tmp_path / "proxy-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n", encoding="utf-8")
    url = "https://user:token-7f1e@mirror.example/simple"
    p = kit.run(BUILD_SH, "--ca-bundle", str(ca), PIP_INDEX_URL=url, PIP_EXTRA_INDEX_URL=url + "2")
    assert p.returncode == 0, p.stderr
    call = build_call(kit)
    assert secrets_of(call) == {"ca_bundle": f"src={ca}", "pip_index_url": "env=PIP_INDEX_URL",
                                "pip_extra_index_url": "env=PIP_EXTRA_INDEX_URL"}
    assert "token-7f1e" not in json.dumps(kit.calls()) + p.stdout + p.stderr  # passed by name only
    assert kit.metas()[kit.calls().index(call)]["DOCKER_BUILDKIT"] == "1"
    # the ids are the ones the Dockerfile mounts
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert set(re.findall(r"--mount=type=secret,id=(\w+)", dockerfile)) == set(secrets_of(call))


def test_build_without_secrets_passes_none(kit):
    p = kit.run(BUILD_SH, PIP_INDEX_URL="")
    assert p.returncode == 0, p.stderr
    assert "--secret" not in build_call(kit)


def test_build_ca_bundle_relative_and_missing(kit, tmp_path):
    (kit.tmp / "ca.pem").write_text("x", encoding="utf-8")
    p = kit.run(BUILD_SH, "--ca-bundle", "ca.pem")
    assert p.returncode == 0, p.stderr
    assert secrets_of(build_call(kit))["ca_bundle"] == f"src={kit.tmp / 'ca.pem'}"
    kit.log.unlink()
    line = usage_error_line(kit.run(BUILD_SH, "--ca-bundle", "nope.pem"), "build.sh")
    assert "--ca-bundle nope.pem is not a readable file" in line
    assert not kit.calls()


@pytest.mark.parametrize("env,builder", [
    ({}, "buildkit"),                                                  # buildx plugin
    ({"FAKE_DOCKER_BUILDX": "0", "FAKE_DOCKER_CLIENT": "20.10.24+dfsg1"}, "buildkit"),  # Debian's docker.io
    ({"FAKE_DOCKER_BUILDX": "0"}, "legacy"),                           # a client of 23+ without buildx
    ({"DOCKER_BUILDKIT": "0"}, "legacy"),
    ({"FAKE_DOCKER_BUILDX": "0", "DOCKER_BUILDKIT": "1"}, "buildkit"),
])
def test_build_builder_choice(kit, env, builder):
    p = kit.run(BUILD_SH, **env)
    assert p.returncode == 0, p.stderr
    call = build_call(kit)
    meta = kit.metas()[kit.calls().index(call)]
    assert f"builder: {builder}" in p.stdout
    if builder == "buildkit":
        assert meta["DOCKER_BUILDKIT"] == "1" and ("-f", str(ROOT / "Dockerfile")) in pairs(call)
    else:
        # the legacy builder knows no RUN --mount: the Dockerfile comes on stdin without the secret mounts
        assert meta["DOCKER_BUILDKIT"] == "0" and ("-f", "-") in pairs(call)
        dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
        assert "--mount=type=secret" in dockerfile and "--mount" not in meta["stdin"]
        assert meta["stdin"] == re.sub(r"--mount=type=secret\S*\s+", "", dockerfile)


def test_build_secrets_need_buildkit(kit, tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x", encoding="utf-8")
    for args, env in ((["--ca-bundle", str(ca)], {}), ([], {"PIP_EXTRA_INDEX_URL": "https://x.example/simple"})):
        line = one_error_line(kit.run(BUILD_SH, *args, FAKE_DOCKER_BUILDX="0", **env), "build.sh")
        assert "BuildKit" in line and "buildx" in line
    assert not [c for c in kit.calls() if c[:1] == ["build"]]


# --- the image's build steps (lib/image_setup.sh, as the Dockerfile runs them) ---------------------------------------

IMAGE_SETUP = ROOT / "lib" / "image_setup.sh"

FAKE_SETUP_PYTHON = """#!/bin/sh
# python as the build steps call it: torch imports, the headers are in $FAKE_INCLUDE, every call is logged with the
# variables the build's secrets set
echo "$*|${PIP_CERT-}|${REQUESTS_CA_BUNDLE-}|${PIP_INDEX_URL-}|${PIP_EXTRA_INDEX_URL-}" >>"$FAKE_LOG"
case "$*" in
  *sysconfig*) echo "$FAKE_INCLUDE" ;;
  -) cat >/dev/null; echo "kit-image-setup: checked" ;;
esac
"""


class Setup:
    """lib/image_setup.sh with a fake python (and apt-get, compilers) on a PATH that has nothing else."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.bin = tmp / "setup-bin"
        self.bin.mkdir()
        self.log = tmp / "setup.log"
        self.secrets = tmp / "secrets"
        self.include = tmp / "include"
        self.include.mkdir()
        (self.include / "Python.h").write_text("", encoding="utf-8")
        self.fake("python", FAKE_SETUP_PYTHON)
        for tool_name in ("basename", "cat", "mktemp", "rm", "mkdir", "chmod"):
            (self.bin / tool_name).symlink_to(shutil.which(tool_name))

    def fake(self, name: str, text: str = "#!/bin/sh\necho \"$(basename \"$0\") $*\" >>\"$FAKE_LOG\"\n") -> None:
        (self.bin / name).write_text(text, encoding="utf-8")
        (self.bin / name).chmod(0o755)

    def secret(self, name: str, value: str) -> None:
        self.secrets.mkdir(exist_ok=True)
        (self.secrets / name).write_text(value, encoding="utf-8")

    def run(self, *args: str, **env) -> subprocess.CompletedProcess:
        lists = self.tmp / "apt-lists"
        lists.mkdir(exist_ok=True)
        return subprocess.run(["/bin/sh", str(IMAGE_SETUP), *args], capture_output=True, text=True, timeout=60,
                              env={"PATH": str(self.bin), "FAKE_LOG": str(self.log), "FAKE_INCLUDE": str(self.include),
                                   "KIT_SECRETS_DIR": str(self.secrets), "KIT_APT_LISTS_DIR": str(lists),
                                   "TIKTOKEN_CACHE_DIR": str(self.tmp / "tiktoken"), **env})

    def lines(self) -> list[str]:
        return self.log.read_text(encoding="utf-8").splitlines() if self.log.exists() else []


@pytest.fixture
def setup(tmp_path) -> Setup:
    return Setup(tmp_path)


def test_image_pip_step_reads_the_build_secrets(setup):
    p = setup.run("pip", "/tmp/requirements.txt")
    assert p.returncode == 0, p.stderr
    assert setup.lines() == ["-m pip install --no-cache-dir --quiet -r /tmp/requirements.txt||||",
                             "-m pip install --no-cache-dir --quiet --no-deps -r /tmp/requirements-vocab.txt||||"]
    setup.log.unlink()
    setup.secret("ca_bundle", "PEM")
    setup.secret("pip_index_url", "https://u:t@mirror.example/simple")
    setup.secret("pip_extra_index_url", "https://extra.example/simple")
    p = setup.run("pip", "/tmp/requirements.txt")
    assert p.returncode == 0, p.stderr
    ca = setup.secrets / "ca_bundle"
    for line in setup.lines():
        assert line.endswith(f"|{ca}|{ca}|https://u:t@mirror.example/simple|https://extra.example/simple"), line
    assert "u:t@" not in p.stdout + p.stderr


def test_image_compilers_installed_when_missing(setup):
    # no cc, no g++ and the headers of a Debian python missing: apt-get installs them (with the CA when there is one)
    setup.fake("apt-get")
    include = "/usr/include/python9.99-kit-test"
    setup.secret("ca_bundle", "PEM")
    p = setup.run("compilers", FAKE_INCLUDE=include)
    assert p.returncode == 0, p.stderr
    ca = f"-o Acquire::https::CAInfo={setup.secrets / 'ca_bundle'}"
    apt = [line for line in setup.lines() if line.startswith("apt-get")]
    assert apt == [f"apt-get {ca} update",
                   f"apt-get {ca} install -y --no-install-recommends gcc g++ python9.99-kit-test-dev libc6-dev"]
    assert "installing gcc g++ python9.99-kit-test-dev" in p.stdout and "checked" in p.stdout
    assert setup.lines()[-1].startswith("-|")  # then the compile check


def test_image_compilers_present_installs_nothing(setup):
    setup.fake("apt-get")
    setup.fake("cc")
    setup.fake("g++")
    p = setup.run("compilers")
    assert p.returncode == 0, p.stderr
    assert not [line for line in setup.lines() if line.startswith("apt-get")]
    assert "installing" not in p.stdout and "checked" in p.stdout


@pytest.mark.parametrize("fakes,include,says", [
    ([], "/usr/include/python3.11-none", ["lacks gcc g++ python3.11-none-dev", "no apt-get"]),
    (["apt-get", "cc", "g++"], "/opt/py/include/python3.12", ["no Python.h in /opt/py/include/python3.12"]),
], ids=["no apt-get", "headers outside /usr"])
def test_image_compilers_that_cannot_be_installed_fail_in_one_line(setup, fakes, include, says):
    for name in fakes:
        setup.fake(name)
    p = setup.run("compilers", FAKE_INCLUDE=include)
    assert p.returncode == 1
    (line,) = p.stderr.splitlines()
    assert line.startswith("kit-image-setup: error: ") and all(part in line for part in says), line
    assert not [call for call in setup.lines() if call.startswith("apt-get")]


def test_image_tiktoken_step_is_one_line_offline(tmp_path):
    # no network (a proxy that refuses): one line, no traceback, and the cache directory is there for every user
    pytest.importorskip("tiktoken")
    cache = tmp_path / "tiktoken"
    env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "TIKTOKEN_CACHE_DIR": str(cache),
           "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "KIT_SECRETS_DIR": str(tmp_path)}
    p = subprocess.run(["/bin/sh", str(IMAGE_SETUP), "tiktoken"], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stderr == "" and len(p.stdout.splitlines()) == 1, p.stdout + p.stderr
    assert "offline vocabulary from openai-whisper" in p.stdout
    assert cache.is_dir() and cache.stat().st_mode & 0o777 == 0o777


# --- test.sh --docker, .ci/run and the real-engine test's own skip ---------------------------------------------------

def test_test_sh_docker_runs_the_engine_test(tmp_path):
    shutil.copy2(ROOT / "test.sh", tmp_path / "test.sh")
    (tmp_path / "tests" / "docker").mkdir(parents=True)
    (tmp_path / "tests" / "docker" / "e2e.sh").write_text("#!/bin/sh\necho \"fake e2e $*\"\nexit 7\n",
                                                          encoding="utf-8")
    (tmp_path / "tests" / "docker" / "e2e.sh").chmod(0o755)
    p = subprocess.run([str(tmp_path / "test.sh"), "--docker"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "TEST_VENV": str(tmp_path / "venv")})
    assert p.returncode == 7 and p.stdout.splitlines()[-1] == "fake e2e "
    assert not (tmp_path / "venv").exists()  # no virtualenv, no pytest


@pytest.mark.parametrize("unit_rc", [0, 1])
def test_ci_runs_the_engine_test_after_the_unit_tests(tmp_path, unit_rc):
    (tmp_path / ".ci").mkdir()
    shutil.copy2(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "test.sh").write_text(f"#!/bin/sh\necho \"$*\" >>calls\n[ \"$1\" = --docker ] || exit {unit_rc}\n",
                                      encoding="utf-8")
    (tmp_path / "test.sh").chmod(0o755)
    p = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    calls = (tmp_path / "calls").read_text(encoding="utf-8").splitlines()
    assert (p.returncode, calls) == ((0, ["-q", "--docker"]) if unit_rc == 0 else (1, ["-q"]))


def as_other_user() -> list[str]:
    """The prefix that runs a command as a user who is not root (nothing when this one is not)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("runuser"):
        pytest.skip("root without runuser: no way to run the e2e script as another user")
    return ["runuser", "-u", "nobody", "--"]


@pytest.mark.parametrize("ci", [None, "true"])
def test_engine_test_without_root_says_so_in_one_line(ci):
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    p = subprocess.run([*as_other_user(), "bash", str(ROOT / "tests" / "docker" / "e2e.sh")], capture_output=True,
                       text=True, timeout=60, env=env, cwd="/")
    (line,) = (p.stdout + p.stderr).splitlines()
    assert "not root" in line
    if ci:
        assert p.returncode == 1 and line.startswith("FAIL: ")
    else:
        assert p.returncode == 0 and "skipped" in line


# --- lint ------------------------------------------------------------------------------------------------------------

def tool(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        pytest.fail(f"{name} is missing: pip install -r requirements-dev.txt (it pins {name}-py)")
    return found


def test_shellcheck():
    scripts = ["build.sh", "train.sh", "generate.sh", "lib/common.sh", "lib/image_setup.sh", "test.sh", ".ci/run",
               "tests/docker/e2e.sh", "bench/gpu_suite.sh", "bench/gpu_check.sh"]
    p = subprocess.run([tool("shellcheck"), "-x", "-S", "warning", *scripts], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_hadolint():
    p = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


# --- train.sh --eval-hellaswag ---------------------------------------------------------------------------------------

RUN_ID = re.compile(r"^\d{8}-\d{6}-tiny-[0-9a-f]{6}$")  # the trainer's form of a generated run name


def test_eval_hellaswag_runs_after_training_on_the_run_s_checkpoint(kit):
    opts, inner, p = kit.train("--preset", "tiny", "--eval-hellaswag", HELLASWAG_URL="http://mirror/hs.jsonl")
    train, evaluation = kit.runs()
    train_opts, train_inner = split_run(train)
    name = train_inner[-1].removeprefix("--run-name=")
    assert "train_gpt.py" in train_inner and RUN_ID.match(name), train_inner
    assert inner == ["python", "eval_hellaswag.py", f"--checkpoint=checkpoints/{name}"]
    assert dict(pairs(train_opts))["--gpus"] == "all" and dict(pairs(opts))["--gpus"] != "all"  # one GPU
    assert ("-e", "HELLASWAG_URL") in pairs(opts)
    assert f"run name:  {name}" in p.stdout and "then:      HellaSwag on the final checkpoint" in p.stdout
    assert f"HellaSwag: evaluating checkpoints/{name}" in p.stdout


def test_eval_hellaswag_keeps_a_given_run_name_and_the_cpu(kit):
    _, inner, _ = kit.train("--cpu", "--preset", "tiny", "--run-name", "mine", "--eval-hellaswag")
    train, _ = kit.runs()
    assert "--run-name=mine" not in train and split_run(train)[1][-2:] == ["--run-name", "mine"]
    assert inner == ["python", "eval_hellaswag.py", "--checkpoint=checkpoints/mine", "--device=cpu"]


@pytest.mark.parametrize("flags, words", [(["--no-save-final"], "drop it or --no-save-final"),
                                          (["--medium", "--preset", "medium"], "drop it or --medium")])
def test_eval_hellaswag_refuses_what_leaves_nothing_to_evaluate(kit, flags, words):
    p = kit.run(TRAIN_SH, "--preset", "tiny", "--eval-hellaswag", *flags) if "--medium" not in flags else \
        kit.run(TRAIN_SH, "--eval-hellaswag", *flags)
    assert p.returncode == 2 and words in p.stderr and not kit.runs(), p.stderr


def test_eval_hellaswag_in_a_dry_run_before_the_image_exists(kit):
    """No image yet: the settings cannot be read, so the run name comes from the words (or is made here)."""
    for flags, name in ((["--run-name", "foo"], "foo"), ([], None)):
        p = kit.run(TRAIN_SH, "--dry-run", "--preset", "tiny", "--eval-hellaswag", *flags, FAKE_DOCKER_IMAGES="")
        assert p.returncode == 0, p.stderr
        evaluation = dry_run_commands(p.stdout)[-1]
        checkpoint = evaluation[evaluation.index("eval_hellaswag.py") + 1].removeprefix("--checkpoint=checkpoints/")
        assert checkpoint == name if name else re.match(r"^\d{8}-\d{6}-[0-9a-f]{6}$", checkpoint), evaluation
        assert f"run name:  {checkpoint}" in p.stdout


def test_a_failed_run_is_not_evaluated(kit):
    p = kit.run(TRAIN_SH, "--preset", "tiny", "--eval-hellaswag", FAKE_DOCKER_TRAIN_RC="3")
    assert p.returncode == 3 and len(kit.runs()) == 1 and "evaluating" not in p.stdout


def test_a_signal_to_train_sh_stops_the_run_and_skips_the_evaluation(kit):
    """train.sh stays to evaluate, so it is not the run itself: a SIGTERM sent to it reaches the run (which saves
    and stops), and train.sh ends with the run's status."""
    env = {**kit.env, "FAKE_DOCKER_TRAIN_SLEEP": "60"}
    proc = subprocess.Popen([str(TRAIN_SH), "--preset", "tiny", "--eval-hellaswag"], cwd=kit.tmp, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    training = Path(f"{kit.log}.training")
    for _ in range(600):
        if training.exists():
            break
        threading.Event().wait(0.05)
    assert training.exists(), proc.communicate(timeout=30)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert Path(f"{kit.log}.signals").read_text(encoding="utf-8").split() == ["SIGTERM"]
    assert len(kit.runs()) == 1 and "evaluating" not in out


# --- end to end on CPU -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_local_end_to_end(kit, synthetic_data, tmp_path):
    kit.hide_nvidia_smi()  # a CPU machine
    work = tmp_path / "work"
    p = kit.run(TRAIN_SH, "--local", "--preset", "tiny", "--num-iterations", "3", "--data-dir", str(synthetic_data),
                "--train-seq-len", "256", "--val-seq-len", "512", "--val-loss-every", "0", "--run-name", "e2e",
                "--no-compile", "--val-tokens", "4096", "--device", "cpu", "--train-files", "syn_train_*.bin",
                "--val-files", "syn_val_*.bin", "--set", "model_dim=64", "--set", "num_layers=4", "--set",
                "num_heads=2", "--set", "head_dim=32", "--set", "attention=dense", "--",
                "--log-dir", str(work / "logs"), "--checkpoint-dir", str(work / "checkpoints"), OMP_NUM_THREADS="2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert not kit.calls()
    assert "step:3/3 val_loss:" in (work / "logs" / "e2e.txt").read_text(encoding="utf-8")
    run_dir = work / "checkpoints" / "e2e"
    assert list(run_dir.glob("step_*.pt"))
    # resumed through the wrapper with no preset: the checkpoint's data, lengths and model, nothing downloaded; then
    # HellaSwag on its final checkpoint, from a file already in place
    hellaswag = tmp_path / "hellaswag"
    hellaswag.mkdir()
    example = {"ctx": "The cat sat on the", "endings": ["mat.", "moon.", "idea.", "sofa."], "label": 0}
    (hellaswag / "hellaswag_val.jsonl").write_text((json.dumps(example) + "\n") * 3, encoding="utf-8")
    r = kit.run(TRAIN_SH, "--local", "--resume", str(run_dir), "--num-iterations", "4", "--eval-hellaswag",
                OMP_NUM_THREADS="2", HELLASWAG_DIR=str(hellaswag), HELLASWAG_URL="http://127.0.0.1:9/unused")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "preset:    tiny (the checkpoint's settings; flags given override them)" in r.stdout
    assert "nothing to download" in r.stdout or "present" in r.stdout
    assert "step:4/4 val_loss:" in (work / "logs" / "e2e.txt").read_text(encoding="utf-8")
    assert "run name:  e2e" in r.stdout and f"HellaSwag: evaluating {run_dir}" in r.stdout
    assert re.search(r"^hellaswag acc_norm [01]\.\d{4} ± 0\.\d{4} \(\d/3\), acc .*step_000004\.pt step 4", r.stdout,
                     re.M), r.stdout[-2000:]
    g = kit.run(GENERATE_SH, "--local", "--checkpoint", str(run_dir), "--max-tokens", "5", "--device", "cpu",
                "--prompt", "Hello")
    assert g.returncode == 0, g.stdout[-3000:] + g.stderr[-3000:]
    assert g.stdout.strip()


@pytest.mark.slow
def test_a_stopped_local_run_prints_the_wrapper_command_that_resumes_it(kit, synthetic_data, tmp_path):
    """Ctrl-C of ./train.sh --local: the printed resume command is the wrapper with its runtime and path flags (not
    python, which has no torch outside the virtualenv, nor train.sh without --local), and it runs as printed."""
    from tests.conftest import default_sigint, wait_for_text

    kit.hide_nvidia_smi()
    flags = ["--local", "--preset", "tiny", "--data-dir", str(synthetic_data), "--checkpoint-dir", "ck",
             "--log-dir", "lg", "--run-name", "notes", "--train-files", "syn_train_*.bin", "--val-files",
             "syn_val_*.bin", "--train-seq-len", "256", "--val-seq-len", "512", "--val-tokens", "1024",
             "--val-loss-every", "0", "--set", "model_dim=64", "--set", "num_layers=2"]
    env = {**kit.env, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "out", "wb") as out:
        proc = subprocess.Popen([str(TRAIN_SH), *flags], cwd=kit.tmp, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=default_sigint)
        try:
            wait_for_text(kit.tmp / "lg" / "notes.txt", "step:3/200", proc)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 130
        finally:
            proc.kill()
    text = (tmp_path / "out").read_text()
    (line,) = [x for x in text.splitlines() if x.startswith("train_gpt.py: stopped by SIGINT at step ")]
    step = int(line.split(" at step ")[1].split()[0])
    command = shlex.split(line.split("Resume with: ")[1])
    assert command == [str(TRAIN_SH), "--local", "--data-dir", str(synthetic_data), "--checkpoint-dir", "ck",
                       "--log-dir", "lg", "--resume", str(kit.tmp / "ck" / "notes")]
    r = subprocess.run([*command, "--num-iterations", str(step + 1)], cwd=kit.tmp, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resumed from {kit.tmp / 'ck' / 'notes' / f'step_{step:06d}.pt'} at step {step}" in r.stdout
    assert f"step:{step + 1}/{step + 1} val_loss:" in r.stdout


def test_a_gpu_sized_run_on_a_machine_without_gpus_is_refused_before_any_download(kit, tmp_path):
    kit.hide_nvidia_smi()
    p = kit.run(TRAIN_SH, "--local", "--preset", "speedrun", "--data-dir", str(tmp_path / "fw"))
    assert p.returncode == 2, p.stdout + p.stderr
    (line,) = p.stderr.splitlines()
    assert line.startswith("train_gpt.py: error: --preset speedrun on the CPU: 1,695 steps of 393,216 tokens would "
                           "take about ") and line.endswith("; --preset tiny trains in minutes, a GPU runs it, and "
                                                            "--yes starts it on the CPU anyway")
    assert "download" not in p.stdout and not (tmp_path / "fw").exists()
    p = kit.run(TRAIN_SH, "--local", "--preset", "speedrun", "--data-dir", str(tmp_path / "fw"), "--yes",
                "--dry-run")  # insisting: it goes on to the download and the run
    assert p.returncode == 0, p.stderr
    assert "data/cached_fineweb10B.py 8" in p.stdout and p.stdout.splitlines()[-1].endswith(" --yes")


def test_a_dry_run_without_nvidia_smi_prints_its_commands(kit):
    kit.hide_nvidia_smi()
    p = kit.run(TRAIN_SH, "--dry-run", "--preset", "tiny")
    assert p.returncode == 0, p.stderr
    assert "GPUs cannot be counted here (nvidia-smi is not on PATH): the commands below are for 1 GPU(s)" in p.stderr
    train = dry_run_commands(p.stdout)[-1]
    assert train[:2] == ["docker", "run"] and train[train.index(IMAGE) + 1:][:4] == [
        "python", "lib/torchrun.py", "--standalone", "--nproc_per_node=1"]
    p = kit.run(TRAIN_SH, "--dry-run", "--preset", "tiny", "--num-gpus", "4", *ANY_COUNT)
    assert "--nproc_per_node=4" in dry_run_commands(p.stdout)[-1]


def test_a_dry_runs_docker_command_runs_pasted_in_a_fresh_clone(kit, tmp_path):
    """The mount sources a docker run needs and a fresh clone lacks (checkpoints/, caches): a dry run creates
    nothing, so it prints the mkdir -p that makes them before the command."""
    home = tmp_path / "fresh-home"
    p = kit.run(TRAIN_SH, "--dry-run", "--preset", "tiny", HOME=str(home))
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if not line.startswith("train.sh: ")]
    mkdir = [shlex.split(line) for line in lines if line.startswith("mkdir -p ")]
    train = dry_run_commands(p.stdout)[-1]
    sources = [spec.split(",")[1].removeprefix("source=") for flag, spec in pairs(train) if flag == "--mount"]
    missing = [s for s in sources if not os.path.exists(s)]
    assert missing and not home.exists()  # nothing made
    assert mkdir and mkdir[-1] == ["mkdir", "-p", *missing]
    parsed = [shlex.split(line) for line in lines]
    assert parsed.index(mkdir[-1]) < parsed.index(train)  # first


def test_a_docker_socket_that_refuses_access_is_said_so(kit):
    p = kit.run(TRAIN_SH, "--preset", "tiny", FAKE_DOCKER_SOCKET_DENIED="1")
    assert p.returncode != 0
    assert "docker refused access to its socket (permission denied): add your user to the docker group" in p.stderr
    assert "not found" not in p.stderr
    p = kit.run(TRAIN_SH, "--preset", "tiny", FAKE_DOCKER_IMAGES="")
    assert "image nanogpt-speedrun:latest not found; run ./build.sh first" in p.stderr


def test_the_docker_context_ignores_its_own_ignore_file():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert ".dockerignore" in lines


def test_git_ignores_what_data_tools_write_under_data():
    """data/notes (the README's own-text example), FineWeb and HellaSwag downloads: never files to commit; the kit's
    Python files there are."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail("needs git and this repository's .git")
    for path in ("data/notes/notes_train_000001.bin", "data/fineweb10B/fineweb_val_000000.bin",
                 "data/hellaswag/hellaswag_val.jsonl"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
    assert subprocess.run(["git", "check-ignore", "-q", "data/prepare.py"], cwd=ROOT).returncode == 1


def test_a_setting_wrong_for_the_runs_processes_is_refused_before_any_starts(kit):
    """seqs_per_step=3 on 2 GPUs: the trainer's own line, from the settings check train.sh asks for with the run's
    WORLD_SIZE, and no torchrun (whose report would follow each worker's line)."""
    p = kit.run(TRAIN_SH, "--preset", "tiny", "--num-gpus", "2", "--set", "seqs_per_step=3")
    assert p.returncode == 2
    assert p.stderr == ("train_gpt.py: error: --set seqs_per_step 3 must be a multiple of the number of processes (2) "
                        "so every process accumulates the same number of sequences\n")
    assert not kit.runs() and len(kit.config_runs()) == 1
