#!/usr/bin/env bash
# The Docker path end to end, against a real engine, from a machine with no engine and no container registry:
#
#   1. engine    installs Debian's docker.io (apt-get) and starts its own dockerd in the background, its data in a
#                temporary directory; it is stopped by its PID at the end, whatever happens
#   2. base      builds a local base image without any registry: `debootstrap --variant=minbase bookworm` imported
#                with `docker import`, then python3 in a venv on PATH and the kit's torch pin (requirements-torch.txt)
#                as this machine's pip resolves it (`pip download`, put in the build context). No C compiler: the kit's Dockerfile has to
#                add one. Tagged cvlization-torch-gpu, the local base ./build.sh looks for.
#   3. build     the kit's own ./build.sh, with this machine's CA bundle and a marked PIP_EXTRA_INDEX_URL as secrets
#   4. train     ./train.sh --cpu --preset tiny --num-iterations 20
#   5. generate  ./generate.sh --cpu
#   6. signals   terminal flags with and without a terminal, SIGTERM to each wrapper, a GPU run on this engine
#   7. readme    the README's interactive `docker run` line, with a command
#
# Every wrapper runs as a non-root user created for the test, in a copy of the checkout, with stdin not a terminal
# (a pseudo-terminal from `script` where a terminal is the point). One PASS or FAIL line per check, then each stage's
# time and the count. Needs root (apt-get, dockerd, useradd). Where no engine can be started here it says so in one
# line and exits 0, unless CI is set: then that is a failure.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LOCAL_BASE=cvlization-torch-gpu
IMAGE=nanogpt-speedrun:latest
STOP_WITHIN=10        # seconds a container may take to end after its wrapper gets SIGTERM (training: plus 2 steps)
TORCH_SPEC=$(grep -v '^[[:space:]]*#' "$ROOT/requirements-torch.txt" | grep -m1 .)  # the kit's one torch pin

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  cat <<'TXT'
Usage: tests/docker/e2e.sh        (or ./test.sh --docker)

Environment:
  CI          when set, a machine where no engine can be started fails the test instead of skipping it
  E2E_KEEP=1  keep the temporary directory (logs, the checkout copy) for a look afterwards
TXT
}

PASSED=0
FAILED=0
TIMES=()
WORK=""
DOCKERD_PID=""
E2E_USER=""
DOCKER0_BEFORE=1
BACKGROUND=()
CLEANED=0
FIREWALLS=()
FIREWALL_LEFT=""
IP_FORWARD=""

say() { printf 'e2e: %s\n' "$1"; }
pass() { printf 'PASS: %s\n' "$1"; PASSED=$((PASSED + 1)); }
fail() {
  printf 'FAIL: %s%s\n' "$1" "${2:+ ($2)}"
  FAILED=$((FAILED + 1))
}

# check NAME CMD...: PASS when CMD succeeds
check() {
  local name=$1
  shift
  if "$@"; then pass "$name"; else fail "$name"; fi
}

# show_log FILE: the end of a log, for a failed step
show_log() {
  printf -- '--- last lines of %s\n' "${1#"$WORK"/}"
  tail -n "${2:-25}" "$1" | sed 's/^/    /'
  printf -- '---\n'
}

# cannot_run REASON: no engine can be started here: a skip outside CI, a failure under CI
cannot_run() {
  if [[ -n "${CI-}" ]]; then
    printf 'FAIL: the Docker end-to-end test cannot run here: %s (CI=%s: it must)\n' "$1" "$CI"
    exit 1
  fi
  say "skipped: $1 (the Docker end-to-end test needs a machine where it can start an engine)"
  exit 0
}

# run_stage NAME FUNCTION: runs a stage and keeps its time; a stage that cannot go on returns non-zero
run_stage() {
  local name=$1 fn=$2 start=$SECONDS rc=0
  say "== $name"
  "$fn" || rc=$?
  TIMES+=("$name $((SECONDS - start))s")
  return "$rc"
}

# as_user CMD...: CMD as the test's user in the checkout copy, with a clean environment and stdin not a terminal
as_user() {
  (cd "$KIT" && runuser -u "$E2E_USER" -- env -i HOME="$UHOME" PATH="$USER_PATH" DOCKER_HOST="$DOCKER_HOST" \
    LANG=C.UTF-8 "$@" </dev/null)
}

# --- 1. engine -------------------------------------------------------------------------------------------------------

preflight() {
  ((EUID == 0)) || cannot_run "not root (installing and starting dockerd, and adding a user, need root)"
  if ! command -v runuser >/dev/null || ! command -v useradd >/dev/null; then cannot_run "no runuser or useradd"; fi
  command -v script >/dev/null || cannot_run "no script (util-linux) for a pseudo-terminal"
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    command -v apt-get >/dev/null || cannot_run "no dockerd or debootstrap, and no apt-get to install them"
  fi
  local other
  other=$(pgrep -x dockerd | head -n 1 || true)
  [[ -z "$other" ]] || cannot_run "a Docker engine already runs here (dockerd, PID $other); this test starts its own"
  python3 -m pip --version >/dev/null 2>&1 || cannot_run "no python3 with pip to fetch $TORCH_SPEC"
}

install_engine() {
  if command -v dockerd >/dev/null && command -v debootstrap >/dev/null; then
    say "docker.io and debootstrap are installed already"
    return 0
  fi
  say "apt-get install docker.io debootstrap"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap; } \
      >"$WORK/logs/apt.log" 2>&1; then
    show_log "$WORK/logs/apt.log"
    return 1
  fi
}

# firewall_save: the packet filter and IP forwarding as found; dockerd adds its chains, sets FORWARD to DROP and
# turns forwarding on, and firewall_restore puts them back
firewall_save() {
  local cmd
  for cmd in iptables ip6tables; do
    if command -v "$cmd-save" >/dev/null && "$cmd-save" >"$WORK/$cmd.before" 2>/dev/null; then
      FIREWALLS+=("$cmd")
    fi
  done
  IP_FORWARD=$(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null || true)
}

# rules_of: an iptables-save dump without comments and packet counters, and without the tables that hold nothing
# (only built-in chains that accept): those are the same as no table
rules_of() {
  awk '/^#/ { next }
       /^\*/ { table = $0; body = ""; keep = 0; next }
       /^COMMIT/ { if (keep) printf "%s\n%s", table, body; next }
       { sub(/\[[0-9]+:[0-9]+\]/, "[0:0]"); body = body $0 "\n"; if ($0 !~ /^:[A-Z]+ ACCEPT /) keep = 1 }'
}

firewall_restore() {
  local cmd table chain now
  for cmd in "${FIREWALLS[@]+"${FIREWALLS[@]}"}"; do
    now=$("$cmd-save" 2>/dev/null || true)
    # a table the snapshot lacks (none existed yet) is emptied, its chains back to ACCEPT: iptables-restore leaves
    # such a table alone
    for table in filter nat mangle raw; do
      grep -q "^\*$table\$" "$WORK/$cmd.before" && continue
      grep -q "^\*$table\$" <<<"$now" || continue
      "$cmd" -t "$table" -F 2>/dev/null || continue
      "$cmd" -t "$table" -X 2>/dev/null || true
      while read -r chain; do
        "$cmd" -t "$table" -P "$chain" ACCEPT 2>/dev/null || true
      done < <("$cmd" -t "$table" -S 2>/dev/null | awk '$1 == "-P" { print $2 }')
    done
    "$cmd-restore" <"$WORK/$cmd.before" 2>/dev/null || true
    if [[ "$(rules_of <"$WORK/$cmd.before")" != "$("$cmd-save" 2>/dev/null | rules_of)" ]]; then
      FIREWALL_LEFT+=" $cmd-rules"
    fi
  done
  FIREWALLS=()
  if [[ -n "$IP_FORWARD" ]]; then echo "$IP_FORWARD" >/proc/sys/net/ipv4/ip_forward 2>/dev/null || true; fi
}

# start_dockerd: the engine, in the background, everything of it under WORK; the socket's group is the test user's
start_dockerd() {
  [[ -e /sys/class/net/docker0 ]] || DOCKER0_BEFORE=0
  firewall_save
  echo '{}' >"$WORK/daemon.json"
  dockerd --config-file "$WORK/daemon.json" --data-root "$WORK/docker" --exec-root "$WORK/exec" \
    --pidfile "$WORK/dockerd.pid" --host "unix://$WORK/docker.sock" --group "$E2E_USER" \
    >"$WORK/logs/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  export DOCKER_HOST=unix://$WORK/docker.sock
  local i
  for ((i = 0; i < 60; i++)); do
    if docker version >/dev/null 2>&1; then return 0; fi
    kill -0 "$DOCKERD_PID" 2>/dev/null || break
    sleep 1
  done
  show_log "$WORK/logs/dockerd.log"
  return 1
}

stage_engine() {
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/kit-e2e.XXXXXX")
  chmod 755 "$WORK"
  mkdir -p "$WORK/logs" "$WORK/bin"
  install_engine || { fail "Debian's docker.io installed"; return 1; }
  # the client of the engine installed here: another docker client earlier on PATH may have no BuildKit (a client
  # of 23 or newer without the buildx plugin). grep reads dpkg's whole list: stopping early (-m 1) would kill dpkg
  # with SIGPIPE, which pipefail reports as a failure
  local client
  client=$(dpkg -L docker.io 2>/dev/null | grep -E '/bin/docker$') || true
  client=${client%%$'\n'*}
  [[ -x "$client" ]] || client=$(command -v docker)
  ln -s "$client" "$WORK/bin/docker"
  export PATH="$WORK/bin:$PATH"
  say "docker client: $client ($(docker version --format '{{.Client.Version}}' 2>/dev/null || true))"  # no daemon yet
  E2E_USER=kite2e$$
  UHOME=$WORK/home
  useradd --no-create-home --home-dir "$UHOME" --shell /bin/bash --user-group "$E2E_USER"
  mkdir -p "$UHOME"
  chown "$E2E_USER:$E2E_USER" "$UHOME"
  USER_PATH=$WORK/bin:/usr/local/bin:/usr/bin:/bin
  if start_dockerd; then
    pass "dockerd started by this test (engine $(docker version --format '{{.Server.Version}}'), PID $DOCKERD_PID)"
  else
    fail "dockerd started by this test"
    return 1
  fi
  copy_checkout
}

# copy_checkout: the checkout's files (tracked and untracked, not ignored) in KIT, owned by the test user
copy_checkout() {
  KIT=$WORK/kit
  mkdir -p "$KIT"
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
      [[ -e "$f" ]] && printf '%s\0' "$f"
    done | tar --null -T - -cf -) | tar -xf - -C "$KIT"
  else
    tar -C "$ROOT" --exclude-vcs --exclude='.venv*' --exclude=checkpoints --exclude=logs -cf - . | tar -xf - -C "$KIT"
  fi
  chown -R "$E2E_USER:$E2E_USER" "$KIT"
}

# --- 2. base image ---------------------------------------------------------------------------------------------------

stage_base() {
  local rootfs=$WORK/rootfs ctx=$WORK/base-context pyver
  say "debootstrap --variant=minbase bookworm"
  if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
      >"$WORK/logs/debootstrap.log" 2>&1; then
    show_log "$WORK/logs/debootstrap.log"
    fail "base image made without a registry" "debootstrap failed"
    return 1
  fi
  tar -C "$rootfs" -c . | docker import - kit-e2e-bookworm:minbase >/dev/null
  rm -rf "$rootfs"
  pyver=$(docker run --rm kit-e2e-bookworm:minbase python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  mkdir -p "$ctx/wheels"
  say "pip download $TORCH_SPEC (Python $pyver)"
  if ! python3 -m pip download --quiet --only-binary=:all: --python-version "$pyver" -d "$ctx/wheels" "$TORCH_SPEC" \
      >"$WORK/logs/pip-download.log" 2>&1; then
    show_log "$WORK/logs/pip-download.log"
    fail "base image made without a registry" "pip download $TORCH_SPEC failed"
    return 1
  fi
  cat >"$ctx/Dockerfile" <<EOF
FROM kit-e2e-bookworm:minbase
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:\$PATH
RUN --mount=type=bind,source=wheels,target=/wheels \\
    pip install --no-cache-dir --no-index --find-links /wheels $TORCH_SPEC
EOF
  if ! DOCKER_BUILDKIT=1 docker build -t "$LOCAL_BASE" "$ctx" >"$WORK/logs/base-build.log" 2>&1; then
    show_log "$WORK/logs/base-build.log"
    fail "base image made without a registry" "docker build failed"
    return 1
  fi
  rm -rf "$ctx"
  local torch cc
  torch=$(docker run --rm "$LOCAL_BASE" python -c 'import torch; print(torch.__version__)' 2>/dev/null)
  cc=$(docker run --rm "$LOCAL_BASE" sh -c 'command -v cc gcc g++ || true')
  if [[ -z "$cc" && "$torch" == "${TORCH_SPEC#torch==}"* ]]; then
    pass "base image $LOCAL_BASE made without a registry (debootstrap + docker import, torch $torch, no C compiler)"
  else
    fail "base image $LOCAL_BASE made without a registry" "torch '$torch', compilers '$cc'"
    return 1
  fi
  BASE_TORCH=$torch
}

# --- 3. the kit's build ----------------------------------------------------------------------------------------------

stage_build() {
  local log=$WORK/logs/build.log marker ca=() rc=0
  marker=kit-e2e-secret-$RANDOM$RANDOM
  # this machine's CA bundle (behind a TLS-intercepting proxy the build needs it) and an extra index URL that pip
  # reports (it does not exist) but that must end up nowhere in the image
  local bundle=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
  if [[ -f "$bundle" ]]; then
    install -m 644 "$bundle" "$WORK/ca-bundle.pem"
    ca=(--ca-bundle "$WORK/ca-bundle.pem")
  fi
  as_user env PIP_EXTRA_INDEX_URL="file:///nonexistent/$marker/simple" ./build.sh "${ca[@]}" >"$log" 2>&1 || rc=$?
  if ((rc)); then
    show_log "$log" 40
    fail "./build.sh builds the image" "exit $rc"
    return 1
  fi
  pass "./build.sh builds $IMAGE as a non-root user (with ${ca[*]:-no CA bundle} and PIP_EXTRA_INDEX_URL as secrets)"
  check "build.sh picked the local base ($LOCAL_BASE)" grep -q "base image: $LOCAL_BASE (found locally)" "$log"
  local torch
  torch=$(docker run --rm "$IMAGE" python -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
  check "the image's torch is the local base's ($BASE_TORCH)" test "$torch" == "$BASE_TORCH"
  if grep -q 'installing gcc' "$log" && grep -q 'torch.compile on the CPU: ok' "$log" \
      && docker run --rm "$IMAGE" sh -c 'cc --version && c++ --version' >/dev/null 2>&1; then
    pass "the build added a C/C++ compiler the base lacked and compiled with torch.compile: $(grep -o 'C compiler .*' "$log" | head -n 1)"
  else
    fail "the build added a C compiler and checked torch.compile"
    show_log "$log" 40
  fi
  local tik
  tik=$(grep -c "tiktoken's gpt2 files" "$log" || true)
  if ((tik == 1)) && ! grep -q Traceback "$log"; then
    pass "the tiktoken step printed one line, no traceback: $(grep -o "tiktoken's gpt2 files.*" "$log" | head -n 1)"
  else
    fail "the tiktoken step printed one line, no traceback" "$tik tiktoken lines"
  fi
  if grep -q "$marker" "$log"; then
    pass "PIP_EXTRA_INDEX_URL reached pip inside the build"
  else
    fail "PIP_EXTRA_INDEX_URL reached pip inside the build"
  fi
  local found
  found=$( (docker history --no-trunc "$IMAGE"; docker image inspect "$IMAGE"
    docker run --rm --entrypoint sh "$IMAGE" -c \
      "ls /run/secrets 2>/dev/null; grep -rlsF '$marker' / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev") \
    | grep -F -e "$marker" -e ca_bundle -e pip_extra_index_url || true)
  check "no build secret in the image (history, config, files, /run/secrets)" test -z "$found"
}

# --- 4. train, 5. generate -------------------------------------------------------------------------------------------

stage_train() {
  local log=$WORK/logs/train.log rc=0
  as_user ./train.sh --cpu --preset tiny --num-iterations 20 --run-name e2e >"$log" 2>&1 || rc=$?
  if ((rc)); then
    show_log "$log" 40
    fail "./train.sh --cpu --preset tiny --num-iterations 20" "exit $rc"
    return 1
  fi
  pass "./train.sh --cpu --preset tiny --num-iterations 20 (stdin not a terminal)"
  local line
  line=$(grep -m 1 -E '^step:20/20 val_loss:' "$KIT/logs/e2e.txt" 2>/dev/null || true)
  if [[ -n "$line" ]]; then pass "a val_loss line: $line"; else fail "a val_loss line in logs/e2e.txt"; fi
  local ckpt
  ckpt=$(cd "$KIT" && find checkpoints/e2e -name 'step_*.pt' 2>/dev/null | sort | tail -n 1)
  if [[ -n "$ckpt" && -L "$KIT/checkpoints/latest" ]]; then
    pass "a checkpoint: $ckpt (and checkpoints/latest)"
  else
    fail "a checkpoint in checkpoints/e2e and checkpoints/latest"
  fi
}

stage_generate() {
  local log=$WORK/logs/generate.log rc=0
  as_user ./generate.sh --cpu --prompt "def " --max-tokens 24 --seed 1 >"$log" 2>&1 || rc=$?
  if ((rc == 0)) && [[ -s "$log" ]]; then
    pass "./generate.sh --cpu samples from checkpoints/latest: $(tail -n 1 "$log" | tr -cd '[:print:]' | cut -c1-60)"
  else
    show_log "$log"
    fail "./generate.sh --cpu" "exit $rc"
  fi
  local foreign
  foreign=$(find "$KIT" "$UHOME" ! -user "$E2E_USER" -print 2>/dev/null | head -n 5)
  check "every file written is owned by $E2E_USER (repository, logs, checkpoints, caches)" test -z "$foreign"
  [[ -z "$foreign" ]] || printf '    not theirs: %s\n' "$foreign"
}

# --- 6. terminals and signals ----------------------------------------------------------------------------------------

# wait_container: the ID of the running container of IMAGE (waits up to 60 s)
wait_container() {
  local i id
  for ((i = 0; i < 120; i++)); do
    # not train.sh's short first container, which only reads the settings (train_gpt.py --print-config=shell)
    id=$(docker ps --no-trunc --filter "ancestor=$IMAGE" --format '{{.ID}} {{.Command}}' |
      awk '!/--print-config/ { print $1; exit }')
    if [[ -n "$id" ]]; then printf '%s\n' "$id"; return 0; fi
    sleep 0.5
  done
  return 1
}

# start_wrapper NAME TTY CMD...: starts CMD as the test user in the background (under `script` when TTY is tty), its
# first process's PID in WRAPPER_PID (it becomes the wrapper, which must become the docker client), its container in
# CONTAINER once python runs in it
start_wrapper() {
  local name=$1 tty=$2 pidfile=$UHOME/$1.pid i
  shift 2
  rm -f "$pidfile"
  if [[ "$tty" == tty ]]; then
    local cmd
    printf -v cmd '%q ' "$@"
    as_user script -qefc "echo \$\$ >$pidfile; exec $cmd" /dev/null >"$WORK/logs/$name.log" 2>&1 &
  else
    # shellcheck disable=SC2016  # expanded by that sh
    as_user sh -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" >"$WORK/logs/$name.log" 2>&1 &
  fi
  BACKGROUND+=($!)
  CONTAINER=$(wait_container) || return 1
  WRAPPER_PID=$(cat "$pidfile")
  for ((i = 0; i < 240; i++)); do  # the program at work: its first output after the wrapper's own lines
    if grep -q -v -E '^(train|generate)\.sh: ' "$WORK/logs/$name.log"; then
      sleep 1
      return 0
    fi
    sleep 0.5
  done
  return 1
}

# terminal_flags: the container's Tty and OpenStdin (docker run -t and -i)
terminal_flags() {
  docker inspect --format '{{.Config.Tty}} {{.Config.OpenStdin}}' "$CONTAINER"
}

# step_seconds LOG: the step time the run's last step line in LOG reports (step_avg), in seconds; empty before one
step_seconds() {
  grep -oE '^step:[0-9]+/[0-9]+ .*step_avg:[0-9.]+ms' "$1" 2>/dev/null | tail -n 1 |
    sed -E 's/.*step_avg:([0-9.]+)ms/\1/' | awk 'NF { printf "%.1f", $1 / 1000 }'
}

# wait_steps LOG N: waits (up to 10 minutes) until LOG shows step N of the run
wait_steps() {
  local i
  for ((i = 0; i < 1200; i++)); do
    if grep -qE "^step:$2/" "$1"; then return 0; fi
    sleep 0.5
  done
  return 1
}

# sigterm_check WHAT [LOG]: SIGTERM to the wrapper's process ends its container and itself within a bound:
# STOP_WITHIN seconds (the container's own teardown), plus, for a training run whose output is LOG, two of the steps
# that LOG reports (the step under way and the checkpoint after it: a loaded machine's steps are slow, and the stop
# waits for one). A training run must also have saved that checkpoint, said so, and ended with 143.
sigterm_check() {
  local what=$1 log=${2-} exe start i gone=0 bound=$STOP_WITHIN step="" rc=0
  exe=$(readlink "/proc/$WRAPPER_PID/exe" 2>/dev/null || true)
  check "$what: the wrapper's process became the docker client (exec)" test "$(basename "$exe")" == docker
  if [[ -n "$log" ]]; then
    step=$(step_seconds "$log")
    bound=$(awk -v m="$STOP_WITHIN" -v s="${step:-0}" 'BEGIN { printf "%.1f", m + 2 * s }')
  fi
  start=$(date +%s.%N)
  kill -TERM "$WRAPPER_PID"
  for ((i = 0; i < 10 * (${bound%.*} + 20); i++)); do
    if [[ -z "$(docker ps -q --filter "id=$CONTAINER")" ]] && ! kill -0 "$WRAPPER_PID" 2>/dev/null; then
      gone=1
      break
    fi
    sleep 0.1
  done
  local took
  took=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
  if ((gone)) && awk -v t="$took" -v m="$bound" 'BEGIN { exit !(t <= m) }'; then
    pass "$what: SIGTERM to the wrapper ended it and its container in ${took} s (bound ${bound} s${step:+: $STOP_WITHIN s and two ${step}-s steps})"
  else
    fail "$what: SIGTERM to the wrapper ended it and its container within ${bound} s" \
      "$( ((gone)) && echo "took $took s" || echo "still running after $took s")"
    docker rm -f "$CONTAINER" >/dev/null 2>&1 || true
    kill -KILL "$WRAPPER_PID" 2>/dev/null || true
  fi
  [[ -n "$log" ]] || return 0
  wait "${BACKGROUND[-1]}" || rc=$?
  check "$what: the run exited 143 after SIGTERM (got $rc)" test "$rc" == 143
  check "$what: the run saved a checkpoint at the stop" grep -q '^saved checkpoint ' "$log"
  check "$what: the run said where it stopped and how to resume" grep -qE 'stopped by SIGTERM at step [0-9]+ of 100000; saved .*Resume with: \./train\.sh --cpu --resume ' "$log"
  check "$what: no traceback" bash -c "! grep -q Traceback '$log'"
}

stage_signals() {
  # train.sh, stdin not a terminal: no -t, no -i; then SIGTERM
  # 100,000 steps: a run that would take days, stopped long before (--yes: it is meant to be too long for a CPU)
  if start_wrapper train-sigterm plain ./train.sh --cpu --preset tiny --num-iterations 100000 --yes --run-name sigterm &&
    wait_steps "$WORK/logs/train-sigterm.log" 2; then
    check "no terminal: train.sh's container has no -t and no -i (Tty OpenStdin: $(terminal_flags))" \
      test "$(terminal_flags)" == "false false"
    sigterm_check "train.sh" "$WORK/logs/train-sigterm.log"
  else
    show_log "$WORK/logs/train-sigterm.log"
    fail "train.sh started a container for the SIGTERM check"
  fi
  local gen=(./generate.sh --cpu --prompt "def " --max-tokens 20000 -- --no-stop-at-eot)
  if start_wrapper generate-sigterm plain "${gen[@]}"; then
    check "no terminal: generate.sh's container has no -t and no -i" test "$(terminal_flags)" == "false false"
    sigterm_check "generate.sh"
  else
    show_log "$WORK/logs/generate-sigterm.log"
    fail "generate.sh started a container for the SIGTERM check"
  fi
  # a pseudo-terminal: -i -t
  if start_wrapper generate-tty tty "${gen[@]}"; then
    check "under a pseudo-terminal (script): generate.sh's container has -i and -t (Tty OpenStdin: $(terminal_flags))" \
      test "$(terminal_flags)" == "true true"
    sigterm_check "generate.sh under a pseudo-terminal"
  else
    show_log "$WORK/logs/generate-tty.log"
    fail "generate.sh under script started a container"
  fi
  gpu_run_check
}

# gpu_run_check: a GPU run on this engine (no NVIDIA runtime), with an nvidia-smi that lists a GPU, fails in one line
gpu_run_check() {
  local fake=$WORK/fake-gpu log=$WORK/logs/gpu-run.log rc=0
  mkdir -p "$fake"
  printf '#!/bin/sh\necho "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-e2e)"\n' >"$fake/nvidia-smi"
  chmod 755 "$fake/nvidia-smi"
  (USER_PATH=$fake:$USER_PATH; as_user ./train.sh --preset tiny --num-iterations 20 >"$log" 2>&1) || rc=$?
  local lines
  lines=$(wc -l <"$log")
  if ((rc == 2 && lines == 1)) && grep -q -- '--cpu' "$log" && grep -q 'NVIDIA Container Toolkit' "$log"; then
    pass "a GPU run where docker has no NVIDIA runtime: one line naming --cpu and the toolkit: $(grep 'error:' "$log")"
  else
    show_log "$log"
    fail "a GPU run where docker has no NVIDIA runtime fails in one line" "exit $rc"
  fi
}

# --- 7. the README's interactive line --------------------------------------------------------------------------------

# readme_block: the README's ```bash block with the interactive `docker run --rm -it` line
readme_block() {
  awk '/^```bash$/ { inside = 1; block = ""; next }
       /^```$/ { if (inside && block ~ /docker run --rm -it/) { printf "%s", block; exit } inside = 0; next }
       inside { block = block $0 "\n" }' "$KIT/README.md"
}

stage_readme() {
  local block script=$KIT/readme-line.sh log=$WORK/logs/readme.log rc=0
  block=$(readme_block)
  if [[ -z "$block" || "$block" != *" bash" ]]; then
    fail "the README's interactive docker run line" "no block ending in 'bash' found"
    return 0
  fi
  # on this machine without GPUs the GPU-only options go, as the README says; bash gets a command to run
  block=${block//" --gpus all"/}
  block=${block//" --ulimit memlock=-1"/}
  printf '%s -c %q\n' "$block" 'id -u && python generate.py --device cpu --max-tokens 8 --prompt "def " && touch logs/readme-line' \
    >"$script"
  chown "$E2E_USER:$E2E_USER" "$script"
  as_user script -qefc "bash $script" /dev/null >"$log" 2>&1 || rc=$?
  if ((rc == 0)) && grep -aqw "$(id -u "$E2E_USER")" "$log" && [[ "$(stat -c %U "$KIT/logs/readme-line" 2>/dev/null)" == "$E2E_USER" ]]
  then
    pass "the README's interactive docker run line works with a command, under a terminal, as the user"
  else
    show_log "$log"
    fail "the README's interactive docker run line works with a command" "exit $rc"
  fi
  rm -f "$script"
}

# --- cleanup ---------------------------------------------------------------------------------------------------------

# cleanup: background wrappers, containers, dockerd (by its PID), its mounts, its bridge and firewall rules, the user,
# the temporary directory
cleanup() {
  ((CLEANED == 0)) || return 0
  CLEANED=1
  local pid i
  local -a ids=()
  for pid in "${BACKGROUND[@]+"${BACKGROUND[@]}"}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  if [[ -n "$DOCKERD_PID" ]] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    mapfile -t ids < <(docker ps -aq 2>/dev/null || true)
    ((${#ids[@]} == 0)) || docker rm -f "${ids[@]}" >/dev/null 2>&1 || true
    kill -TERM "$DOCKERD_PID"
    for ((i = 0; i < 300; i++)); do
      kill -0 "$DOCKERD_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$DOCKERD_PID" 2>/dev/null || true
    wait "$DOCKERD_PID" 2>/dev/null || true
  fi
  for pid in "${BACKGROUND[@]+"${BACKGROUND[@]}"}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n "$WORK" ]]; then
    local mnt
    # mounts under WORK, deepest first (dockerd unmounts its own on a clean stop; this is for one that was not)
    while read -r mnt; do
      umount -l "$mnt" 2>/dev/null || true
    done < <(awk -v w="$WORK" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r)
  fi
  if ((DOCKER0_BEFORE == 0)) && [[ -e /sys/class/net/docker0 ]] && command -v ip >/dev/null; then
    ip link delete docker0 2>/dev/null || true
  fi
  firewall_restore
  [[ -z "$E2E_USER" ]] || userdel "$E2E_USER" 2>/dev/null || true
  if [[ -n "$WORK" ]]; then
    if [[ "${E2E_KEEP-}" == 1 ]]; then say "kept $WORK"; else rm -rf "$WORK"; fi
  fi
}

stage_cleanup() {
  local dockerd_pid=$DOCKERD_PID work=$WORK
  cleanup
  local left=""
  [[ -z "$dockerd_pid" ]] || ! kill -0 "$dockerd_pid" 2>/dev/null || left+=" dockerd"
  [[ -z "$work" ]] || ! grep -qF " $work" /proc/mounts || left+=" mounts"
  [[ -z "$(pgrep -f "containerd.*$work" || true)" ]] || left+=" containerd"
  left+=$FIREWALL_LEFT
  check "dockerd stopped by its PID; no container, mount, process or firewall rule of the test left${left:+ (left:$left)}" \
    test -z "$left"
}

main() {
  if [[ "${1-}" == -h || "${1-}" == --help ]]; then usage; return 0; fi
  local start=$SECONDS
  preflight
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  if run_stage engine stage_engine && run_stage "base image" stage_base && run_stage build stage_build; then
    if run_stage train stage_train; then
      run_stage generate stage_generate || true
    fi
    run_stage signals stage_signals || true
    run_stage readme stage_readme || true
  fi
  run_stage cleanup stage_cleanup || true
  local times
  printf -v times '%s, ' "${TIMES[@]}"
  say "stage times: ${times%, }; total $((SECONDS - start))s"
  say "$PASSED passed, $FAILED failed"
  ((FAILED == 0))
}

main "$@"
