#!/usr/bin/env bash
# Runs the kit's test suite on CPU, from nothing: creates (or reuses) a virtualenv with the pinned CPU test
# environment, lints, then runs pytest. Extra arguments go to pytest, e.g. ./test.sh -k attention -x
set -euo pipefail

usage() {
  cat <<'TXT'
Usage: ./test.sh [--fast] [PYTEST_ARGS...]
       ./test.sh --docker

--fast leaves out the tests marked slow (real training runs, subprocesses, torchrun, compiles): the edit-test loop,
under two minutes on 2 cores. Without it, the whole suite (what CI runs): about 6 to 7 minutes.

--docker runs only tests/docker/e2e.sh, the Docker path against a real engine: as root it installs Debian's docker.io,
starts its own dockerd, builds a base image without a registry, then ./build.sh, ./train.sh --cpu and
./generate.sh --cpu (about 4 minutes on 2 cores, from nothing). Where no engine can be started it says so in one
line (a failure when CI is set). CI runs it after the suite.

Creates .venv-test (or the directory in $TEST_VENV) with torch 2.13.0, requirements-dev.txt and the
offline GPT-2 vocabulary (openai-whisper, installed without its dependencies),
runs ruff on the Python sources, then pytest on tests/. Needs python3 (3.10+) with venv and pip.

Environment:
  TEST_VENV     virtualenv directory (default: .venv-test)
  TORCH_SPEC    torch requirement to install (default: requirements-torch.txt's pin, torch==2.13.0)
  PYTHON        interpreter used to create the virtualenv (default: python3)
TXT
}

main() {
  if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    return 0
  fi
  if [[ "${1:-}" == "--docker" ]]; then
    shift
    exec "$(dirname "${BASH_SOURCE[0]}")/tests/docker/e2e.sh" "$@"
  fi
  local select=()
  if [[ "${1:-}" == "--fast" ]]; then
    select=(-m "not slow")
    shift
  fi
  local root venv torch_spec python
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  venv=${TEST_VENV:-$root/.venv-test}
  python=${PYTHON:-python3}
  cd "$root"
  torch_spec=${TORCH_SPEC:-$(grep -v '^[[:space:]]*#' requirements-torch.txt | grep -m1 .)}

  if [[ ! -x "$venv/bin/python" ]]; then
    echo "test.sh: creating virtualenv $venv"
    "$python" -m venv "$venv"
  fi
  local stamp="$venv/.installed"
  local want
  want="$torch_spec $(cat requirements.txt requirements-dev.txt requirements-vocab.txt | sha256sum | cut -c1-16)"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "test.sh: installing $torch_spec and requirements-dev.txt"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "$torch_spec"
    "$venv/bin/python" -m pip install --quiet -r requirements-dev.txt
    # the offline GPT-2 vocabulary (whisper/assets/gpt2.tiktoken); its own dependencies are not needed
    "$venv/bin/python" -m pip install --quiet --no-deps -r requirements-vocab.txt
    echo "$want" >"$stamp"
  fi

  echo "test.sh: ruff"
  "$venv/bin/python" -m ruff check --quiet .
  echo "test.sh: pytest"
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=offline WANDB_SILENT=true \
    "$venv/bin/python" -m pytest tests "${select[@]+"${select[@]}"}" "$@"
}

main "$@"
