# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source this file
# Shared by build.sh, train.sh and generate.sh: argument checks, error helpers, the choice between Docker and a
# local virtualenv, the `docker run` argument list, and --dry-run. Source it after setting KIT_PROG (the script's
# name for messages); it sets KIT_ROOT (the repository root) itself.

KIT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KIT_PROG=${KIT_PROG:-$(basename "$0")}
KIT_IMAGE_DEFAULT=nanogpt-speedrun:latest
KIT_WORKDIR=/workspace          # where the repository is mounted inside the container
KIT_HF_CACHE_IN=/hf-cache        # where the Hugging Face cache is mounted inside the container
KIT_COMPILE_CACHE_IN=/compile-cache  # where the torch.compile cache is mounted inside the container

KIT_RUNTIME=docker               # docker | local
KIT_DRY_RUN=0
KIT_IMAGE=${KIT_IMAGE:-$KIT_IMAGE_DEFAULT}
KIT_GPU_SPEC=all                 # all | none | a comma-separated device list
KIT_MEMLOCK=1                    # 0: no --ulimit memlock=-1 on GPU runs (--no-memlock)
KIT_HOST_NETWORK=0
KIT_ENV=()                       # NAME=VALUE pairs for the training process
KIT_MOUNTS=()                    # host paths outside the repository to bind-mount at the same path
KIT_MAPPED=""                    # kit_map_path's result
KIT_STDIN=0                      # 1: the command reads piped stdin, so docker gets -i even without a terminal
KIT_CAPTURE=0                    # 1: capture_in_runtime is running the command: no terminal, only existing mounts
KIT_CAPTURED=""                  # capture_in_runtime's result
KIT_RUNTIME_READY=0              # 1: check_image found the image, or ensure_venv found the virtualenv complete

# --- messages and exits ----------------------------------------------------------------------------------------------

die() {  # die MESSAGE [CODE]: a one-line error, exit CODE (default 1)
  printf '%s: error: %s\n' "$KIT_PROG" "$1" >&2
  exit "${2:-1}"
}

die_usage() {  # a user error: the message, a hint, exit 2
  printf '%s: error: %s\n' "$KIT_PROG" "$1" >&2
  printf "Run '%s --help' for the list of flags.\n" "$KIT_PROG" >&2
  exit 2
}

unknown_flag() {  # unknown_flag FLAG: one line, with the flag of usage() it is closest to, exit 2
  local word=${1%%=*} flag best="" best_d=999 d
  for flag in $(usage | grep -oE -- '--[a-z0-9][a-z0-9-]*' | sort -u); do
    d=$(edit_distance "$word" "$flag")
    if ((d < best_d)); then best=$flag best_d=$d; fi
  done
  if ((best_d <= 2 && best_d < ${#word} / 2)); then
    die_usage "unknown flag $1 (did you mean $best?)"
  fi
  die_usage "unknown flag $1"
}

edit_distance() {  # edit_distance A B: Levenshtein distance between two words (short ones: flags)
  local a=$1 b=$2 i j cost
  local -a prev cur
  for ((j = 0; j <= ${#b}; j++)); do prev[j]=$j; done
  for ((i = 1; i <= ${#a}; i++)); do
    cur=("$i")
    for ((j = 1; j <= ${#b}; j++)); do
      if [[ "${a:i-1:1}" == "${b:j-1:1}" ]]; then cost=0; else cost=1; fi
      cur[j]=$((prev[j] + 1 < cur[j - 1] + 1 ? prev[j] + 1 : cur[j - 1] + 1))
      ((prev[j - 1] + cost >= cur[j])) || cur[j]=$((prev[j - 1] + cost))
    done
    prev=("${cur[@]}")
  done
  printf '%s\n' "${prev[${#b}]}"
}

say() {  # say MESSAGE: a line on stdout, prefixed with the script's name
  printf '%s: %s\n' "$KIT_PROG" "$1"
}

warn() {
  printf '%s: warning: %s\n' "$KIT_PROG" "$1" >&2
}

# --- argument helpers ------------------------------------------------------------------------------------------------

need_value() {  # need_value FLAG REMAINING_ARGC [NEXT]: the flag must be followed by a value
  local flag=$1 argc=$2
  if ((argc < 2)); then
    die_usage "$flag needs a value"
  fi
  if [[ "${3-}" == --* ]]; then
    die_usage "$flag needs a value, got the flag $3"
  fi
}

check_int() {  # check_int FLAG VALUE [MIN]: a whole number (>= MIN, default 0)
  local flag=$1 value=$2 min=${3:-0}
  if [[ ! "$value" =~ ^[0-9]+$ ]]; then
    die_usage "$flag expects a whole number, got '$value'"
  fi
  if ((10#$value < min)); then
    die_usage "$flag must be at least $min, got $value"
  fi
}

check_float() {  # check_float FLAG VALUE: a decimal number (1, 0.5, .5, 1e-3)
  local flag=$1 value=$2
  if [[ ! "$value" =~ ^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$ ]]; then
    die_usage "$flag expects a number, got '$value'"
  fi
}

check_gpu_list() {  # check_gpu_list FLAG VALUE: comma-separated device indices, no repeats
  local flag=$1 value=$2 seen=, id
  if [[ ! "$value" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    die_usage "$flag expects comma-separated GPU indices like 0,1,3, got '$value'"
  fi
  local -a ids
  IFS=, read -r -a ids <<<"$value"
  for id in "${ids[@]}"; do
    if [[ "$seen" == *",$id,"* ]]; then
      die_usage "$flag lists GPU $id twice"
    fi
    seen+="$id,"
  done
}

# quote_words WORDS...: the words as one line that a POSIX shell (and Python's shlex.split) reads back as them: a
# word of safe characters as it is, any other in single quotes
quote_words() {
  local out="" word q="'"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//$q/$q\\$q$q}' "
    fi
  done
  printf '%s\n' "${out% }"
}

# passthrough_value FLAG: the last value given to FLAG in PASSTHROUGH (the words the wrapper passes on to its
# program), as `FLAG V` or `FLAG=V` (empty when absent)
passthrough_value() {
  local flag=$1 value="" i
  for ((i = 0; i < ${#PASSTHROUGH[@]}; i++)); do
    case "${PASSTHROUGH[i]}" in
      "$flag") value=${PASSTHROUGH[i + 1]-} ;;
      "$flag"=*) value=${PASSTHROUGH[i]#*=} ;;
    esac
  done
  printf '%s\n' "$value"
}

# --- GPUs ------------------------------------------------------------------------------------------------------------

visible_gpu_count() {  # prints the number of GPUs nvidia-smi sees, or nothing when nvidia-smi is absent or fails
  local out
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  out=$(nvidia-smi -L 2>/dev/null) || return 0
  grep -c '^GPU [0-9]' <<<"$out" || true
}

no_gpu_count_reason() {  # why visible_gpu_count printed nothing, for messages
  if command -v nvidia-smi >/dev/null 2>&1; then
    printf '%s\n' "nvidia-smi -L failed"
  else
    printf '%s\n' "nvidia-smi is not on PATH"
  fi
}

# --- runtime ---------------------------------------------------------------------------------------------------------

# run_cmd CMD...: runs the command, or with --dry-run prints it shell-quoted on one line (words of only safe
# characters as they are, so that `--mount type=bind,source=...` reads as typed)
run_cmd() {
  if ((KIT_DRY_RUN)); then
    local out="" word quoted
    for word in "$@"; do
      if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
        quoted=$word
      else
        printf -v quoted '%q' "$word"
      fi
      out+="$quoted "
    done
    printf '%s\n' "${out% }"
    return 0
  fi
  "$@"
}

check_image() {  # the image must exist locally; with --dry-run a missing one is only a warning
  local out problem
  if out=$(docker image inspect "$KIT_IMAGE" 2>&1 >/dev/null); then
    KIT_RUNTIME_READY=1
    return 0
  fi
  problem=$(docker_problem "$out")
  if ((KIT_DRY_RUN)); then
    warn "${problem:-image $KIT_IMAGE not found; run ./build.sh before running these commands}"
    return 0
  fi
  die "${problem:-image $KIT_IMAGE not found; run ./build.sh first to build it}"
}

# docker_problem OUTPUT: what a failed docker command's output says is wrong with docker itself (not on PATH, the
# daemon's socket refused or absent), as one line; empty when it is something else (an image that is not there)
docker_problem() {
  local out=$1
  if ! command -v docker >/dev/null 2>&1; then
    printf '%s\n' "docker is not on PATH: install Docker (or run with --local, in a virtualenv)"
  elif [[ "$out" == *"permission denied"*"docker"*".sock"* ]]; then
    printf '%s\n' "docker refused access to its socket (permission denied): add your user to the docker group (sudo usermod -aG docker \$USER, then log in again), or run with --local"
  elif [[ "$out" == *"Cannot connect to the Docker daemon"* || "$out" == *"Is the docker daemon running"* ]]; then
    printf '%s\n' "the Docker daemon is not running (docker cannot reach it): start it (sudo systemctl start docker), or run with --local"
  fi
}

# kit_map_path PATH LABEL [create]: the path to use for PATH inside the runtime, in KIT_MAPPED (commands run from
# the repository root, so a relative PATH, given relative to the current directory, has to be translated). Locally:
# an absolute path. In Docker: a path inside the repository becomes relative to the mounted repository; one outside
# is bind-mounted at the same absolute path (a file through its directory). A path outside that does not exist is
# not mounted (the program inside then reports it missing), unless `create` asks for it as a directory: it is then
# created first (not with --dry-run), so that the bind mount has a source and nothing on the host is owned by root.
# LABEL (the flag) names the path in messages.
kit_map_path() {
  local path=$1 label=$2 create=${3-} abs parent
  if [[ "$path" == /* ]]; then abs=$path; else abs=$PWD/$path; fi
  KIT_MAPPED=$abs
  [[ "$KIT_RUNTIME" == docker ]] || return 0
  if [[ "$create" == create && ! -e "$abs" ]] && ((!KIT_DRY_RUN)); then
    check_mount_source "$abs" "$label $path"
    mkdir -p "$abs"
  fi
  parent=$(dirname "$abs")
  if [[ -d "$parent" ]]; then
    abs=$(cd "$parent" && pwd -P)/$(basename "$abs")
  fi
  local root_real
  root_real=$(cd "$KIT_ROOT" && pwd -P)
  if [[ "$abs" == "$root_real" ]]; then
    KIT_MAPPED=.
  elif [[ "$abs" == "$root_real"/* ]]; then
    KIT_MAPPED=${abs#"$root_real"/}
  else
    KIT_MAPPED=$abs
    local mount_dir=$abs
    if [[ -f "$abs" ]]; then
      mount_dir=$(dirname "$abs")
    elif [[ ! -e "$abs" && "$create" != create ]]; then
      return 0
    fi
    check_mount_source "$mount_dir" "$label $path"
    local seen
    for seen in "${KIT_MOUNTS[@]+"${KIT_MOUNTS[@]}"}"; do
      [[ "$seen" != "$mount_dir" ]] || return 0   # Docker refuses two mounts at one target
    done
    KIT_MOUNTS+=("$mount_dir")
  fi
}

# check_mount_source HOST WHAT: HOST can be written in `--mount type=bind,source=HOST,...`, whose fields Docker splits
# at commas (and a double quote starts a quoted field there), else a one-line error naming WHAT, exit 2
check_mount_source() {
  local host=$1 what=$2
  if [[ "$host" == *[,\"]* || "$host" == *$'\n'* ]]; then
    die "$what: the host path $host holds a comma, a double quote or a newline, which docker run --mount cannot take; rename or move it, or run with --local" 2
  fi
}

# hf_cache_dir: the host's Hugging Face cache (HF_HOME, as an absolute path: a bind mount needs one)
hf_cache_dir() {
  local dir=${HF_HOME:-$HOME/.cache/huggingface}
  [[ "$dir" == /* ]] || dir=$PWD/$dir
  printf '%s\n' "$dir"
}

# repo_dir_host NAME: the host directory behind the repository's data/, checkpoints/ or logs/ (a symlinked one: where
# it points)
repo_dir_host() {
  local host=$KIT_ROOT/$1
  if [[ -d "$host" ]]; then
    host=$(cd "$host" && pwd -P)
  fi
  printf '%s\n' "$host"
}

# docker_mounts: fills MOUNTS with HOST TARGET WHAT triples, every bind mount of a docker run: the repository, its
# data/, checkpoints/ and logs/, the Hugging Face cache, the compile cache and the paths outside the repository that
# kit_map_path found (each at its own path)
docker_mounts() {
  MOUNTS=("$KIT_ROOT" "$KIT_WORKDIR" "the repository")
  local name host
  for name in data checkpoints logs; do
    MOUNTS+=("$(repo_dir_host "$name")" "$KIT_WORKDIR/$name" "$name/")
  done
  MOUNTS+=("$(hf_cache_dir)" "$KIT_HF_CACHE_IN" "the Hugging Face cache (HF_HOME)")
  MOUNTS+=("$(compile_cache_dir)" "$KIT_COMPILE_CACHE_IN" "the compile cache (KIT_COMPILE_CACHE)")
  for host in "${KIT_MOUNTS[@]+"${KIT_MOUNTS[@]}"}"; do
    MOUNTS+=("$host" "$host" "$host")
  done
}

# check_docker_mounts: every host path a docker run mounts can be written in a --mount spec (before anything runs)
check_docker_mounts() {
  local i
  docker_mounts
  for ((i = 0; i < ${#MOUNTS[@]}; i += 3)); do
    check_mount_source "${MOUNTS[i]}" "${MOUNTS[i + 2]}"
  done
}

# compile_cache_dir: the host directory that keeps torch.compile's caches (inductor's and Triton's) between runs. A
# container's own /tmp is gone when it exits, and a cold compile of the track-1 model took 135 s on an H100 against
# 16 s with a warm cache (records/h100-2026-11-24.md).
compile_cache_dir() {
  local dir=${KIT_COMPILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nanogpt-speedrun/compile}
  [[ "$dir" == /* ]] || dir=$PWD/$dir  # commands run from the repository root, and docker -v needs a full path
  printf '%s\n' "$dir"
}

# compile_cache_summary: where this run's compile cache is, for the settings a wrapper prints (local_cmd's rule: in a
# local run an inductor cache directory the user set wins)
compile_cache_summary() {
  if [[ "$KIT_RUNTIME" == local && -n "${TORCHINDUCTOR_CACHE_DIR-}" ]]; then
    printf '%s (from TORCHINDUCTOR_CACHE_DIR)\n' "$TORCHINDUCTOR_CACHE_DIR"
  else
    compile_cache_dir
  fi
}

# compile_cache_env ROOT: fills CACHE_ENV with the NAME=VALUE pairs that put both caches under ROOT
compile_cache_env() {
  CACHE_ENV=("TORCHINDUCTOR_CACHE_DIR=$1/inductor" "TRITON_CACHE_DIR=$1/triton")
}

# gpu_request: the value of `docker run --gpus` for KIT_GPU_SPEC (all, or "device=LIST" with its quotes: Docker reads
# the value as CSV, and a bare device=0,1 would be two fields)
gpu_request() {
  if [[ "$KIT_GPU_SPEC" == all ]]; then
    printf 'all\n'
  else
    printf '"device=%s"\n' "$KIT_GPU_SPEC"
  fi
}

# check_gpu_runtime: a GPU run needs a docker that can give containers GPUs (the NVIDIA Container Toolkit). Docker
# lists an nvidia runtime when the toolkit is configured as one; without it --gpus can still work through the
# toolkit's hook, so a container that does nothing asks the daemon itself. Its "could not select device driver"
# (exit 125) becomes one line naming the two ways on; any other failure is left to the real run to report.
check_gpu_runtime() {
  [[ "$KIT_RUNTIME" == docker && "$KIT_GPU_SPEC" != none ]] || return 0
  ((!KIT_DRY_RUN)) || return 0
  local runtimes out rc=0
  runtimes=$(docker info --format '{{range $name, $_ := .Runtimes}}{{$name}} {{end}}' 2>/dev/null) || true
  [[ " $runtimes " != *" nvidia "* ]] || return 0
  out=$(docker run --rm --gpus "$(gpu_request)" --entrypoint true "$KIT_IMAGE" 2>&1) || rc=$?
  if ((rc == 125)) && [[ "$out" == *"could not select device driver"* ]]; then
    die "this docker cannot give a container GPUs (no NVIDIA runtime: docker run --gpus says 'could not select device driver'); install the NVIDIA Container Toolkit and restart docker, or run on the CPU with --cpu" 2
  fi
}

# docker_run_args: fills DOCKER_RUN with `docker run ... IMAGE` (the command to run inside follows it)
docker_run_args() {
  DOCKER_RUN=(docker run --rm)
  if ((KIT_CAPTURE)); then
    :  # no terminal: it would mix the program's stderr into the output read back
  elif [ -t 0 ]; then
    DOCKER_RUN+=(-i -t)
  elif ((KIT_STDIN)); then
    DOCKER_RUN+=(-i)
  fi
  # --init: a small init as PID 1 passes SIGTERM on to the program (which, as PID 1 itself, would ignore it)
  DOCKER_RUN+=(--init --ipc=host --ulimit stack=67108864)
  DOCKER_RUN+=(--user "$(id -u):$(id -g)" -e HOME=/tmp)
  if [[ "$KIT_GPU_SPEC" != none ]]; then
    DOCKER_RUN+=(--gpus "$(gpu_request)")
    # pinned host memory for CUDA copies and NCCL; a daemon that cannot raise the limit (rootless) refuses to start
    # the container with it: --no-memlock
    if ((KIT_MEMLOCK)); then DOCKER_RUN+=(--ulimit memlock=-1); fi
  fi
  if ((KIT_HOST_NETWORK)); then
    DOCKER_RUN+=(--network host)
  fi
  # the host directories are created first, so that Docker does not create them owned by root (and a bind mount
  # needs its source to exist); a dry run prints the mkdir its commands need, pasted in a fresh clone
  local name pair i absent=()
  if ((!KIT_DRY_RUN)); then
    for name in data checkpoints logs; do
      mkdir -p "$KIT_ROOT/$name"
    done
    mkdir -p "$(hf_cache_dir)" "$(compile_cache_dir)"
  fi
  # --mount, not -v: -v splits its spec at every colon, so a host path with a colon would break it
  docker_mounts
  for ((i = 0; i < ${#MOUNTS[@]}; i += 3)); do
    [[ -e "${MOUNTS[i]}" ]] || absent+=("${MOUNTS[i]}")
  done
  if ((KIT_DRY_RUN && !KIT_CAPTURE && ${#absent[@]})); then
    run_cmd mkdir -p "${absent[@]}"
  fi
  for ((i = 0; i < ${#MOUNTS[@]}; i += 3)); do
    check_mount_source "${MOUNTS[i]}" "${MOUNTS[i + 2]}"
    # a capture with --dry-run creates nothing, and a missing source has nothing to read
    if ((KIT_CAPTURE)) && [[ ! -e "${MOUNTS[i]}" ]]; then continue; fi
    DOCKER_RUN+=(--mount "type=bind,source=${MOUNTS[i]},target=${MOUNTS[i + 1]}")
  done
  DOCKER_RUN+=(-w "$KIT_WORKDIR" -e "HF_HOME=$KIT_HF_CACHE_IN")
  compile_cache_env "$KIT_COMPILE_CACHE_IN"
  for pair in "${CACHE_ENV[@]}"; do
    DOCKER_RUN+=(-e "$pair")
  done
  # secrets and settings pass by name only: docker reads their values from this environment
  local var
  for var in WANDB_API_KEY WANDB_MODE WANDB_PROJECT WANDB_ENTITY HF_TOKEN HF_ENDPOINT HF_HUB_OFFLINE HELLASWAG_URL \
    HELLASWAG_DIR; do
    if [[ -n "${!var-}" ]]; then
      DOCKER_RUN+=(-e "$var")
    fi
  done
  for pair in "${KIT_ENV[@]+"${KIT_ENV[@]}"}"; do
    DOCKER_RUN+=(-e "$pair")
  done
  DOCKER_RUN+=("$KIT_IMAGE")
}

# --- local virtualenv ------------------------------------------------------------------------------------------------

venv_dir() {
  printf '%s\n' "${KIT_VENV:-$KIT_ROOT/.venv}"
}

# venv_ready PYTHON: whether the virtualenv has torch, the offline GPT-2 vocabulary and requirements.txt's pins
venv_ready() {
  "$1" - "$KIT_ROOT/requirements.txt" <<'PY' >/dev/null 2>&1
import importlib.metadata as md
import importlib.util
import sys

assert importlib.util.find_spec("torch") is not None
assert importlib.util.find_spec("whisper") is not None
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.split("#", 1)[0].strip()
    if "==" in line:
        name, version = (part.strip() for part in line.split("==", 1))
        assert md.version(name) == version, name
PY
}

# ensure_venv: creates or completes the virtualenv ($KIT_VENV, default .venv); sets KIT_PY and KIT_BIN
ensure_venv() {
  local venv
  venv=$(venv_dir)
  KIT_BIN=$venv/bin
  KIT_PY=$KIT_BIN/python
  if [[ ! -x "$KIT_PY" ]]; then
    command -v python3 >/dev/null 2>&1 || die "--local needs python3 (3.10+) to create the virtualenv $venv"
    say "creating virtualenv $venv"
    run_cmd python3 -m venv "$venv"
  elif venv_ready "$KIT_PY" && torch_pinned "$KIT_PY"; then
    KIT_RUNTIME_READY=1
    return 0
  fi
  say "installing requirements.txt into $venv"
  run_cmd "$KIT_PY" -m pip install --progress-bar on -r "$KIT_ROOT/requirements.txt"
  if ((KIT_DRY_RUN)) || ! torch_pinned "$KIT_PY"; then
    install_torch "$KIT_PY" "$(torch_requirement)"
  fi
  say "installing the offline GPT-2 vocabulary (requirements-vocab.txt, without its dependencies)"
  run_cmd "$KIT_PY" -m pip install --progress-bar on --no-deps -r "$KIT_ROOT/requirements-vocab.txt"
  ((KIT_DRY_RUN)) || KIT_RUNTIME_READY=1
}

# torch_requirement: $KIT_TORCH_SPEC, else the pin of requirements-torch.txt (the same torch as the tests and the
# image)
torch_requirement() {
  if [[ -n "${KIT_TORCH_SPEC:-}" ]]; then
    printf '%s\n' "$KIT_TORCH_SPEC"
  else
    grep -v '^[[:space:]]*#' "$KIT_ROOT/requirements-torch.txt" | grep -m1 .
  fi
}

# torch_pinned PY: whether PY has the torch of torch_requirement (any build of that version)
torch_pinned() {
  "$1" - "$(torch_requirement)" <<'PY' >/dev/null 2>&1
import importlib.metadata as md
import sys

name, _, version = sys.argv[1].partition("==")
assert name.strip() == "torch"
assert not version or md.version("torch").split("+")[0] == version.strip()
PY
}

# has_nvidia_gpu: whether this machine has an NVIDIA GPU with its driver loaded (KIT_TORCH_BUILD=cpu|cuda decides
# instead)
has_nvidia_gpu() {
  case "${KIT_TORCH_BUILD:-}" in
    cpu) return 1 ;;
    cuda) return 0 ;;
  esac
  [[ -n "$(visible_gpu_count)" && "$(visible_gpu_count)" != 0 ]] || [[ -e /proc/driver/nvidia/version ]]
}

# install_torch PY SPEC: the CUDA build from the default index where there is an NVIDIA GPU; elsewhere the CPU build
# from PyTorch's CPU wheel index (KIT_TORCH_CPU_INDEX), about 200 MB instead of several GB of CUDA libraries, and
# when that index cannot be reached, whatever the default index has, saying so
install_torch() {
  local py=$1 spec=$2 cpu_index=${KIT_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
  if has_nvidia_gpu; then
    say "installing $spec with CUDA (an NVIDIA GPU is here): a download of a few GB, once"
    run_cmd "$py" -m pip install --progress-bar on "$spec"
    return
  fi
  say "installing $spec, the CPU build (no NVIDIA GPU here), from $cpu_index"
  if ! run_cmd "$py" -m pip install --progress-bar on --retries 1 --timeout 30 --index-url "$cpu_index" "$spec"; then
    say "could not install $spec from $cpu_index (unreachable, or no build for this machine there): installing" \
      "it from the default package index instead, which on Linux x86-64 is the CUDA build (a few GB)"
    run_cmd "$py" -m pip install --progress-bar on "$spec"
  fi
}

# local_cmd CMD...: fills LOCAL_CMD with CMD, prefixed with `env NAME=VALUE...` for KIT_ENV and for the compile
# cache (unless TORCHINDUCTOR_CACHE_DIR or TRITON_CACHE_DIR is already set, which then wins)
local_cmd() {
  local pairs=("${KIT_ENV[@]+"${KIT_ENV[@]}"}") pair name
  compile_cache_env "$(compile_cache_dir)"
  for pair in "${CACHE_ENV[@]}"; do
    name=${pair%%=*}
    if [[ -z "${!name-}" ]]; then
      pairs+=("$pair")
    fi
  done
  LOCAL_CMD=()
  if ((${#pairs[@]})); then
    LOCAL_CMD=(env "${pairs[@]}")
  fi
  LOCAL_CMD+=("$@")
}

# runtime_cmd CMD...: fills RUNTIME_CMD with CMD (its first word python) as the chosen runtime runs it from the
# repository root
runtime_cmd() {
  if [[ "$KIT_RUNTIME" == docker ]]; then
    docker_run_args
    RUNTIME_CMD=("${DOCKER_RUN[@]}" "$@")
  else
    local exe=$1
    shift
    local_cmd "$KIT_BIN/$exe" "$@"
    RUNTIME_CMD=("${LOCAL_CMD[@]}")
  fi
}

# in_runtime CMD...: runs CMD in the chosen runtime from the repository root, then the script goes on
in_runtime() {
  runtime_cmd "$@"
  (cd "$KIT_ROOT" && run_cmd "${RUNTIME_CMD[@]}")
}

# capture_in_runtime CMD...: runs CMD in the chosen runtime from the repository root, with --dry-run too (for
# commands that only read), and puts its standard output in KIT_CAPTURED; its status is CMD's, its stderr the user's
capture_in_runtime() {
  local rc=0
  KIT_CAPTURE=1
  runtime_cmd "$@"
  KIT_CAPTURE=0
  KIT_CAPTURED=$(cd "$KIT_ROOT" && "${RUNTIME_CMD[@]}" </dev/null) || rc=$?
  return "$rc"
}

# exec_in_runtime CMD...: the script's last command: CMD replaces the script's process (exec), so a signal sent to the
# wrapper (timeout, a CI runner, systemd, kill) reaches the docker client, which passes it on to the container, or
# the local program itself, and no process is left behind when the wrapper is killed
exec_in_runtime() {
  runtime_cmd "$@"
  cd "$KIT_ROOT" || exit
  if ((KIT_DRY_RUN)); then
    run_cmd "${RUNTIME_CMD[@]}"
    exit 0
  fi
  exec "${RUNTIME_CMD[@]}"
}
