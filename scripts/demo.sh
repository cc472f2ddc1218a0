#!/usr/bin/env bash
# Main job: set up, load a zoo checkpoint by its tag (timm.create_model(TAG, pretrained=True), no network), check it
# on Imagenette, fine-tune it with SGDrop on a small EuroSAT subset (transfer learning) and draw its Grad-CAM saliency.
#   bash scripts/demo.sh                                 # data from ../shared/data
#   bash scripts/demo.sh --data-root DIR                 # a folder holding imagenette/ and eurosat/
#   MODEL=sgdrop_vgg11.imagenette_128_ema_head bash scripts/demo.sh  # another checkpoint of the zoo
set -euo pipefail
cd "$(dirname "$0")/.."
data_root=../shared/data
if [ "${1:-}" = "--data-root" ]; then
    data_root=${2:?--data-root needs a directory}
    shift 2
fi
model=${MODEL:-sgdrop_resnet10t.imagenette_128_ema_head}
out=runs/demo
bash scripts/setup.sh
zoo=.venv/bin/sgdrop-zoo
# each step writes a new folder: a previous demo's results are moved aside, not overwritten
if [ -e "$out" ]; then
    mv "$out" "$out.$(date +%Y%m%d-%H%M%S)"
fi

echo "== 1/3 $model on 200 Imagenette validation images (what was loaded)"
$zoo finetune --model "$model" --data "$data_root/imagenette" --evaluate --val-subset-per-class 20 \
    --output "$out/imagenette_check" > /dev/null
echo "== 2/3 fine-tune it with SGDrop (rho 0.01) on 1,000 EuroSAT images at 96 px, validated on 500"
# 96 px: a latent map of 3x3 positions (the zoo's networks divide the side by 32), so that the Grad-CAM maps show
# where the evidence is; EuroSAT's own 64 px gives 2x2, the checkpoint's 128 px has 1.8 times the pixels
$zoo finetune --model "$model" --data "$data_root/eurosat" --mode full --sgdrop-rho 0.01 --epochs 5 \
    --image-size 96 --train-subset-per-class 100 --val-subset-per-class 50 --output "$out/eurosat" > /dev/null
echo "== 3/3 Grad-CAM saliency of the fine-tuned model on EuroSAT"
$zoo saliency --model "$out/eurosat" --label "$model on EuroSAT" --data "$data_root/eurosat" --num-images 200 \
    --output "$out/saliency" > /dev/null

.venv/bin/python - "$model" "$out" <<'EOF'
import json, sys
model, out = sys.argv[1:]
check = json.load(open(f'{out}/imagenette_check/metrics.json'))['val']
tuned = json.load(open(f'{out}/eurosat/metrics.json'))
print(f'{model}: Imagenette top-1 {check["acc1"]:.1f}% on {check["count"]} validation images')
print(f'fine-tuned with SGDrop: EuroSAT top-1 {tuned["val_acc1"]:.1f}% on {tuned["val_count"]} validation images '
      f'(its best epoch, {tuned["best_epoch"]} of 5), weights in {out}/eurosat')
print(f'saliency grid: {out}/saliency/saliency_grid.png')
EOF
