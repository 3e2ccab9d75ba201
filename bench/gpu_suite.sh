#!/usr/bin/env bash
# The GPU measurements behind records/h100-*.md, one step per name, each under its own time limit:
#
#   bench/gpu_suite.sh OUTDIR STEP...       e.g. bench/gpu_suite.sh /tmp/gpu env corpus check bench-fp8
#
# Steps (run in the order given):
#   env          nvidia-smi, torch, CUDA, compute capability
#   corpus       the largest real text every machine has: its Python installation's sources, as shards in data/code
#   check        bench/check_cuda.py: FlexAttention vs dense in bf16, FP8 head vs fp32, compiled vs eager 20 steps
#   bench-fp8    bench/bench_train.py --preset speedrun, 100 timed steps, FP8 head, then a 5-step profile
#   bench-bf16   the same with --no-fp8
#   mem-a10      bench/bench_train.py --preset a10: peak memory of training steps and of a validation forward
#   mem-medium   the same for the medium (track-2) preset
#   sample       bench/bench_generate.py on the track-1 model, compiled, next to Hugging Face GPT-2 (--hf)
#   learn-fp8    train_gpt.py --preset speedrun --num-iterations 300 on data/code, val every 25 steps
#   learn-bf16   the same with --no-fp8 (same data, same seed), then records/report.py --compare against the FP8
#                run (this call's learn-fp8 log, else the newest one in records/logs)
# Every step's output goes to OUTDIR/STEP.log (and .json where the tool writes one); run logs to OUTDIR/logs/.
# Environment: PYTHON (default python3), STEP_LIMIT_<STEP> in seconds to change a step's limit (dashes as _),
# CORPUS_MB (default 400). Limits allow for a cold compile cache: a first compile of the track-1 model took 135 s.
set -uo pipefail

if [[ $# -lt 2 ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
fi
one=
if [[ $1 == --one ]]; then  # internal: run a single step (under timeout) and exit with its status
    one=$2
    shift 2
fi
out=$(realpath -m "$1")
shift
mkdir -p "$out/logs"
cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

learn_flags=(--preset speedrun --data-dir data/code --train-files 'code_train_*.bin' --val-files 'code_val_*.bin'
             --val-tokens 1048576 --num-iterations 300 --val-loss-every 25 --train-loss-every 25
             --log-dir "$out/logs" --checkpoint-dir "${TMPDIR:-/tmp}/gpu-suite-checkpoints" --no-save-final)

# compare_with_fp8 RUN: records/report.py --compare of the FP8 run (this call's learn-fp8 log, else the newest dated
# one in records/logs) against OUTDIR/logs/RUN.txt
compare_with_fp8() {
    local fp8_log
    fp8_log=$(ls -t "$out/logs/h100-speedrun-300-code-fp8.txt" records/logs/h100-speedrun-300-code-fp8-20*.txt \
        2>/dev/null | head -n 1)
    if [[ -n $fp8_log ]]; then
        $py records/report.py "$fp8_log" "$out/logs/$1.txt" --compare
    fi
}

step_command() {
    case $1 in
        env) bash -c "nvidia-smi; $py -c 'import torch, platform; print(\"python\", platform.python_version(), \
\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0), \
torch.cuda.get_device_capability(0))'" ;;
        corpus)
            if [[ -f data/code/manifest.json ]]; then echo "data/code exists"; return 0; fi
            $py bench/code_corpus.py --out "${TMPDIR:-/tmp}/code.jsonl" --max-mb "${CORPUS_MB:-400}" &&
                $py data/prepare.py "${TMPDIR:-/tmp}/code.jsonl" --out-dir data/code --name code \
                    --val-tokens 1048576 --workers "$(nproc)" --quiet --overwrite &&
                grep -E '"(tokens|train_tokens|val_tokens)"' data/code/manifest.json ;;
        check) $py bench/check_cuda.py --data-dir data/code --train-files 'code_train_*.bin' --json "$out/check.json" ;;
        bench-fp8) $py bench/bench_train.py --preset speedrun --steps 100 --profile 5 --json "$out/bench-fp8.json" ;;
        bench-bf16) $py bench/bench_train.py --preset speedrun --steps 100 --no-fp8 --json "$out/bench-bf16.json" ;;
        mem-a10) $py bench/bench_train.py --preset a10 --steps 5 --validate --json "$out/mem-a10.json" ;;
        mem-medium) $py bench/bench_train.py --preset medium --steps 3 --validate --json "$out/mem-medium.json" ;;
        sample) $py bench/bench_generate.py --preset speedrun --compile --hf --prompt-len 128 --new-tokens 256 \
                    --batches 1,8 ;;
        learn-fp8) $py train_gpt.py "${learn_flags[@]}" --run-name h100-speedrun-300-code-fp8 ;;
        learn-bf16)
            $py train_gpt.py "${learn_flags[@]}" --no-fp8 --run-name h100-speedrun-300-code-bf16 &&
                compare_with_fp8 h100-speedrun-300-code-bf16 ;;
        *) echo "unknown step $1" >&2; return 2 ;;
    esac
}

default_limit() {
    case $1 in
        env) echo 60 ;; corpus) echo 180 ;; check) echo 480 ;; bench-fp8 | bench-bf16) echo 420 ;;
        mem-a10 | mem-medium) echo 300 ;; sample) echo 300 ;; learn-fp8 | learn-bf16) echo 600 ;; *) echo 60 ;;
    esac
}

if [[ -n $one ]]; then
    step_command "$one"
    exit
fi

status=0
for step in "$@"; do
    var=STEP_LIMIT_${step//-/_}
    limit=${!var:-$(default_limit "$step")}
    echo "=== $step (limit ${limit}s) $(date -u +%FT%TZ)"
    start=$SECONDS
    timeout --kill-after=20 "$limit" bash bench/gpu_suite.sh --one "$step" "$out" 2>&1 | tee "$out/$step.log"
    rc=${PIPESTATUS[0]}
    echo "=== $step: exit $rc after $((SECONDS - start))s"
    [[ $rc -eq 0 ]] || status=1
done
exit $status
