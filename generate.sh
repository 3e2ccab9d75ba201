#!/usr/bin/env bash
# Samples text from a trained checkpoint with generate.py, in the kit's Docker image (default) or in a local
# virtualenv (--local), exactly as train.sh runs train_gpt.py.
set -euo pipefail

KIT_PROG=generate.sh
# shellcheck source=lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
  cat <<'TXT'
Usage: ./generate.sh [FLAGS] [-- GENERATE_FLAGS...]

Runs generate.py in the Docker image built by ./build.sh (or with --local in a virtualenv).

  --checkpoint PATH     checkpoint file or run directory (default checkpoints/latest: the newest of any run)
  --run NAME            the newest checkpoint of run NAME (checkpoints/NAME/)
  --prompt TEXT         text to continue ('-': read it from stdin)
  --max-tokens N        tokens to generate per sample
  --temperature X       sampling temperature
  --top-k N             sample among the N most likely tokens
  --top-p X             nucleus sampling threshold
  --num-samples N       samples to draw
  --seed N              random seed
  --device DEV          auto, cuda, cuda:N or cpu
  --cpu                 sample on the CPU (--device cpu; Docker: no GPUs, no NVIDIA runtime)
  --local               run in a local virtualenv ($KIT_VENV, default .venv; created when missing)
  --image IMAGE         Docker image (default nanogpt-speedrun:latest, or $KIT_IMAGE)
  --no-memlock          no --ulimit memlock=-1 on a Docker GPU run (rootless Docker, some sandboxes)
  --dry-run             print the command instead of running it
  -h, --help            this text
  -- FLAGS...           everything after -- goes to generate.py unchanged (e.g. --prompt-file F, --no-stop-at-eot)

Environment:
  KIT_COMPILE_CACHE     torch.compile cache kept between runs, as in ./train.sh (used by -- --compile)

Examples:
  ./generate.sh --checkpoint checkpoints/my-run --prompt "The meaning of life is" --max-tokens 100
  ./generate.sh --cpu --prompt "def"       # the newest checkpoint, on the CPU
TXT
}

CHECKPOINT=""
CPU=0
DEVICE=""
NO_GPU_REASON=""  # why no GPU is used when none was asked for: none could be found
GEN_ARGS=()
PASSTHROUGH=()

parse_args() {
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --checkpoint) need_value "$1" "$#" "${2-}"; CHECKPOINT=$2; shift ;;
      --run) need_value "$1" "$#" "${2-}"; GEN_ARGS+=("$1=$2"); shift ;;
      --prompt)
        (($# > 1)) || die_usage "$1 needs a value"
        [[ "$2" != - ]] || KIT_STDIN=1   # the prompt comes from stdin: docker must pass it on
        GEN_ARGS+=("$1=$2")
        shift ;;
      --max-tokens | --top-k | --seed)
        need_value "$1" "$#" "${2-}"; check_int "$1" "$2"; GEN_ARGS+=("$1=$2"); shift ;;
      --num-samples)
        need_value "$1" "$#" "${2-}"; check_int "$1" "$2" 1; GEN_ARGS+=("$1=$2"); shift ;;
      --temperature | --top-p)
        need_value "$1" "$#" "${2-}"; check_float "$1" "$2"; GEN_ARGS+=("$1=$2"); shift ;;
      --device) need_value "$1" "$#" "${2-}"; DEVICE=$2; GEN_ARGS+=("$1=$2"); shift ;;
      --cpu) CPU=1 ;;
      --local) KIT_RUNTIME=local ;;
      --image) need_value "$1" "$#" "${2-}"; KIT_IMAGE=$2; shift ;;
      --no-memlock) KIT_MEMLOCK=0 ;;
      --dry-run) KIT_DRY_RUN=1 ;;
      --) shift; PASSTHROUGH=("$@"); break ;;
      *) unknown_flag "$1" ;;
    esac
    shift
  done
}

# resolve_device: --cpu is --device cpu for generate.py and no GPU for Docker; so is --device cpu (before or after --)
resolve_device() {
  local after d
  after=$(passthrough_value --device)
  if ((CPU)); then
    for d in "$DEVICE" "$after"; do
      if [[ -n "$d" && "$d" != cpu ]]; then
        die_usage "--cpu samples on the CPU, but --device $d asks for another device; drop one of them"
      fi
    done
    [[ "$DEVICE" == cpu ]] || GEN_ARGS+=(--device=cpu)
    KIT_GPU_SPEC=none
  elif [[ "${after:-$DEVICE}" == cpu ]]; then  # generate.py reads the last --device: the one after -- wins
    KIT_GPU_SPEC=none
  elif [[ -z "${after:-$DEVICE}" ]]; then  # none asked for, and none found: sampling is cheap on the CPU, and
    local count                             # Docker would have no GPU to give
    count=$(visible_gpu_count)
    if [[ -z "$count" ]]; then
      NO_GPU_REASON=$(no_gpu_count_reason)
    elif ((count == 0)); then
      NO_GPU_REASON="nvidia-smi lists none"
    fi
    [[ -z "$NO_GPU_REASON" ]] || KIT_GPU_SPEC=none
  fi
}

# print_settings: what the wrapper chose; generate.py's first line then names the checkpoint it loaded (run, step)
# and every sampling setting
print_settings() {
  local where
  if [[ "$KIT_RUNTIME" == docker ]]; then where="docker image $KIT_IMAGE"; else where="local virtualenv $(venv_dir)"; fi
  local gpus=${KIT_GPU_SPEC/#none/none (CPU)}
  [[ -z "$NO_GPU_REASON" ]] || gpus="none found ($NO_GPU_REASON): sampling on the CPU"
  say "runtime:    $where; GPUs: $gpus"
  local default="the default of generate.py (the newest of the --run, else of any run)"
  say "checkpoint: ${CHECKPOINT:-$default}"
}

main() {
  parse_args "$@"
  if [[ ! -f "$KIT_ROOT/generate.py" ]]; then
    if ((KIT_DRY_RUN)); then
      warn "generate.py is not in this checkout"
    else
      die "generate.py is not in this checkout"
    fi
  fi
  resolve_device
  if [[ "$KIT_RUNTIME" == docker ]]; then
    check_image
    check_gpu_runtime
  else
    ensure_venv
  fi
  local checkpoint=()  # none: generate.py's default, the newest checkpoint (of --run NAME's run, if given)
  if [[ -n "$CHECKPOINT" ]]; then
    kit_map_path "$CHECKPOINT" --checkpoint
    checkpoint=("--checkpoint=$KIT_MAPPED")
  fi
  if [[ "$KIT_RUNTIME" == docker ]]; then
    check_docker_mounts
  fi
  print_settings >&2  # stderr: stdout is the text
  exec_in_runtime python generate.py "${checkpoint[@]+"${checkpoint[@]}"}" "${GEN_ARGS[@]+"${GEN_ARGS[@]}"}" \
    "${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}"
}

main "$@"
