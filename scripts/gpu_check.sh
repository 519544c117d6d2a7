#!/usr/bin/env bash
# The one GPU check (issue 16): the `gpu` test tier (every stage and `run` + resume on the tiny models, CUDA, bf16),
# then the GPU benchmark at real shapes with random weights (Qwen2.5-Coder 0.5B → 1.5B, Llama-2-7B → Llama-3-8B).
# Needs a CUDA torch with this checkout's dependencies; nothing is downloaded. Under 10 min on one H200 (estimated:
# not yet run on a GPU); each part has its own time limit, so one that hangs still leaves the other's results.
#
# Run:  bash scripts/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu-check
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-check}}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$py" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported())" \
  2>&1 | tee "$out/torch.txt"
timeout 200 "$py" -m pytest -m gpu -q -rs 2>&1 | tee "$out/pytest-gpu.txt"
tests=${PIPESTATUS[0]}
timeout 360 "$py" scripts/bench_gpu.py --pairs qwen,llama --out "$out" 2>&1 | tee "$out/bench.txt"
bench=${PIPESTATUS[0]}
echo "gpu tier exit $tests, benchmark exit $bench (124: timed out); results in $out"
exit $(( tests || bench ))
