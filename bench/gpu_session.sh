#!/usr/bin/env bash
# Every GPU check of the project in one call (a lent GPU is short-lived: one script, one run).
#
#   OUT=/tmp/gpu bash bench/gpu_session.sh      # on a machine with one NVIDIA GPU and torch
#
# 1. the CUDA-only tests (pytest -m gpu);
# 2. split-vs-monolithic decode and per-group scale-up time of the runtime, Llama-2-7B shape
#    (random weights, float16), batch 16 and 64 (bench/runtime_overhead.py);
# 3. opscale-profiler rows for Llama-2-7B (full default grid) and one Llama-2-70B layer
#    (python -m runtime.profile), to compare with the shipped H100 rows
#    (bench/profile_compare.py, run afterwards on any machine).
# 4. a torch.profiler operator table of each side at batch 16 (op_table_llama-2-7b_b16.txt).
# 5. micro-batches on the runtime's per-group path: whole / fixed 2 / adaptive
#    (bench/micro_batches.py; run before step 4 so a time limit cuts the table, not this).
# 6. decode calls spread over two projection / MLP replicas against filled onto one
#    (bench/pool_dispatch.py: the MLP pool's busy seconds and NVML energy, the simulators'
#    pool_dispatch assumption on real hardware; also before step 4).
# 7. the stateless pools as Ray Serve deployments on the same GPU (num_gpus 0.2 each) against
#    in-process pools: the hop of a stateless call on GPU hardware (bench/ray_pools.py; skipped
#    where ray is not installed; before step 4).
# PROFILE=0 skips step 3 (the profiles do not depend on the engine).
# Each step has its own time limit so that a slow step leaves the others' results.
# Results land in $OUT (default bench/results/gpu); docs/BENCHMARKS.md and docs/PROFILES.md
# say what they showed.
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
log() { echo "=== $(date -u +%H:%M:%S) $*"; }
{
  log env
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,power.draw,power.limit --format=csv
  $PY -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

log "1. pytest -m gpu"
timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_profile.py tests/test_runtime_engine.py tests/test_runtime_tp.py > "$OUT/gpu_tests.log" 2>&1
tail -5 "$OUT/gpu_tests.log"
log "2a. runtime overhead, llama-2-7b, batch 16"
timeout 200 $PY bench/runtime_overhead.py --model llama-2-7b --device cuda --batch 16 --prompt 128 --tokens 64 \
  --repeats 3 --json "$OUT/overhead_llama-2-7b_b16.json" > /dev/null
$PY -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: r[k] for k in ('device_name','monolithic','split','split_over_monolithic_tokens_per_s','monolithic_runs_tokens_per_s','split_runs_tokens_per_s')}); print({g: round(v['first_batch_s'],3) for g,v in r['scale_up'].items()})" "$OUT/overhead_llama-2-7b_b16.json"
if [ "${PROFILE:-1}" = 1 ]; then
log "3a. profile llama-2-7b"
timeout 150 $PY -m runtime.profile --model llama-2-7b --device cuda --power-window 0.2 -q \
  --out "$OUT/profile_llama-2-7b.csv"
fi
log "2b. runtime overhead, llama-2-7b, batch 64"
timeout 150 $PY bench/runtime_overhead.py --model llama-2-7b --device cuda --batch 64 --prompt 128 --tokens 64 \
  --repeats 3 --no-scale-up --json "$OUT/overhead_llama-2-7b_b64.json" > /dev/null
$PY -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: r[k] for k in ('monolithic','split','split_over_monolithic_tokens_per_s','monolithic_runs_tokens_per_s','split_runs_tokens_per_s')})" "$OUT/overhead_llama-2-7b_b64.json"
if [ "${PROFILE:-1}" = 1 ]; then
log "3b. profile one llama-2-70b layer"
timeout 120 $PY -m runtime.profile --model llama-2-70b --device cuda --power-window 0.1 -q \
  --out "$OUT/profile_llama-2-70b.csv"
fi
log "5. micro-batches on the per-group path (whole / fixed 2 / adaptive), llama-2-7b"
timeout 200 $PY bench/micro_batches.py --model llama-2-7b --device cuda --dtype float16 --requests 32 --prompt 512 \
  --tokens 32 --repeats 3 --json "$OUT/micro_batches_llama-2-7b.json" 2>/dev/null | tail -4
log "6. pool dispatch (spread / fill) with 2 projection / MLP replicas, llama-2-7b: MLP busy time and NVML energy"
timeout 200 $PY bench/pool_dispatch.py --model llama-2-7b --device cuda --dtype float16 --requests 64 --prompt 256 \
  --tokens 64 --replicas 2 --batch 64 --repeats 3 --json "$OUT/pool_dispatch_llama-2-7b.json" 2>/dev/null | tail -3
log "7. Ray Serve pools vs in-process pools (hop of a stateless call), llama-2-7b"
if $PY -c "import ray.serve" 2>/dev/null; then
  timeout 300 $PY bench/ray_pools.py --model llama-2-7b --device cuda --dtype float16 --requests 16 --prompt 128 \
    --tokens 16 --repeats 2 --json "$OUT/ray_pools_llama-2-7b.json" 2>/dev/null | tail -3
else
  echo "ray[serve] not installed: skipped"
fi
log "4. operator tables (torch.profiler), llama-2-7b, batch 16"
timeout 150 $PY bench/runtime_overhead.py --model llama-2-7b --device cuda --batch 16 --prompt 128 --tokens 64 \
  --repeats 1 --no-scale-up --op-table "$OUT/op_table_llama-2-7b_b16.txt" > /dev/null
log done
