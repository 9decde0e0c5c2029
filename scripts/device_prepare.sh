#!/usr/bin/env bash
# Prepare what a GPU device session needs to train the shapes model there (the device has
# torch but neither diffusers nor the MiniLM text encoder, and no network):
#   .device/wheels/  diffusers and its dependencies (wheels for the device's Python, 3.11)
#   .device/cache/   the captions' MiniLM embeddings (FLOWKIT_CACHE layout)
# Carry both (run tool: carry [".device"], ~51 MiB), then run scripts/device_train_shapes.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
mkdir -p .device/wheels .device/cache
pip download -q diffusers safetensors tqdm setuptools wheel --only-binary=:all: --python-version 3.11 \
    -d .device/wheels
FLOWKIT_CACHE=.device/cache python -c "from flowkit.train.shapes import caption_embeddings; caption_embeddings()"
du -sh .device
