#!/usr/bin/env bash
# On the GPU device (repository root, .device carried; see scripts/device_prepare.sh): install
# the carried wheels and flowkit, train (or resume) the shapes model on CUDA, and put the
# exported fp16 folder (~14 MiB) under $OUT. Resumable: run it again while the machine is warm.
#   STEPS=16000 BATCH=128 LR=5e-4 bash scripts/device_train_shapes.sh
set -euo pipefail
pip install -q --no-index --find-links .device/wheels diffusers safetensors tqdm setuptools wheel
pip install -q --no-deps --no-build-isolation -e .
export FLOWKIT_CACHE=$PWD/.device/cache
CKPT=${CKPT:-/tmp/flowkit-shapes-gpu}
timeout "${BUDGET:-540}" python -m flowkit train shapes --device cuda --out "$CKPT" \
    --steps "${STEPS:-16000}" --batch-size "${BATCH:-128}" --lr "${LR:-5e-4}" --threads 8 || true
python -m flowkit train shapes --out "$CKPT" --export-only
mkdir -p "$OUT/shapes" && cp -r "$CKPT/export/." "$OUT/shapes/" && tail -1 "$CKPT/log.jsonl"
