"""Training-step overhead of SGDrop (ema, online and ema_head attribution) against the same model without it.

Each family is timed with the four variants interleaved step by step on the same batch, so that drift in machine
load hits them alike; the reported figure is the median step time and its ratio to vanilla. SGDrop runs at the rho
the family trains with (train/presets.json: 0.1 for ConvNeXt, 0.01 otherwise), which sets the mask's top-k size.
Compare with the paper's Table 9 (batch 64, per step): VGG16 +33%, ResNet50 +30%, ConvNeXt +25%.

    python benchmarks/overhead.py                         # CPU defaults: 64 px, batch 8
    python benchmarks/overhead.py --image-size 224 --batch-size 64 --amp --channels-last   # on a GPU
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.utils import ParseKwargs

import sgdrop_zoo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'train'))
from presets import load_presets, rho_for_arch  # noqa: E402, train/presets.py

# SGDrop at the rho each family trains with (the low-data preset's, train/presets.json). Vanilla is
# the recipe's --regularizer none: rho 0 with online attribution, so that it neither builds nor updates an EMA network
VARIANTS = {
    'vanilla': dict(sgdrop_rho=0.0, sgdrop_attribution='online'),
    'sgdrop_ema': dict(sgdrop_attribution='ema'),
    'sgdrop_online': dict(sgdrop_attribution='online'),
    'sgdrop_ema_head': dict(sgdrop_attribution='ema_head'),
}
PAPER_OVERHEAD = {'sgdrop_vgg16': 0.3324, 'sgdrop_resnet50': 0.30, 'sgdrop_convnext_tiny': 0.25}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(PAPER_OVERHEAD), help='timm model names')
    parser.add_argument('--image-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--num-classes', type=int, default=10)
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help="architecture arguments of every model, as timm's train.py takes them")
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per variant')
    parser.add_argument('--steps', type=int, default=5, help='timed steps per variant')
    parser.add_argument('--amp', action='store_true', help='bf16 autocast')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--output', type=Path, default=None, help='results JSON (default: benchmarks/results/)')
    return parser.parse_args()


def train_step(model, optimizer, images, target, amp: bool) -> None:
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(images, target=target), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.update_ema()


def time_family(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    images = images.to(memory_format=memory_format)
    target = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    runs = {}
    rho = rho_for_arch(name, load_presets()['lowdata'])
    for variant, kwargs in VARIANTS.items():
        model = timm.create_model(name, num_classes=args.num_classes, **{'sgdrop_rho': rho, **kwargs},
                                  **args.model_kwargs)
        model = model.to(device, memory_format=memory_format)
        runs[variant] = (model.train(), torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for step in range(args.warmup + args.steps):
        for variant, (model, optimizer) in runs.items():
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(model, optimizer, images, target, args.amp)
            if device.type == 'cuda':
                torch.cuda.synchronize()
            if step >= args.warmup:
                times[variant].append(time.perf_counter() - start)
    medians = {variant: statistics.median(values) for variant, values in times.items()}
    finite = all(torch.isfinite(p).all() for model, _ in runs.values() for p in model.parameters())
    result = {f'{variant}_ms': round(1000 * value, 2) for variant, value in medians.items()}
    for variant in ('sgdrop_ema', 'sgdrop_online', 'sgdrop_ema_head'):
        result[f'{variant}_overhead'] = round(medians[variant] / medians['vanilla'] - 1, 4)
    result['sgdrop_rho'] = rho
    result['weights_finite'] = bool(finite)
    result['paper_overhead'] = PAPER_OVERHEAD.get(name)
    return result


def main() -> None:
    args = parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    results = {}
    for name in args.models:
        results[name] = time_family(name, args, device)
        print(f'{name:24s} ' + '  '.join(f'{k}={v}' for k, v in results[name].items()), flush=True)
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
    report = {
        'command': ' '.join(['python', 'benchmarks/overhead.py', *sys.argv[1:]]),
        'device': torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu',
        'threads': torch.get_num_threads(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'sgdrop_zoo': sgdrop_zoo.__version__,
        'git_commit': commit,
        'settings': {k: v for k, v in vars(args).items() if k != 'output'},
        'results': results,
    }
    output = args.output or Path(__file__).parent / 'results' / f'overhead_{device.type}.json'
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + '\n')
    print(f'wrote {output}')


if __name__ == '__main__':
    main()
