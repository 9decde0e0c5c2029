#!/usr/bin/env bash
# Resume the shapes model's training in the background (CPU, one thread, niced), logging to
# $DIR/stdout.log. Checkpoints live outside the work tree so they survive a fresh checkout:
#   DIR=/work/ckpt/shapes STEPS=6000 bash scripts/train_shapes_bg.sh
# THREADS (default 1) sets torch threads; STEPS (optional) sets the total and lays the curriculum over it (the 32 px finish is its last 30%).
# Progress: tail -1 $DIR/log.jsonl   Stop: pkill -f "flowkit train shapes"
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DIR:-/work/ckpt/shapes}
mkdir -p "$DIR"
EXTRA=()
if [ -n "${STEPS:-}" ]; then EXTRA=(--steps "$STEPS"); fi
. .venv/bin/activate
THREADS=${THREADS:-1}
OMP_NUM_THREADS=$THREADS nohup nice -n 5 flowkit train shapes --out "$DIR" --threads "$THREADS" "${EXTRA[@]}" >> "$DIR/stdout.log" 2>&1 &
echo "training shapes in the background (pid $!), checkpoints in $DIR"
