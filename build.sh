#!/usr/bin/env bash
# Builds the kit's Docker image: on the local cvlization-torch-gpu image when there is one, else on a pinned public
# PyTorch CUDA image. A CA bundle and pip's index URLs reach the build as BuildKit secrets, never stored in the image.
set -euo pipefail

KIT_PROG=build.sh
# shellcheck source=lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# The public base image, pinned (PyTorch with CUDA and cuDNN runtime libraries): the torch of the CPU test suite, and
# CUDA 12.8, which covers Hopper and Blackwell (driver 570 or newer). Keep in step with the Dockerfile.
PINNED_BASE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
LOCAL_BASE=cvlization-torch-gpu

usage() {
  cat <<TXT
Usage: ./build.sh [FLAGS]

Builds the Docker image that train.sh and generate.sh run in.

  --base IMAGE        base image (default: $LOCAL_BASE when it exists locally, else $PINNED_BASE)
  --tag TAG           name of the image to build (default $KIT_IMAGE_DEFAULT)
  --ca-bundle FILE    PEM certificates the build trusts besides its own (pip, apt, downloads), e.g. the CA of a
                      TLS-intercepting proxy: a BuildKit secret, in no layer of the image
  --no-cache          build every layer again
  --dry-run           print the docker build command instead of running it
  -h, --help          this text

Environment:
  PIP_INDEX_URL, PIP_EXTRA_INDEX_URL
                      pip's indexes inside the build (a mirror, a private index with a token in the URL): passed on
                      by name as BuildKit secrets, so neither the image nor the command line holds them
  DOCKER_BUILDKIT     1 or 0 picks the builder; by default BuildKit where docker has it (the buildx plugin, or a
                      client older than 23 such as Debian's docker.io), else the legacy builder, which cannot take
                      secrets

Example (behind a proxy that re-signs TLS):
  PIP_INDEX_URL=https://mirror.example/simple ./build.sh --ca-bundle /etc/ssl/certs/ca-certificates.crt
TXT
}

BASE=""
TAG=$KIT_IMAGE_DEFAULT
NO_CACHE=0
CA_BUNDLE=""

parse_args() {
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --base) need_value "$1" "$#" "${2-}"; BASE=$2; shift ;;
      --tag) need_value "$1" "$#" "${2-}"; TAG=$2; shift ;;
      --ca-bundle) need_value "$1" "$#" "${2-}"; CA_BUNDLE=$2; shift ;;
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

# build_secrets: fills SECRETS with the --secret options for the CA bundle and pip's index URLs (the Dockerfile's
# RUN steps mount them under /run/secrets for that step only). Docker reads the URLs from this environment by name.
build_secrets() {
  SECRETS=()
  if [[ -n "$CA_BUNDLE" ]]; then
    local ca=$CA_BUNDLE
    [[ "$ca" == /* ]] || ca=$PWD/$ca
    [[ -f "$ca" && -r "$ca" ]] || die_usage "--ca-bundle $CA_BUNDLE is not a readable file"
    if [[ "$ca" == *[,\"]* || "$ca" == *$'\n'* ]]; then
      die "--ca-bundle $CA_BUNDLE: the path holds a comma, a double quote or a newline, which docker build --secret cannot take; copy the file elsewhere" 2
    fi
    SECRETS+=(--secret "id=ca_bundle,src=$ca")
  fi
  local var
  for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
    if [[ -n "${!var-}" ]]; then
      SECRETS+=(--secret "id=$(tr '[:upper:]' '[:lower:]' <<<"$var"),env=$var")
    fi
  done
}

# choose_builder: BUILDER, buildkit or legacy, and BUILDER_WHY. The Dockerfile's secret mounts need BuildKit: the
# buildx plugin brings it, and docker clients older than 23 have it built in; a newer client without buildx has only
# the legacy builder. DOCKER_BUILDKIT=1 or 0 decides instead.
choose_builder() {
  local version
  case "${DOCKER_BUILDKIT-}" in
    1 | true) BUILDER=buildkit; BUILDER_WHY="DOCKER_BUILDKIT=$DOCKER_BUILDKIT" ;;
    0 | false) BUILDER=legacy; BUILDER_WHY="DOCKER_BUILDKIT=$DOCKER_BUILDKIT" ;;
    *)
      version=$(docker version --format '{{.Client.Version}}' 2>/dev/null || true)
      if docker buildx version >/dev/null 2>&1; then
        BUILDER=buildkit; BUILDER_WHY="docker buildx"
      elif [[ "$version" =~ ^([0-9]+)\. ]] && ((10#${BASH_REMATCH[1]} < 23)); then
        BUILDER=buildkit; BUILDER_WHY="built into docker $version"
      else
        BUILDER=legacy; BUILDER_WHY="docker ${version:-(version unknown)} without the buildx plugin"
      fi ;;
  esac
  say "builder: $BUILDER ($BUILDER_WHY)"
}

# legacy_dockerfile: the Dockerfile without its --mount=type=secret options, for the legacy builder (which knows no
# RUN --mount); the steps then see no secrets, and none were given
legacy_dockerfile() {
  sed -E 's/--mount=type=secret[^[:space:]]*[[:space:]]+//g' "$KIT_ROOT/Dockerfile"
}

build() {
  local cmd=(docker build --build-arg "BASE_IMAGE=$BASE" -t "$TAG")
  if ((NO_CACHE)); then cmd+=(--no-cache); fi
  local rc=0
  if [[ "$BUILDER" == buildkit ]]; then
    run_cmd env DOCKER_BUILDKIT=1 "${cmd[@]}" -f "$KIT_ROOT/Dockerfile" "${SECRETS[@]+"${SECRETS[@]}"}" "$KIT_ROOT" \
      || rc=$?
  else
    if ((${#SECRETS[@]})); then
      die "--ca-bundle, PIP_INDEX_URL and PIP_EXTRA_INDEX_URL reach the build as BuildKit secrets, but this docker has only the legacy builder ($BUILDER_WHY); install the buildx plugin (docker-buildx-plugin, or docker-buildx in your distribution) and run again" 2
    fi
    say "the legacy builder reads the Dockerfile from stdin, without its secret mounts"
    legacy_dockerfile | run_cmd env DOCKER_BUILDKIT=0 "${cmd[@]}" -f - "$KIT_ROOT" || rc=$?
  fi
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
  build_secrets
  choose_base
  choose_builder
  build
}

main "$@"
