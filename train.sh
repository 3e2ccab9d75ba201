#!/usr/bin/env bash
# Trains with train_gpt.py in the kit's Docker image (default) or in a local virtualenv (--local): picks the GPUs
# (or the CPU, --cpu), downloads the FineWeb shards the run needs, then starts torchrun (or one plain python process).
set -euo pipefail

KIT_PROG=train.sh
# shellcheck source=lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
  cat <<'TXT'
Usage: ./train.sh [FLAGS] [TRAIN_GPT_FLAGS...] [-- TRAIN_GPT_FLAGS...]

Runs train_gpt.py in the Docker image built by ./build.sh (or with --local in a virtualenv), under torchrun on
the chosen GPUs, after downloading the FineWeb shards the run needs. The flags below are train.sh's own; every other
word goes to train_gpt.py as it is, which checks it (./train.sh -- --help, or python train_gpt.py --help, lists
its flags and --set fields: --preset, --num-iterations N, --run-name NAME, --set model_dim=64, ...). Without
--preset or --resume it runs --preset auto: the record's global batch and steps in the longest sequences that fit
the GPUs found (what it chose, and why, is printed), or the tiny preset where there is no GPU.

Hardware and runtime:
  --cpu                           train on the CPU (train_gpt.py --device cpu; Docker: no GPUs, no NVIDIA runtime)
  --num-gpus N                    processes/GPUs on this node (default: all visible GPUs; with --cpu: 1 process)
                                  (a Docker GPU run needs nvidia-smi to count the GPUs)
  --gpus LIST                     these GPUs only, e.g. 0,1,3 (sets the process count)
  --nnodes N                      nodes in the run (default 1)
  --node-rank R                   this node's rank, 0..N-1 (default 0)
  --master-addr HOST              rank 0's address (needed with --nnodes > 1)
  --master-port PORT              rank 0's port (default 29500)
  --nccl-p2p-disable              set NCCL_P2P_DISABLE=1 for the run (GPUs without working peer-to-peer)
  --local                         run in a local virtualenv ($KIT_VENV, default .venv; created when missing)
  --image IMAGE                   Docker image (default nanogpt-speedrun:latest, or $KIT_IMAGE)
  --no-memlock                    no --ulimit memlock=-1 on a Docker GPU run (for daemons that cannot raise it:
                                  rootless Docker, some sandboxes)
  --dry-run                       print the commands instead of running them (the settings are still read from
                                  train_gpt.py --print-config=shell, which only reads)
  --medium                        run train_gpt_medium.py (track 2) instead of train_gpt.py
  -h, --help                      this text

After training:
  --eval-hellaswag                when the run ends well, its final checkpoint's HellaSwag validation accuracy
                                  (eval_hellaswag.py; the file is downloaded into data/hellaswag on first use)

Data:
  --shards N                      FineWeb train shards to download (default: what train_gpt.py --print-config
                                  says the run reads, fineweb_shards)

Paths for train_gpt.py (translated for the runtime; a path outside the repository is mounted into Docker):
  --data-dir DIR                  shard directory
  --checkpoint-dir DIR            where the run's checkpoints go (default checkpoints)
  --log-dir DIR                   where the run's log goes (default logs)
  --resume [PATH]                 continue from a checkpoint file or run directory (default: the newest)
  -- FLAGS...                     everything after -- goes to train_gpt.py unchanged, paths included

Environment:
  KIT_COMPILE_CACHE               torch.compile cache kept between runs
                                  (default ${XDG_CACHE_HOME:-~/.cache}/nanogpt-speedrun/compile)

Examples:
  ./train.sh                                  # the record's recipe, fitted to every GPU of this machine
  ./train.sh --gpus 0,1 --preset a10          # two GPUs
  ./train.sh --cpu --preset tiny              # CPU in Docker, built-in corpus
  ./train.sh --local --preset tiny --set model_dim=64 --no-compile   # CPU, no Docker, a smaller model
  ./train.sh --nnodes 2 --node-rank 0 --master-addr 10.0.0.1   # on each node, with its own rank
TXT
}

# settings (the wrapper's own) and the words for train_gpt.py
CPU=0
NUM_GPUS=""
GPU_LIST=""
NNODES=1
NODE_RANK=0
MASTER_ADDR=""
MASTER_PORT=29500
NCCL_P2P_OFF=0
SCRIPT=train_gpt.py
EVAL_HELLASWAG=0
RUN_NAME=""     # the run's name when train.sh must know it (--eval-hellaswag)
TRAIN_ARGS=()   # the trainer's words as the run gets them
EVAL_CMD=()     # --eval-hellaswag: the evaluation after the run
SHARDS=""
DATA_DIR=""     # the run's data_dir, as the runtime reads it (from CONFIG)
DOWNLOAD_DIR="" # the same directory on this host
PASSTHROUGH=()  # train_gpt.py's words, in the order given
PATH_ARGS=()    # INDEX FLAG VALUE triples: the words of PASSTHROUGH that hold a path, translated before the run
TRAINER_HELP=0
CONFIG=""       # train_gpt.py --print-config=shell: the run's settings as NAME=VALUE lines
ORIGINAL_ARGS=()  # the words train.sh was given
LAUNCH_WORDS=("$0")  # this wrapper and the flags that say how the run is started (runtime, GPUs, paths), as given:
                     # with --resume they continue the run the way it was started (the trainer prints them)

# path_arg FLAG VALUE: FLAG=VALUE for train_gpt.py, its VALUE translated for the runtime once that is known (the
# directories are part of how the run was started: a resume needs them again, mounted)
path_arg() {
  PATH_ARGS+=("${#PASSTHROUGH[@]}" "$1" "$2")
  PASSTHROUGH+=("$1=$2")
  [[ "$1" == --resume ]] || launch_word "$1" "$2"
}

# launch_word WORDS...: words of LAUNCH_WORDS
launch_word() {
  LAUNCH_WORDS+=("$@")
}

# launch_env: what the trainer needs to print the commands that go on from a stop: how it was started
# (KIT_LAUNCH, KIT_COMMAND: the whole command line) and where, on this host (KIT_HOST_ROOT, KIT_HOST_CWD)
launch_env() {
  local word command=("$0")
  for word in "${ORIGINAL_ARGS[@]+"${ORIGINAL_ARGS[@]}"}"; do
    [[ "$word" == --dry-run ]] || command+=("$word")  # the command pasted from a dry run's output runs the run
  done
  KIT_ENV+=("KIT_LAUNCH=$(quote_words "${LAUNCH_WORDS[@]}")" "KIT_COMMAND=$(quote_words "${command[@]}")"
    "KIT_HOST_ROOT=$KIT_ROOT" "KIT_HOST_CWD=$PWD")
}

parse_args() {
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --cpu) CPU=1; launch_word "$1" ;;
      --num-gpus) need_value "$1" "$#" "${2-}"; check_int "$1" "$2" 1; NUM_GPUS=$((10#$2)); launch_word "$1" "$2"; shift ;;
      --gpus) need_value "$1" "$#" "${2-}"; check_gpu_list "$1" "$2"; GPU_LIST=$2; launch_word "$1" "$2"; shift ;;
      --nnodes) need_value "$1" "$#" "${2-}"; check_int "$1" "$2" 1; NNODES=$((10#$2)); launch_word "$1" "$2"; shift ;;
      --node-rank) need_value "$1" "$#" "${2-}"; check_int "$1" "$2"; NODE_RANK=$((10#$2)); launch_word "$1" "$2"; shift ;;
      --master-addr) need_value "$1" "$#" "${2-}"; MASTER_ADDR=$2; launch_word "$1" "$2"; shift ;;
      --master-port) need_value "$1" "$#" "${2-}"; check_int "$1" "$2" 1; MASTER_PORT=$2; launch_word "$1" "$2"; shift ;;
      --nccl-p2p-disable) NCCL_P2P_OFF=1; launch_word "$1" ;;
      --local) KIT_RUNTIME=local; launch_word "$1" ;;
      --image) need_value "$1" "$#" "${2-}"; KIT_IMAGE=$2; launch_word "$1" "$2"; shift ;;
      --no-memlock) KIT_MEMLOCK=0; launch_word "$1" ;;
      --dry-run) KIT_DRY_RUN=1 ;;
      --medium) SCRIPT=train_gpt_medium.py; launch_word "$1" ;;
      --eval-hellaswag) EVAL_HELLASWAG=1; launch_word "$1" ;;
      --shards) need_value "$1" "$#" "${2-}"; check_int "$1" "$2" 1; SHARDS=$((10#$2)); shift ;;
      --data-dir | --checkpoint-dir | --log-dir) need_value "$1" "$#" "${2-}"; path_arg "$1" "$2"; shift ;;
      --data-dir=* | --checkpoint-dir=* | --log-dir=*) path_arg "${1%%=*}" "${1#*=}" ;;
      --resume)
        if (($# > 1)) && [[ "$2" != -* ]]; then
          path_arg "$1" "$2"
          shift
        else
          PASSTHROUGH+=("$1")
        fi ;;
      --resume=*) path_arg --resume "${1#*=}" ;;
      --) shift; PASSTHROUGH+=("$@"); break ;;
      *) PASSTHROUGH+=("$1") ;;
    esac
    shift
  done
  local word
  for word in "${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}"; do
    [[ "$word" != -h && "$word" != --help ]] || TRAINER_HELP=1
  done
}

# map_paths: the path words of PASSTHROUGH as the runtime reads them (kit_map_path; a missing --data-dir,
# --checkpoint-dir or --log-dir is created)
map_paths() {
  local i
  for ((i = 0; i < ${#PATH_ARGS[@]}; i += 3)); do
    if [[ "${PATH_ARGS[i + 1]}" != --resume ]]; then  # a directory the run writes in
      kit_map_path "${PATH_ARGS[i + 2]}" "${PATH_ARGS[i + 1]}" create
    else
      kit_map_path "${PATH_ARGS[i + 2]}" "${PATH_ARGS[i + 1]}"
    fi
    PASSTHROUGH[PATH_ARGS[i]]="${PATH_ARGS[i + 1]}=$KIT_MAPPED"
  done
}

# check_nodes: multi-node settings are complete and consistent
check_nodes() {
  if ((NODE_RANK >= NNODES)); then
    die_usage "--node-rank $NODE_RANK must be below --nnodes $NNODES"
  fi
  if ((NNODES > 1)) && [[ -z "$MASTER_ADDR" ]]; then
    die_usage "--nnodes $NNODES needs --master-addr (the address of the node with --node-rank 0)"
  fi
  if ((MASTER_PORT > 65535)); then
    die_usage "--master-port must be at most 65535, got $MASTER_PORT"
  fi
}

# count_gpus: VISIBLE, the GPUs the run can use (empty: unknown, nvidia-smi absent or failing), and VISIBLE_FROM,
# where that number comes from, for messages. nvidia-smi -L lists every GPU of the machine; a local run sees only
# the ones CUDA_VISIBLE_DEVICES names (up to its first entry that is not a GPU), unless --gpus replaces it.
count_gpus() {
  VISIBLE=$(visible_gpu_count)
  VISIBLE_FROM="nvidia-smi -L shows"
  if [[ -z "$VISIBLE" || "$KIT_RUNTIME" != local || -n "$GPU_LIST" || -z "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    return 0
  fi
  local -a ids=()
  local id usable=0
  [[ -z "$CUDA_VISIBLE_DEVICES" ]] || IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
  for id in "${ids[@]+"${ids[@]}"}"; do
    if [[ "$id" =~ ^[0-9]+$ ]] && ((10#$id < VISIBLE)) || [[ "$id" == GPU-* || "$id" == MIG-* ]]; then
      usable=$((usable + 1))
    else
      break
    fi
  done
  if ((usable < VISIBLE)); then
    VISIBLE=$usable
    VISIBLE_FROM="CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES leaves"
  fi
}

# cpu_processes WHY: NPROC processes on the CPU (--num-gpus of them, default 1) and no GPU for Docker; WHY (the flag
# that chose the CPU) names it in messages
cpu_processes() {
  local why=$1
  if [[ -n "$GPU_LIST" ]]; then
    die_usage "--gpus $GPU_LIST picks GPUs, but $why trains on the CPU; drop one of them"
  fi
  if ((NCCL_P2P_OFF)); then
    die_usage "--nccl-p2p-disable is for GPUs, but $why trains on the CPU; drop one of them"
  fi
  NPROC=${NUM_GPUS:-1}
  KIT_GPU_SPEC=none
}

# gpu_processes: NPROC processes, one per GPU, and the GPUs Docker passes in (KIT_GPU_SPEC), checked against VISIBLE.
# Without a count (no working nvidia-smi) nothing can be checked, and a Docker run given GPUs that are not there fails
# inside the container, or silently trains on fewer: refused, with the way to a CPU run. A --dry-run still prints its
# commands, for the GPUs asked for (one by default), and says they are unchecked.
gpu_processes() {
  local uncounted=0
  if [[ -z "$VISIBLE" ]] && ((KIT_DRY_RUN)); then  # the commands still print: for the GPUs asked for, else one
    uncounted=1
    VISIBLE=$((10#${NUM_GPUS:-1} > 64 ? 10#${NUM_GPUS:-1} : 64))
    [[ -n "$NUM_GPUS$GPU_LIST" ]] || NUM_GPUS=1
  fi
  gpu_counts
  if ((uncounted)); then
    warn "the GPUs cannot be counted here ($(no_gpu_count_reason)): the commands below are for $NPROC GPU(s), unchecked (--num-gpus N or --gpus LIST sets them)"
  fi
}

# gpu_counts: gpu_processes for a known VISIBLE (empty: unknown, refused)
gpu_counts() {
  local id highest=-1
  if [[ -z "$VISIBLE" ]]; then
    local what="the Docker run's GPUs (default: all visible ones) cannot be checked" cpu_hint
    [[ -z "$NUM_GPUS" ]] || what="--num-gpus $NUM_GPUS cannot be checked"
    [[ -z "$GPU_LIST" ]] || what="--gpus $GPU_LIST cannot be checked"
    cpu_hint="or train on the CPU with --cpu (or --local, without Docker)"
    [[ "$KIT_RUNTIME" != local ]] || cpu_hint="or drop --gpus to train on the CPU"
    die "$what: $(no_gpu_count_reason), so the visible GPUs cannot be counted; run where nvidia-smi works (it comes with the NVIDIA driver), $cpu_hint" 2
  fi
  if [[ -n "$GPU_LIST" ]]; then
    local -a ids
    IFS=, read -r -a ids <<<"$GPU_LIST"
    if [[ -n "$NUM_GPUS" && "$NUM_GPUS" != "${#ids[@]}" ]]; then
      die_usage "--num-gpus $NUM_GPUS does not match --gpus $GPU_LIST (${#ids[@]} GPUs)"
    fi
    for id in "${ids[@]}"; do
      if ((10#$id > highest)); then highest=$((10#$id)); fi
    done
    if ((highest >= VISIBLE)); then
      die_usage "--gpus $GPU_LIST asks for GPU $highest, but $VISIBLE_FROM $VISIBLE GPU(s)$( ((VISIBLE == 0)) || printf ' (0..%s)' $((VISIBLE - 1)))"
    fi
    NPROC=${#ids[@]}
    KIT_GPU_SPEC=$GPU_LIST
  elif [[ -n "$NUM_GPUS" ]]; then
    if ((NUM_GPUS > VISIBLE)); then
      die_usage "--num-gpus $NUM_GPUS asks for more GPUs than $VISIBLE_FROM ($VISIBLE)"
    fi
    NPROC=$NUM_GPUS
    KIT_GPU_SPEC=$(seq -s, 0 $((NUM_GPUS - 1)))
  elif ((VISIBLE == 0)); then
    die "no GPU to train on: $VISIBLE_FROM none; train on the CPU with --cpu (or --local, without Docker)" 2
  else
    NPROC=$VISIBLE
    KIT_GPU_SPEC=all
  fi
}

# resolve_gpus: sets NPROC and KIT_GPU_SPEC from --num-gpus / --gpus and the GPUs there are. The run is on the CPU
# with --cpu (or its long form --device cpu), or locally on a machine without GPUs (no nvidia-smi, or it lists
# none) and no --gpus; there --num-gpus N starts N processes. Any other run is on GPUs.
resolve_gpus() {
  local device
  device=$(passthrough_value --device)
  if ((CPU)) && [[ -n "$device" && "$device" != cpu ]]; then
    die_usage "--cpu trains on the CPU, but --device $device asks for another device; drop one of them"
  fi
  count_gpus
  if ((CPU)); then
    cpu_processes --cpu
  elif [[ "$device" == cpu ]]; then
    cpu_processes "--device cpu"
  elif [[ "$KIT_RUNTIME" == local && -z "$GPU_LIST" && "${VISIBLE:-0}" == 0 ]]; then
    cpu_processes "a machine without GPUs"
  else
    gpu_processes
  fi
  if [[ "$KIT_RUNTIME" == local && -n "$GPU_LIST" ]]; then
    KIT_ENV+=("CUDA_VISIBLE_DEVICES=$GPU_LIST")
  fi
  if ((NCCL_P2P_OFF)); then
    KIT_ENV+=(NCCL_P2P_DISABLE=1)
  fi
  if ((NNODES > 1)); then
    KIT_HOST_NETWORK=1
  fi
}

# run_config: CONFIG, the run's resolved settings and what follows from them, from the trainer itself: SCRIPT's
# --print-config=shell with the words the training gets, run in the same runtime (with --dry-run too: it only
# reads). A flag the trainer refuses ends the wrapper here, with the trainer's own line and exit status. With
# --dry-run and the runtime not ready (no image, no virtualenv yet) the command is printed instead, CONFIG empty.
run_config() {
  local saved_gpus=$KIT_GPU_SPEC saved_env=("${KIT_ENV[@]+"${KIT_ENV[@]}"}")
  # the run's number of processes, so that the settings are checked for it before any is started; --preset auto
  # also measures the run's GPUs
  if [[ "$(preset_of "$@")" != auto ]]; then
    KIT_GPU_SPEC=none
    KIT_ENV=()
  fi
  KIT_ENV+=("WORLD_SIZE=$((NNODES * NPROC))")
  if ((KIT_DRY_RUN && !KIT_RUNTIME_READY)); then
    in_runtime python "$SCRIPT" "$@" --print-config=shell
  else
    capture_in_runtime python "$SCRIPT" "$@" --print-config=shell || exit
    CONFIG=$KIT_CAPTURED
    check_config
    # a run too big for the CPU, on the CPU (the question is asked without GPUs, so only a CPU run heeds it)
    if [[ -n "$(config_value cpu_refusal)" && "$saved_gpus" == none ]]; then
      printf '%s: error: %s\n' "$SCRIPT" "$(config_value cpu_refusal)" >&2
      exit 2
    fi
  fi
  KIT_GPU_SPEC=$saved_gpus
  KIT_ENV=("${saved_env[@]+"${saved_env[@]}"}")
}

# preset_of WORDS...: the --preset the trainer's words choose (the last one given), empty for none
preset_of() {
  local preset=""
  while (($#)); do
    case "$1" in
      --preset) preset=${2-}; shift ;;
      --preset=*) preset=${1#*=} ;;
    esac
    shift
  done
  printf '%s' "$preset"
}

# given_word FLAG WORDS...: whether WORDS hold FLAG, alone or as FLAG=VALUE
given_word() {
  local flag=$1 word
  shift
  for word in "$@"; do
    [[ "$word" != "$flag" && "$word" != "$flag="* ]] || return 0
  done
  return 1
}

# check_config: every line of CONFIG is NAME=VALUE with VALUE as Python's shlex.quote writes it (a word of safe
# characters, or single-quoted), so that config_value can eval it
check_config() {
  local line re="^[a-z_][a-z0-9_]*=([A-Za-z0-9_@%+=:,./-]*|'([^']|'\"'\"')*')$"
  [[ -n "$CONFIG" ]] || die "$SCRIPT --print-config=shell printed nothing"
  while IFS= read -r line; do
    [[ "$line" =~ $re ]] || die "$SCRIPT --print-config=shell printed '$line', which is not NAME=VALUE"
  done <<<"$CONFIG"
}

# config_value NAME: NAME's value in CONFIG (empty when CONFIG is, or NAME is not in it)
config_value() {
  [[ -n "$CONFIG" ]] || return 0
  (eval "$CONFIG" && printf '%s\n' "${!1-}")
}

# plan_data: where the shards come from (DATA_SOURCE) and whether some must be downloaded first (DOWNLOAD_SHARDS,
# into DATA_DIR, the runtime's path): the run's data_dir and fineweb_shards (0: its files are not FineWeb's, e.g.
# the built-in corpus, which train_gpt.py builds itself), or --shards. A directory other than the kit's FineWeb
# one that already holds shards is used as it is.
plan_data() {
  local dir n i missing=0 default_real="" dir_real=""
  DOWNLOAD_SHARDS=""
  if [[ -z "$CONFIG" ]]; then
    DATA_SOURCE="read from $SCRIPT --print-config=shell when run without --dry-run"
    return 0
  fi
  DATA_DIR=$(config_value data_dir)
  n=$(config_value fineweb_shards)
  if [[ ! "$n" =~ ^[0-9]+$ ]]; then
    die "$SCRIPT --print-config=shell gave no fineweb_shards (got '$n'): is $SCRIPT older than train.sh?"
  fi
  if ((n == 0)); then
    DATA_SOURCE="$DATA_DIR ($(config_value train_files); nothing to download)"
    return 0
  fi
  if [[ "$DATA_DIR" == /* ]]; then dir=$DATA_DIR; else dir=$KIT_ROOT/$DATA_DIR; fi
  default_real=$(cd "$KIT_ROOT/data" 2>/dev/null && pwd -P)/fineweb10B
  [[ ! -d "$dir" ]] || dir_real=$(cd "$dir" && pwd -P)
  if [[ "$dir_real" != "$default_real" ]] && compgen -G "$dir/*.bin" >/dev/null; then
    DATA_SOURCE="$DATA_DIR (existing files)"
    return 0
  fi
  [[ -z "$SHARDS" ]] || n=$SHARDS
  [[ -f "$dir/fineweb_val_000000.bin" ]] || missing=1
  for ((i = 1; i <= n; i++)); do
    [[ -f "$(printf '%s/fineweb_train_%06d.bin' "$dir" "$i")" ]] || missing=1
  done
  DATA_SOURCE="$DATA_DIR (FineWeb 10B, $n train shards"
  if ((missing)); then
    DOWNLOAD_SHARDS=$n
    DOWNLOAD_DIR=$dir
    DATA_SOURCE+=", downloading the missing ones first)"
  else
    DATA_SOURCE+=" present)"
  fi
}

# download_data: fetches the validation shard and DOWNLOAD_SHARDS train shards (present ones are skipped)
download_data() {
  [[ -n "$DOWNLOAD_SHARDS" ]] || return 0
  say "downloading the FineWeb validation shard and $DOWNLOAD_SHARDS train shards into $DATA_DIR"
  local saved_gpus=$KIT_GPU_SPEC saved_env=("${KIT_ENV[@]+"${KIT_ENV[@]}"}")
  KIT_GPU_SPEC=none
  KIT_ENV=()
  if ((!KIT_DRY_RUN)); then
    mkdir -p "$DOWNLOAD_DIR"   # before Docker would create it, owned by root
  fi
  in_runtime python data/cached_fineweb10B.py "$DOWNLOAD_SHARDS" "--data-dir=$DATA_DIR"
  KIT_GPU_SPEC=$saved_gpus
  KIT_ENV=("${saved_env[@]+"${saved_env[@]}"}")
}

# launcher: fills LAUNCH with torchrun (or python for one local process) and the script. torchrun is started as
# lib/torchrun.py: the same launcher, without its traceback after a worker's own one-line error
launcher() {
  if ((NNODES > 1)); then
    LAUNCH=(python lib/torchrun.py "--nnodes=$NNODES" "--node_rank=$NODE_RANK" "--master_addr=$MASTER_ADDR"
      "--master_port=$MASTER_PORT" "--nproc_per_node=$NPROC" "$SCRIPT")
  elif [[ "$KIT_RUNTIME" == local && "$NPROC" == 1 ]]; then
    LAUNCH=(python "$SCRIPT")
  else
    LAUNCH=(python lib/torchrun.py --standalone "--nproc_per_node=$NPROC" "$SCRIPT")
  fi
}

print_settings() {
  local where preset run_name
  if [[ "$KIT_RUNTIME" == docker ]]; then where="docker image $KIT_IMAGE"; else where="local virtualenv $(venv_dir)"; fi
  preset=$(config_value preset)
  run_name=$(config_value run_name)
  if [[ -z "$CONFIG" ]]; then
    run_name="(settings not read in this --dry-run)"
  elif [[ -z "$run_name" ]]; then
    if [[ -n "$(config_value resume)" ]]; then run_name="from the checkpoint"; else run_name="generated by $SCRIPT"; fi
  fi
  if [[ -n "$(config_value resume)" ]]; then preset+=" (the checkpoint's settings; flags given override them)"; fi
  say "preset:    ${preset:-(not read)}$([[ "$SCRIPT" == train_gpt.py ]] || printf ' (%s)' "$SCRIPT")"
  if [[ -n "$(config_value fit)" ]]; then say "fitted:    $(config_value fit)"; fi
  say "GPUs:      $NPROC process(es) per node, devices: ${KIT_GPU_SPEC/#none/none (CPU)}"
  say "nodes:     $NNODES (this is rank $NODE_RANK$([[ -z "$MASTER_ADDR" ]] || printf ', master %s:%s' "$MASTER_ADDR" "$MASTER_PORT"))"
  say "runtime:   $where"
  say "data:      $DATA_SOURCE"
  [[ -z "$RUN_NAME" ]] || run_name=$RUN_NAME
  say "run name:  $run_name"
  if ((EVAL_HELLASWAG)); then say "then:      HellaSwag on the final checkpoint (${EVAL_CMD[*]})"; fi
  say "compile cache: $(compile_cache_summary)"
  if ((NCCL_P2P_OFF)); then say "NCCL_P2P_DISABLE=1"; fi
}

# plan_eval: with --eval-hellaswag, RUN_NAME (the run's own; train.sh makes one in the trainer's form, passed as
# --run-name, when neither the flags nor a resumed checkpoint name it) and EVAL_CMD, which evaluates the run's newest
# checkpoint, the final one, after training
plan_eval() {
  ((EVAL_HELLASWAG)) || return 0
  if [[ "$SCRIPT" != train_gpt.py ]]; then
    die_usage "--eval-hellaswag evaluates track-1 checkpoints (train_gpt.py); drop it or --medium"
  fi
  if [[ -n "$CONFIG" && "$(config_value save_final)" != true ]]; then
    die_usage "--eval-hellaswag evaluates the checkpoint written at the end; drop it or --no-save-final"
  fi
  RUN_NAME=$(config_value run_name)
  [[ -n "$RUN_NAME" || -n "$CONFIG" ]] || RUN_NAME=$(passthrough_value --run-name)  # a --dry-run without the runtime
  if [[ -z "$RUN_NAME" ]]; then
    local preset
    preset=$(config_value preset)  # none read in a --dry-run without the runtime
    RUN_NAME="$(date +%Y%m%d-%H%M%S)-${preset:+$preset-}$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
    TRAIN_ARGS+=("--run-name=$RUN_NAME")
  fi
  local dir
  dir=$(config_value checkpoint_dir)
  [[ -n "$dir" ]] || dir=$(passthrough_value --checkpoint-dir)
  EVAL_CMD=(python eval_hellaswag.py "--checkpoint=${dir:-checkpoints}/$RUN_NAME")
  if [[ "$KIT_GPU_SPEC" == none ]]; then EVAL_CMD+=(--device=cpu); fi
}

# train_then_eval: the training run, then (on node 0, when it succeeded) EVAL_CMD; the status is the training's
# when it failed or was stopped, else the evaluation's. From a terminal the run is in the foreground, where Ctrl-C
# reaches it as it does without train.sh (it saves a checkpoint and stops); otherwise a SIGINT or SIGTERM sent to
# train.sh (timeout, a CI runner, systemd) goes on to the run as SIGTERM, which does the same, so no run is left
# behind without its wrapper
train_then_eval() {
  runtime_cmd "$@"
  cd "$KIT_ROOT" || exit
  local rc=0 pid
  if ((KIT_DRY_RUN)); then
    run_cmd "${RUNTIME_CMD[@]}"
  elif [ -t 0 ]; then
    "${RUNTIME_CMD[@]}" || rc=$?
  else
    "${RUNTIME_CMD[@]}" &
    pid=$!
    trap 'kill -TERM "$pid" 2>/dev/null || true' INT TERM
    while wait "$pid"; ((rc = $?, rc > 128)) && kill -0 "$pid" 2>/dev/null; do :; done  # a signal ends the wait
    trap - INT TERM
    rc=0
    wait "$pid" || rc=$?  # the run's own status, whichever wait saw it end
  fi
  if ((rc != 0)); then exit "$rc"; fi
  if ((NODE_RANK != 0)); then
    say "HellaSwag: evaluated on node 0, where the checkpoint is"
    exit 0
  fi
  say "HellaSwag: evaluating ${EVAL_CMD[2]#--checkpoint=}"
  KIT_GPU_SPEC=${KIT_GPU_SPEC/all/0}
  exec_in_runtime "${EVAL_CMD[@]}"
}

# prepare_runtime: the image (and, for a GPU run, a docker that can give containers GPUs) or the virtualenv
prepare_runtime() {
  if [[ "$KIT_RUNTIME" == docker ]]; then
    check_image
    check_gpu_runtime
  else
    ensure_venv
  fi
}

main() {
  ORIGINAL_ARGS=("$@")
  parse_args "$@"
  check_nodes
  if [[ ! -f "$KIT_ROOT/$SCRIPT" ]]; then
    die "$SCRIPT is not in this checkout"
  fi
  if ((TRAINER_HELP)); then  # the trainer's flags and --set fields, from the trainer
    KIT_GPU_SPEC=none
    prepare_runtime
    exec_in_runtime python "$SCRIPT" --help
  fi
  resolve_gpus
  prepare_runtime
  local args=()
  if ((CPU)); then args+=(--device=cpu); fi
  map_paths
  if [[ "$KIT_RUNTIME" == docker ]]; then
    check_docker_mounts
  fi
  args+=("${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}")
  # train.sh's default: the record's recipe fitted to the GPUs found (the trainer's own default is the 8xH100
  # record), unless the words choose a preset or resume a run, whose checkpoint holds its settings
  if [[ "$SCRIPT" == train_gpt.py ]] && ! given_word --preset "${args[@]+"${args[@]}"}" \
    && ! given_word --resume "${args[@]+"${args[@]}"}"; then
    args=(--preset auto "${args[@]+"${args[@]}"}")
  fi
  run_config "${args[@]+"${args[@]}"}"
  TRAIN_ARGS=("${args[@]+"${args[@]}"}")
  plan_eval
  plan_data
  launcher
  print_settings
  download_data
  launch_env
  if ((EVAL_HELLASWAG)); then  # it does not return
    train_then_eval "${LAUNCH[@]}" "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"
  fi
  exec_in_runtime "${LAUNCH[@]}" "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"
}

main "$@"
