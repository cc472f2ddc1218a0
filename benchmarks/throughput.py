"""Training throughput (images per second) of train/main.py: vanilla vs SGDrop, in-memory data vs ImageFolder decoding.

Each configuration is a real run of the recipe on a fixed number of training images: the first epoch warms up
(allocator, oneDNN/cuDNN plans, the SGDrop EMA copy), then the best `img_per_s` of the following epochs, from the
recipe's own log.jsonl, is reported (best, not mean: on a shared machine other jobs only ever slow an epoch down).
The dataset is a temporary ImageFolder of links into DATA with one validation image per class, so validation adds
almost nothing to the run.

CPU, small size (the committed benchmarks/results/throughput_cpu.json):
    python benchmarks/throughput.py ../shared/data/imagenette --image-size 64 --batch-size 32 --steps 4 \
        --measure-epochs 3 --workers 2 --output benchmarks/results/throughput_cpu.json
GPU (one H100, bf16, channels_last, batch 256):
    python benchmarks/throughput.py ../shared/data/imagenette --image-size 224 --batch-size 256 --steps 20 \
        --measure-epochs 2 --workers 16 --gpu-flags --output benchmarks/results/throughput_gpu.json
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / 'train' / 'main.py'


def build_linked_dataset(data: Path, root: Path, num_train: int) -> None:
    """ImageFolder at `root` of symlinks: `num_train` training images spread over the classes, one val image each."""
    classes = sorted(p.name for p in (data / 'train').iterdir() if p.is_dir())
    per_class = -(-num_train // len(classes))
    for split, count in (('train', per_class), ('val', 1)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for image in sorted((data / split / name).iterdir())[:count]:
                (root / split / name / image.name).symlink_to(image.resolve())


def run_config(dataset: Path, output: Path, arch: str, regularizer: str, in_memory: bool,
               args: argparse.Namespace) -> dict:
    num_train = args.batch_size * args.steps
    command = [sys.executable, str(RECIPE), str(dataset), '-a', arch, '--regularizer', regularizer,
               '--image-size', str(args.image_size), '-b', str(args.batch_size),
               '--epochs', str(1 + args.measure_epochs),
               '--train-subset', str(num_train), '--train-eval-samples', '0', '-j', str(args.workers),
               '-p', '1000', '--seed', '0', '--output', str(output)]
    if in_memory:
        command.append('--in-memory')
    if args.gpu_flags:
        command += ['--amp', '--channels-last']
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f'error: {shlex.join(command)} failed:\n{result.stderr[-2000:]}')
    warmup, *measured = [json.loads(line) for line in (output / 'log.jsonl').read_text().splitlines()]
    return {
        'arch': arch,
        'regularizer': regularizer,
        'data': 'in_memory' if in_memory else 'imagefolder',
        'img_per_s': round(max(epoch['img_per_s'] for epoch in measured), 2),
        'img_per_s_per_epoch': [round(epoch['img_per_s'], 2) for epoch in measured],
        'warmup_epoch_time_s': round(warmup['epoch_time_s'], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('data', type=Path, help='ImageFolder dataset with train/ and val/')
    parser.add_argument('--arch', default='sgdrop_resnet50')
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--steps', type=int, default=20, help='training steps per epoch')
    parser.add_argument('--measure-epochs', type=int, default=2, help='epochs measured after the warmup epoch')
    parser.add_argument('--workers', type=int, default=4, help='data loading workers (ImageFolder decoding)')
    parser.add_argument('--gpu-flags', action='store_true', help='add --amp (bf16) and --channels-last')
    parser.add_argument('--output', type=Path, help='results JSON to write')
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix='throughput.') as tmp:
        dataset = Path(tmp) / 'data'
        build_linked_dataset(args.data, dataset, args.batch_size * args.steps)
        for in_memory in (True, False):
            for regularizer in ('none', 'sgdrop'):
                output = Path(tmp) / f'{regularizer}_{in_memory}'
                start = time.time()
                result = run_config(dataset, output, args.arch, regularizer, in_memory, args)
                results.append(result)
                print(f"{result['arch']:<18} {result['regularizer']:<7} {result['data']:<12} "
                      f"{result['img_per_s']:9.2f} img/s  (run {time.time() - start:.0f}s)", flush=True)

    by_key = {(r['regularizer'], r['data']): r['img_per_s'] for r in results}
    overhead = {data: round(by_key[('none', data)] / by_key[('sgdrop', data)] - 1, 3)
                for data in ('in_memory', 'imagefolder')}
    print(f'SGDrop step-time overhead vs vanilla: {overhead}')
    report = {
        'command': shlex.join([Path(sys.executable).name, *sys.argv]),
        'device': torch.cuda.get_device_name() if torch.cuda.is_available() else
        f'CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)',
        'torch': torch.__version__,
        'timm': timm.__version__,
        'settings': {'arch': args.arch, 'image_size': args.image_size, 'batch_size': args.batch_size,
                     'steps_per_epoch': args.steps, 'workers': args.workers, 'amp_bf16_channels_last': args.gpu_flags,
                     'measured_epochs': args.measure_epochs,
                     'measured': "best img_per_s of the epochs after a warmup epoch, from train/main.py's log.jsonl"},
        'results': results,
        'sgdrop_overhead': overhead,
    }
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + '\n')
        print(f'=> wrote {args.output}')


if __name__ == '__main__':
    main()
