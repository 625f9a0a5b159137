#!/usr/bin/env bash
# The one prepared device run (CUDA): correctness of the engine on the GPU, then the 7B-shape
# benchmark, in under 10 minutes on one GPU. Run from the repository root on a CUDA machine whose
# python already has torch (CUDA build) and the packages of requirements.txt:
#     bash tests/gpu.sh            (PYTHON=... to choose the interpreter)
# Every step is bounded; a failing step is reported and the next one still runs. Not run yet: no
# session so far was lent a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {  # step SECONDS NAME CMD...: run with a time bound, report, go on
  local secs=$1 name=$2; shift 2
  echo "=== $name"
  local t0=$SECONDS
  timeout "$secs" "$@"; local rc=$?
  echo "=== $name: exit $rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
}

step 30 "device" bash -c "nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv; $PY -c \"
import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(),
'bf16', torch.cuda.is_bf16_supported())\""

# 1. correctness on CUDA (1 rank; 2 ranks over NCCL where there are 2 GPUs): the workers load
#    float32 and compare with transformers on the CPU, as on the CPU machine
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
T=tests/test_engine.py::test_logits_and_greedy_tokens_match_transformers
if [ "$GPUS" -ge 2 ]; then TESTS=(tests/test_engine.py); else TESTS=("$T[mha-1-1]" "$T[mha-2-1]" "$T[gqa-2-1]"); fi
step 240 "engine vs transformers on CUDA" "$PY" -m pytest -q -x "${TESTS[@]}" tests/test_sampling.py

# 2. the 7B shape (random weights): bf16, int8, int4 side by side; batch 1 and 16 requests
step 420 "bench 7B bf16/int8/int4" "$PY" -m llama_demo.bench --shape 7B --device cuda --dtype bfloat16 \
  --weights float32,int8,int4 --concurrency 1,16 --prompt_len 128 --new_tokens 64 --repeats 2 --ppl_tokens 0

exit $status
