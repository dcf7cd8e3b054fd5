#!/usr/bin/env bash
# Every GPU check and benchmark of issue 6 in one call, for a session that is lent a device:
#
#     run(command="bash bench/gpu_session.sh", timeout_s=540)
#
# About 4-6 minutes on an H200, the machine's own python3 (torch, numpy, tqdm and pytest are in
# its image; nothing to carry). Each step is time-boxed so that one hanging step cannot take the
# rest with it, and everything lands in $OUT (or bench/results here): the CUDA correctness checks
# (cuda_check.json/.log), the synthetic-scale benchmark at 1,000,000 × 2,048 in float16 and
# bfloat16 (gpu_bench_float16.json, gpu_bench_bfloat16.json, with their tables in gpu.log), and
# nvidia-smi's view of the device. Exit status: 1 if any step failed.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
py="${PYTHON:-python3}"
status=0

step() {  # step SECONDS NAME COMMAND...: run one step, log it, remember a failure
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%T))" | tee -a "$out/gpu.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/gpu.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "=== $name FAILED (exit $rc)" | tee -a "$out/gpu.log"; status=1; }
}

step 20 device nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step 20 torch "$py" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
step 150 cuda-check "$py" bench/cuda_check.py --json "$out/cuda_check.json"
step 150 bench-float16 "$py" bench/gpu_bench.py --n 1000000 --k 2048 --dtype float16 \
    --out "$out/gpu_bench_float16.json"
step 120 bench-bfloat16 "$py" bench/gpu_bench.py --n 1000000 --k 2048 --dtype bfloat16 \
    --out "$out/gpu_bench_bfloat16.json"
echo "=== done, status $status ($(date -u +%T))" | tee -a "$out/gpu.log"
exit $status
