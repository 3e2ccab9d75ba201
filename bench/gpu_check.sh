#!/usr/bin/env bash
# One GPU check that fits 9 minutes on one H200 (or H100), cold compile cache included: the most valuable figures
# first, each step under its own time limit, everything in OUTDIR/gpu_check.json (rewritten after every step, so a
# run that is cut off still leaves what it measured) and each step's output in OUTDIR/STEP.log.
#
#   bench/gpu_check.sh [--device cuda|cpu] [OUTDIR]       OUTDIR defaults to $OUT; --device to $GPU_CHECK_DEVICE
#   GPU_CHECK_STEPS="attention a10-memory" bench/gpu_check.sh OUTDIR    # only these (the file keeps the others)
#   bench/gpu_check.sh --device cpu /tmp/gpu-check        # the same plumbing on a tiny model, in ~30 s on 2 CPUs
#
# Steps, in order (limit in seconds; each also stops at the whole check's budget, GPU_CHECK_BUDGET, default 540):
#   env          30  GPU name, driver, torch, Triton, CUDA (nvidia-smi, torch)
#   train-fp8   270  bench_train.py --preset speedrun, compiled, 1 GPU, 8 micro-steps: 20 steps at the end-of-training
#                    window, tokens/s, MFU, compile and warm-up time, peak memory, then a 3-step kernel profile
#   train-bf16  150  the same with --no-fp8: tokens/s over 5 steps (2 warm-up), with train-fp8's compile cache
#   attention   120  check_cuda.py's attention check: FlexAttention and the dense mask in bf16 against fp32,
#                    forward and q/k/v gradients, windows of 0 (the short window of the first steps), 1, 4, 14 blocks
#   a10-memory  180  bench_train.py --preset a10, compiled, 1 warm-up + 2 steps: peak allocated memory against 22 GiB
# The limits allow for a cold compile (about 135 s for step 2); their sum is above the budget, so a step that ends
# early leaves its time to the next, and a step with under 10 s left is recorded "skipped: no time left".
# With --device cpu: the tiny preset on the CPU (1 step, no warm-up), the attention check forward only, and
# a10-memory "skipped: no CUDA".
# gpu_check.json: date, mode, device, driver, torch, triton, cuda, budget_s, seconds, complete, and per step status
# (pending, running, ok, failed, timed out, skipped: REASON), exit_code, seconds, limit_s, figures, log.
# Environment: PYTHON (default python3); GPU_CHECK_LIMIT_<STEP> to change a step's limit (dashes as _, e.g.
# GPU_CHECK_LIMIT_train_fp8=300); GPU_CHECK_KILL_AFTER (default 5: seconds from a limit's SIGTERM to SIGKILL);
# TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR (default: under ${TMPDIR:-/tmp}/gpu-check-compile, shared by all steps).
# Exit status 0 when every step is ok (or skipped for want of CUDA in cpu mode), 1 otherwise, 2 for bad arguments.
set -uo pipefail

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

device=${GPU_CHECK_DEVICE:-cuda}
out=${OUT:-}
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --device) device=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
        --device=*) device=${1#--device=}; shift ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) out=$1; shift; [[ $# -eq 0 ]] || { echo "one OUTDIR only (steps go in GPU_CHECK_STEPS)" >&2; exit 2; } ;;
    esac
done
if [[ -z $out ]]; then
    usage >&2
    echo "no OUTDIR given and OUT is not set" >&2
    exit 2
fi
if [[ $device != cuda && $device != cpu ]]; then
    echo "--device must be cuda or cpu, got '$device'" >&2
    exit 2
fi
all_steps=(env train-fp8 train-bf16 attention a10-memory)
read -r -a steps <<<"${GPU_CHECK_STEPS:-${all_steps[*]}}"
for step in "${steps[@]}"; do
    if [[ " ${all_steps[*]} " != *" $step "* ]]; then
        echo "unknown step $step; the steps are: ${all_steps[*]}" >&2
        exit 2
    fi
done

out=$(realpath -m "$out")
mkdir -p "$out" || exit 2
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-540}
kill_after=${GPU_CHECK_KILL_AFTER:-5}
json=$out/gpu_check.json
export PYTHONUNBUFFERED=1  # figures reach the log and the terminal as they are printed
# one cache for all steps: train-bf16 and a10-memory reuse what train-fp8 compiled
cache=${TMPDIR:-/tmp}/gpu-check-compile
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$cache/triton}

default_limit() {
    case $1 in
        env) echo 30 ;; train-fp8) echo 270 ;; train-bf16) echo 150 ;; attention) echo 120 ;; a10-memory) echo 180 ;;
    esac
}

# step_command STEP RAW: fills cmd with the step's command line (empty: the step does not run on this device)
step_command() {
    local raw=$2
    if [[ $device == cuda ]]; then
        case $1 in
            env) cmd=("$py" bench/gpu_check.py env --mode cuda --json "$raw") ;;
            train-fp8) cmd=("$py" bench/bench_train.py --preset speedrun --device cuda --steps 20 --profile 3
                            --json "$raw") ;;
            train-bf16) cmd=("$py" bench/bench_train.py --preset speedrun --device cuda --no-fp8 --steps 5
                             --warmup-steps 2 --json "$raw") ;;
            attention) cmd=("$py" bench/check_cuda.py --device cuda --checks attention --json "$raw") ;;
            a10-memory) cmd=("$py" bench/bench_train.py --preset a10 --device cuda --steps 2 --warmup-steps 1
                             --json "$raw") ;;
        esac
    else
        case $1 in
            env) cmd=("$py" bench/gpu_check.py env --mode cpu --json "$raw") ;;
            train-fp8) cmd=("$py" bench/bench_train.py --preset tiny --device cpu --steps 1 --warmup-steps 0
                            --profile 3 --json "$raw") ;;
            train-bf16) cmd=("$py" bench/bench_train.py --preset tiny --device cpu --steps 1 --warmup-steps 0
                             --no-fp8 --json "$raw") ;;
            attention) cmd=("$py" bench/check_cuda.py --device cpu --checks attention --json "$raw") ;;
            a10-memory) cmd=() ;;
        esac
    fi
}

note() {
    "$py" bench/gpu_check.py "$@" || echo "gpu_check.py $1 failed: $json may be behind" >&2
}

steps_csv=$(IFS=,; echo "${steps[*]}")
note init "$json" --mode "$device" --budget "$budget" --steps "$steps_csv"
echo "=== gpu_check on $device into $out, budget ${budget}s, steps ${steps[*]}, compile cache $TORCHINDUCTOR_CACHE_DIR"
for step in "${steps[@]}"; do
    raw=$out/$step.json
    step_command "$step" "$raw"
    if [[ ${#cmd[@]} -eq 0 ]]; then
        note skip "$json" "$step" --reason "no CUDA"
        continue
    fi
    var=GPU_CHECK_LIMIT_${step//-/_}
    limit=${!var:-$(default_limit "$step")}
    left=$((budget - SECONDS - kill_after - 2))  # the SIGKILL grace and the bookkeeping stay inside the budget
    if ((left < limit)); then
        if ((left < 10)); then
            note skip "$json" "$step" --reason "no time left (${left}s of the ${budget}s budget)"
            continue
        fi
        limit=$left
    fi
    note start "$json" "$step" --limit "$limit" --raw "$raw"
    echo "=== $step (limit ${limit}s) $(date -u +%FT%TZ): ${cmd[*]}"
    timeout --kill-after="$kill_after" "$limit" "${cmd[@]}" 2>&1 | tee "$out/$step.log"
    rc=${PIPESTATUS[0]}
    note finish "$json" "$step" --rc "$rc" --raw "$raw" --log "$step.log"
done
"$py" bench/gpu_check.py close "$json"
