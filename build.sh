#!/usr/bin/env bash
# Builds the kit's Docker image: on the local cvlization-torch-gpu image when there is one, else on a pinned public
# PyTorch CUDA image.
set -euo pipefail

KIT_PROG=build.sh
# shellcheck source=lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# The public base image, pinned (PyTorch with CUDA and cuDNN runtime libraries). Keep in step with the Dockerfile.
PINNED_BASE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
LOCAL_BASE=cvlization-torch-gpu

usage() {
  cat <<TXT
Usage: ./build.sh [FLAGS]

Builds the Docker image that train.sh and generate.sh run in.

  --base IMAGE    base image (default: $LOCAL_BASE when it exists locally, else $PINNED_BASE)
  --tag TAG       name of the image to build (default $KIT_IMAGE_DEFAULT)
  --no-cache      build every layer again
  --dry-run       print the docker build command instead of running it
  -h, --help      this text
TXT
}

BASE=""
TAG=$KIT_IMAGE_DEFAULT
NO_CACHE=0

parse_args() {
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --base) need_value "$1" "$#" "${2-}"; BASE=$2; shift ;;
      --tag) need_value "$1" "$#" "${2-}"; TAG=$2; shift ;;
      --no-cache) NO_CACHE=1 ;;
      --dry-run) KIT_DRY_RUN=1 ;;
      *) unknown_flag "$1" ;;
    esac
    shift
  done
}

choose_base() {
  if [[ -n "$BASE" ]]; then
    say "base image: $BASE (from --base)"
  elif docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    BASE=$LOCAL_BASE
    say "base image: $BASE (found locally)"
  else
    BASE=$PINNED_BASE
    say "base image: $BASE (pinned; no local $LOCAL_BASE image)"
  fi
}

build() {
  local cmd=(docker build --build-arg "BASE_IMAGE=$BASE" -t "$TAG" -f "$KIT_ROOT/Dockerfile")
  if ((NO_CACHE)); then cmd+=(--no-cache); fi
  cmd+=("$KIT_ROOT")
  local rc=0
  run_cmd "${cmd[@]}" || rc=$?
  if ((rc)); then
    die "docker build failed (exit $rc); see docker's message above" "$rc"
  fi
  if ((!KIT_DRY_RUN)); then
    say "built $TAG; run ./train.sh --help next"
  fi
}

main() {
  parse_args "$@"
  command -v docker >/dev/null 2>&1 || die "docker is not installed (train.sh --local runs without it)"
  choose_base
  build
}

main "$@"
