#!/usr/bin/env bash
# CUDA check, about 5 minutes: the training step (fp32 and bf16 autocast) of the default model
# and of a paper-width decoder, bf16-vs-fp32 loss parity on a fixed batch, and batched sampling
# with the KV cache (default model, and 256 image tokens). No prepared data needed.
#   bash benchmarks/gpu_check.sh            (PYTHON=... to pick the interpreter)
# Without a CUDA device it prints a note and exits 0. Results: benchmarks/results/gpu/*.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device visible to $PY: skipped"
    exit 0
fi
OUT=benchmarks/results/gpu
mkdir -p "$OUT"
"$PY" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), torch.__version__)'

status=0
run() {  # run NAME SECONDS CMD...: a failure is reported, the other checks still run
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    if ! timeout "$limit" "$@"; then
        echo "gpu_check: $name FAILED"
        status=1
    fi
}

run "train step, default model" 60 "$PY" benchmarks/gpu_step.py --batch 32 --steps 20 \
    --out "$OUT/train_step_default.json"
run "train step, 256 px / patch 16, decoder 1024 x 8" 90 "$PY" benchmarks/gpu_step.py \
    --preset jetformer_b --set model.decoder.depth=8 --set model.flow.num_couplings=8 \
    --batch 8 --steps 5 --out "$OUT/train_step_b_slice.json"
run "sampling, default model" 60 "$PY" benchmarks/sampling.py --device cuda --repeats 3 \
    --batch 50 --out "$OUT/sampling_default.json"
run "sampling, 256 image tokens, batch 8" 90 "$PY" benchmarks/sampling.py --device cuda \
    --repeats 2 --batch 8 --set data.resolution=64 --out "$OUT/sampling_256_tokens.json"
exit $status
