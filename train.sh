#!/usr/bin/env bash
# Trains with train_gpt.py in the kit's Docker image (default) or in a local virtualenv (--local): picks the GPUs
# (or the CPU, --cpu), downloads the FineWeb shards the run needs, then starts torchrun (or one plain python process).
set -euo pipefail

KIT_PROG=train.sh
# shellcheck source=lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
  cat <<'TXT'
Usage: ./train.sh [FLAGS] [-- TRAIN_GPT_FLAGS...]

Runs train_gpt.py in the Docker image built by ./build.sh (or with --local in a virtualenv), under torchrun on
the chosen GPUs, after downloading the FineWeb shards the run needs.

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
  --dry-run                       print the commands instead of running them
  -h, --help                      this text

Training (passed to train_gpt.py):
  --preset {speedrun,a10,tiny}    starting values for every setting (default speedrun)
  --medium                        run train_gpt_medium.py (track 2) instead of train_gpt.py
  --data-dir DIR                  shard directory (default data/fineweb10B; tiny: the built-in corpus)
  --train-seq-len N               tokens per training sequence
  --val-seq-len N                 tokens per validation forward
  --max-batch-span-multiplier X   BOS look-ahead of a step, in batches
  --num-iterations N              optimiser steps
  --adam-lr X                     Adam lr of the embeddings
  --muon-lr X                     Muon lr
  --train-loss-every N            steps between train-loss lines
  --val-loss-every N              steps between validations
  --save-every N                  steps between checkpoints
  --save-every-minutes X          minutes between rolling checkpoints, each replacing the last (default 30; 0: off)
  --run-name NAME                 run id: logs/NAME.txt, checkpoints/NAME/
  --resume [PATH]                 continue from a checkpoint file or run directory (default: the newest)
  --wandb                         log to Weights & Biases (WANDB_API_KEY is passed on by name when set)
  --no-torch-compile              skip torch.compile (train_gpt.py --no-compile)
  -- FLAGS...                     everything after -- goes to train_gpt.py unchanged

Data:
  --shards N                      FineWeb train shards to download (default: what the run reads, plus 10%)

Environment:
  KIT_COMPILE_CACHE               torch.compile cache kept between runs
                                  (default ${XDG_CACHE_HOME:-~/.cache}/nanogpt-speedrun/compile)

Examples:
  ./train.sh                                  # the speedrun on every GPU of this machine
  ./train.sh --gpus 0,1 --preset a10          # two GPUs
  ./train.sh --cpu --preset tiny              # CPU in Docker, built-in corpus
  ./train.sh --local --preset tiny            # CPU, built-in corpus, no Docker
  ./train.sh --nnodes 2 --node-rank 0 --master-addr 10.0.0.1   # on each node, with its own rank
TXT
}

# settings (the wrapper's own) and the flags for train_gpt.py
CPU=0
NUM_GPUS=""
GPU_LIST=""
NNODES=1
NODE_RANK=0
MASTER_ADDR=""
MASTER_PORT=29500
NCCL_P2P_OFF=0
PRESET=speedrun
PRESET_GIVEN=0
SCRIPT=train_gpt.py
DATA_DIR=""
NUM_ITERATIONS=""
TRAIN_SEQ_LEN=""
RUN_NAME=""
RESUME=0
RESUME_PATH=""
DATA_DIR_MAPPED=""
DOWNLOAD_DIR=""
SHARDS=""
TRAIN_ARGS=()
PASSTHROUGH=()

parse_args() {
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --cpu) CPU=1 ;;
      --num-gpus) need_value "$1" "$#" "${2-}"; check_int "$1" "$2" 1; NUM_GPUS=$((10#$2)); shift ;;
      --gpus) need_value "$1" "$#" "${2-}"; check_gpu_list "$1" "$2"; GPU_LIST=$2; shift ;;
      --nnodes) need_value "$1" "$#" "${2-}"; check_int "$1" "$2" 1; NNODES=$((10#$2)); shift ;;
      --node-rank) need_value "$1" "$#" "${2-}"; check_int "$1" "$2"; NODE_RANK=$((10#$2)); shift ;;
      --master-addr) need_value "$1" "$#" "${2-}"; MASTER_ADDR=$2; shift ;;
      --master-port) need_value "$1" "$#" "${2-}"; check_int "$1" "$2" 1; MASTER_PORT=$2; shift ;;
      --nccl-p2p-disable) NCCL_P2P_OFF=1 ;;
      --local) KIT_RUNTIME=local ;;
      --image) need_value "$1" "$#" "${2-}"; KIT_IMAGE=$2; shift ;;
      --no-memlock) KIT_MEMLOCK=0 ;;
      --dry-run) KIT_DRY_RUN=1 ;;
      --preset)
        need_value "$1" "$#" "${2-}"
        case "$2" in
          speedrun | a10 | tiny) PRESET=$2; PRESET_GIVEN=1 ;;
          *) die_usage "--preset must be speedrun, a10 or tiny, got '$2'" ;;
        esac
        shift ;;
      --medium) SCRIPT=train_gpt_medium.py ;;
      --data-dir) need_value "$1" "$#" "${2-}"; DATA_DIR=$2; shift ;;
      --train-seq-len | --val-seq-len | --train-loss-every | --val-loss-every | --save-every)
        need_value "$1" "$#" "${2-}"; check_int "$1" "$2"; TRAIN_ARGS+=("$1=$2")
        [[ "$1" != --train-seq-len ]] || TRAIN_SEQ_LEN=$((10#$2))
        shift ;;
      --num-iterations)
        need_value "$1" "$#" "${2-}"; check_int "$1" "$2" 1; NUM_ITERATIONS=$((10#$2)); TRAIN_ARGS+=("$1=$2"); shift ;;
      --max-batch-span-multiplier | --adam-lr | --muon-lr | --save-every-minutes)
        need_value "$1" "$#" "${2-}"; check_float "$1" "$2"; TRAIN_ARGS+=("$1=$2"); shift ;;
      --run-name) need_value "$1" "$#" "${2-}"; RUN_NAME=$2; TRAIN_ARGS+=("$1=$2"); shift ;;
      --resume)
        RESUME=1
        if (($# > 1)) && [[ "$2" != -* ]]; then
          RESUME_PATH=$2
          shift
        fi ;;
      --wandb) TRAIN_ARGS+=(--wandb) ;;
      --no-torch-compile) TRAIN_ARGS+=(--no-compile) ;;
      --shards) need_value "$1" "$#" "${2-}"; check_int "$1" "$2" 1; SHARDS=$((10#$2)); shift ;;
      --) shift; PASSTHROUGH=("$@"); break ;;
      *) unknown_flag "$1" ;;
    esac
    shift
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
# inside the container, or silently trains on fewer: refused, with the way to a CPU run.
gpu_processes() {
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
# with --cpu (or its long form -- --device cpu), or locally on a machine without GPUs (no nvidia-smi, or it lists
# none) and no --gpus; there --num-gpus N starts N processes. Any other run is on GPUs.
resolve_gpus() {
  local device
  device=$(passthrough_value --device)
  if ((CPU)) && [[ -n "$device" && "$device" != cpu ]]; then
    die_usage "--cpu trains on the CPU, but -- --device $device asks for another device; drop one of them"
  fi
  count_gpus
  if ((CPU)); then
    cpu_processes --cpu
  elif [[ "$device" == cpu ]]; then
    cpu_processes "-- --device cpu"
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

# global_batch_tokens: tokens per optimiser step of the preset, with --train-seq-len / --seqs-per-step applied
global_batch_tokens() {
  local seqs seq_len value
  # the presets' batches (train_gpt.py PRESETS, train_gpt_medium.py MEDIUM); tests/test_wrappers.py checks them
  if [[ "$SCRIPT" == train_gpt_medium.py ]]; then
    seqs=8; seq_len=65536
  else
    case "$PRESET" in
      a10) seqs=32; seq_len=12288 ;;
      *) seqs=8; seq_len=49152 ;;
    esac
  fi
  [[ -z "$TRAIN_SEQ_LEN" ]] || seq_len=$TRAIN_SEQ_LEN
  value=$(passthrough_value --seqs-per-step)
  [[ -z "$value" ]] || seqs=$value
  value=$(passthrough_value --train-seq-len)
  [[ -z "$value" ]] || seq_len=$value
  printf '%s\n' "$((seqs * seq_len))"
}

# shards_for_run: train shards the run reads (data/fineweb.py's shards_needed), or --shards
shards_for_run() {
  if [[ -n "$SHARDS" ]]; then
    printf '%s\n' "$SHARDS"
    return 0
  fi
  local default_steps=1695 steps batch py
  [[ "$SCRIPT" != train_gpt_medium.py ]] || default_steps=5960
  steps=${NUM_ITERATIONS:-$default_steps}
  batch=$(global_batch_tokens)
  py=$(command -v python3 || true)
  if [[ "$KIT_RUNTIME" == local && -x "${KIT_PY:-}" ]]; then py=$KIT_PY; fi
  if [[ -n "$py" ]]; then
    (cd "$KIT_ROOT" && "$py" -c 'import sys; from data.fineweb import shards_needed as n; print(min(103, n(int(sys.argv[1]), int(sys.argv[2]))))' "$steps" "$batch")
  else  # the same formula: ceil(steps x batch x 1.1 / 1e8)
    local n=$(((steps * batch * 11 + 999999999) / 1000000000))
    ((n <= 103)) || n=103
    printf '%s\n' "$n"
  fi
}

# plan_data: where the shards come from (DATA_SOURCE) and whether some must be downloaded first (DOWNLOAD_SHARDS)
plan_data() {
  local dir n i missing=0
  DOWNLOAD_SHARDS=""
  if [[ -z "$DATA_DIR" ]]; then
    if [[ "$PRESET" == tiny ]]; then
      DATA_SOURCE="built-in corpus (data/builtin)"
      return 0
    fi
    dir=$KIT_ROOT/data/fineweb10B
  else
    if [[ "$DATA_DIR" == /* ]]; then dir=$DATA_DIR; else dir=$PWD/$DATA_DIR; fi
    local default_real="" dir_real=""
    default_real=$(cd "$KIT_ROOT/data" 2>/dev/null && pwd -P)/fineweb10B
    [[ ! -d "$dir" ]] || dir_real=$(cd "$dir" && pwd -P)
    if [[ "$dir_real" != "$default_real" ]]; then
      if compgen -G "$dir/*.bin" >/dev/null || [[ " ${PASSTHROUGH[*]-} " == *" --train-files"* ]]; then
        DATA_SOURCE="$DATA_DIR (existing files)"
        return 0
      fi
    fi
  fi
  n=$(shards_for_run)
  [[ -f "$dir/fineweb_val_000000.bin" ]] || missing=1
  for ((i = 1; i <= n; i++)); do
    [[ -f "$(printf '%s/fineweb_train_%06d.bin' "$dir" "$i")" ]] || missing=1
  done
  DATA_SOURCE="${DATA_DIR:-data/fineweb10B} (FineWeb 10B, $n train shards"
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
  say "downloading the FineWeb validation shard and $DOWNLOAD_SHARDS train shards into ${DATA_DIR:-data/fineweb10B}"
  local saved_gpus=$KIT_GPU_SPEC saved_env=("${KIT_ENV[@]+"${KIT_ENV[@]}"}")
  KIT_GPU_SPEC=none
  KIT_ENV=()
  if ((!KIT_DRY_RUN)); then
    mkdir -p "$DOWNLOAD_DIR"   # before Docker would create it, owned by root
  fi
  in_runtime python data/cached_fineweb10B.py "$DOWNLOAD_SHARDS" "--data-dir=${DATA_DIR_MAPPED:-data/fineweb10B}"
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
  local where
  if [[ "$KIT_RUNTIME" == docker ]]; then where="docker image $KIT_IMAGE"; else where="local virtualenv $(venv_dir)"; fi
  say "preset:    $PRESET$([[ "$SCRIPT" == train_gpt.py ]] || printf ' (%s)' "$SCRIPT")"
  say "GPUs:      $NPROC process(es) per node, devices: ${KIT_GPU_SPEC/#none/none (CPU)}"
  say "nodes:     $NNODES (this is rank $NODE_RANK$([[ -z "$MASTER_ADDR" ]] || printf ', master %s:%s' "$MASTER_ADDR" "$MASTER_PORT"))"
  say "runtime:   $where"
  say "data:      $DATA_SOURCE"
  say "run name:  ${RUN_NAME:-$([[ $RESUME == 1 ]] && printf 'from the checkpoint' || printf 'generated by %s' "$SCRIPT")}"
  say "compile cache: $(compile_cache_summary)"
  if ((NCCL_P2P_OFF)); then say "NCCL_P2P_DISABLE=1"; fi
}

main() {
  parse_args "$@"
  check_nodes
  if [[ ! -f "$KIT_ROOT/$SCRIPT" ]]; then
    die "$SCRIPT is not in this checkout"
  fi
  resolve_gpus
  if [[ "$KIT_RUNTIME" == docker ]]; then
    check_image
    check_gpu_runtime
  else
    ensure_venv
  fi
  local args=()
  if ((PRESET_GIVEN)); then args+=("--preset=$PRESET"); fi
  if ((CPU)); then args+=(--device=cpu); fi
  if [[ -n "$DATA_DIR" ]]; then
    kit_map_path "$DATA_DIR" --data-dir create
    DATA_DIR_MAPPED=$KIT_MAPPED
    args+=("--data-dir=$DATA_DIR_MAPPED")
  fi
  if ((RESUME)); then
    if [[ -n "$RESUME_PATH" ]]; then
      kit_map_path "$RESUME_PATH" --resume
      args+=("--resume=$KIT_MAPPED")
    else
      args+=(--resume)
    fi
  fi
  if [[ "$KIT_RUNTIME" == docker ]]; then
    check_docker_mounts
  fi
  plan_data
  launcher
  print_settings
  download_data
  exec_in_runtime "${LAUNCH[@]}" "${args[@]+"${args[@]}"}" "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}" \
    "${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}"
}

main "$@"
