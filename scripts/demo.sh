#!/usr/bin/env bash
# Main job: set up, then train sgdrop_vgg_tiny with SGDrop on Imagenette at 64 px for a few minutes on CPU.
#   bash scripts/demo.sh                      # data from ../shared/data/imagenette
#   bash scripts/demo.sh --data DIR [...]     # any ImageFolder root with train/ and val/; extra flags go to train/main.py
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data/imagenette
if [ "${1:-}" = "--data" ]; then
    data=${2:?--data needs a directory}
    shift 2
fi
bash scripts/setup.sh
exec .venv/bin/python train/main.py "$data" --preset demo --output runs/demo "$@"
