"""The GPU check: what the CPU cannot show about the method and the recipe, in one command of at most 8 minutes.

Run it first thing whenever a GPU is lent, and commit its JSON (written again after every stage, so a run cut short
keeps what it measured):

    python benchmarks/gpu_check.py                 # one GPU: benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --smoke         # every stage on the CPU at toy sizes, in seconds (the tests run it)

Stages, in order; one whose estimated cost exceeds the time left is recorded as skipped:

1. ``eval_equals_timm``: each SGDrop family in eval mode gives plain timm's base model's logits bit for bit (float32,
   and bf16 autocast with channels_last);
2. ``step_overhead``: training-step time of SGDrop (ema, online, ema_head) against vanilla for sgdrop_resnet50,
   sgdrop_convnext_tiny and sgdrop_vgg16 at 224 px, batch 64, bf16, channels_last (``benchmarks/overhead.py``), with
   a check that every weight stays finite; the paper's Table 9: +30%, +25%, +33%;
3. ``host_syncs``: the host-device synchronisations of the recipe's training epoch, per data path (in memory,
   ImageFolder): a handful at the epoch's end is the design, one or more per step is a regression;
4. ``exact_k_autocast``: under bf16 autocast the mask drops exactly k = floor(rho N) features, for the three families;
5. ``recipe``: ``train/main.py`` for 2 epochs on the GPU with ``--in-memory`` on images the check makes, its
   checkpoint evaluated on the CPU (the same top-1 as logged), then resumed for a third epoch;
6. ``compile``: ``torch.compile`` of an SGDrop training step: the first step's time and the graph breaks.

The GPU machine receives the working tree only (at most 64 MiB, without ``../shared``): the check makes its own data.
The shipped weights under ``hub_configs/`` are 81 MiB; to keep them from travelling, run the check from a worktree
that leaves them out, e.g. ``git worktree add /tmp/check HEAD && cd /tmp/check && git rm -q --cached -r
hub_configs/*/model.safetensors && rm hub_configs/*/model.safetensors`` (no stage reads them). The JSON records the
torch, timm and CUDA versions the GPU's image ran with, which may not be those pinned in pyproject.toml.
"""
import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn as nn
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import sgdrop_zoo  # noqa: F401, registers the sgdrop_* architectures
from sgdrop_zoo.sgdrop import num_dropped_features

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / 'benchmarks'), str(REPO / 'train')]
import overhead  # noqa: E402, benchmarks/overhead.py
from recipe_data import build_loaders  # noqa: E402, train/recipe_data.py

# the paper's families at the paper's size, and the zoo's small members for --smoke, with their architecture arguments
FAMILIES = {'full': {'sgdrop_resnet50': {}, 'sgdrop_convnext_tiny': {}, 'sgdrop_vgg16': {}},
            'smoke': {'sgdrop_resnet10t': {}, 'sgdrop_convnext_atto': {}, 'sgdrop_vgg11': {'mlp_ratio': 0.03125}}}
# per stage, the seconds it is expected to take on one H100 (full) or 2 CPU cores (smoke): skipped beyond the time left
STAGE_COST_S = {'eval_equals_timm': (30, 10), 'step_overhead': (120, 20), 'host_syncs': (30, 10),
                'exact_k_autocast': (20, 10), 'recipe': (120, 60), 'compile': (150, 30)}


def load_recipe() -> Any:
    """``train/main.py`` as a module: its training epoch and argument parser."""
    spec = importlib.util.spec_from_file_location('recipe_main', REPO / 'train' / 'main.py')
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def make_image_folder(root: Path, classes: int, train: int, val: int, size: int) -> Path:
    """An ImageFolder of random RGB images, ``train`` and ``val`` per class, each class a tint of its own."""
    rng = np.random.default_rng(0)
    for split, count in (('train', train), ('val', val)):
        for c in range(classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 160, (size, size, 3)) + np.eye(3, dtype=np.int64)[c % 3] * 90
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i}.png')
    return root


def eval_equals_timm(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    results = {}
    images = torch.randn(4, 3, args.image_size, args.image_size, device=device)
    for name, model_kwargs in args.families.items():
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, **model_kwargs).to(device).eval()
        base = timm.create_model(name.removeprefix('sgdrop_'), num_classes=10, **model_kwargs).to(device).eval()
        base.load_state_dict(model.state_dict())
        with torch.no_grad():
            float32 = torch.equal(model(images), base(images))
            model, base = (m.to(memory_format=torch.channels_last) for m in (model, base))
            with torch.autocast(device.type, dtype=torch.bfloat16):
                bf16 = torch.equal(model(images.to(memory_format=torch.channels_last)),
                                   base(images.to(memory_format=torch.channels_last)))
        results[name] = {'float32': float32, 'bf16_channels_last': bf16}
    return results


def step_overhead(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    settings = argparse.Namespace(image_size=args.image_size, batch_size=args.batch_size, num_classes=10,
                                  warmup=args.warmup, steps=args.steps, amp=True, channels_last=True)
    return {name: overhead.time_family(name, argparse.Namespace(**vars(settings), model_kwargs=model_kwargs), device)
            for name, model_kwargs in args.families.items()}


class CountHostReads(TorchDispatchMode):
    """Counts the aten ops that read a tensor back to the host (``.item()``, ``bool(tensor)``): on a CPU the only
    trace of what would be a GPU synchronisation. Not while ``paused``: the data transforms' reads of CPU tensors
    are no synchronisation on any device."""

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += '_local_scalar_dense' in str(func) and not self.paused
        return func(*args, **(kwargs or {}))


def step_batches(loader: Any, counter: Any) -> Iterator[Any]:
    """The batches of ``loader``, with the host reads of making them (on the CPU, in the data path) not counted."""
    batches = iter(loader)
    while True:
        counter.paused = True
        batch = next(batches, None)
        counter.paused = False
        if batch is None:
            return
        yield batch


class CountedLoader:
    """A loader whose batches are made outside the count of ``counter`` (``step_batches``)."""

    def __init__(self, loader: Any, counter: Any):
        self.loader, self.counter, self.sampler = loader, counter, loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return step_batches(self.loader, self.counter)


@contextlib.contextmanager
def count_syncs(device: torch.device) -> Iterator[Any]:
    """The host-device synchronisations inside the block, as ``counter.count``: CUDA's sync debug mode on a GPU, host
    reads on the CPU."""
    if device.type == 'cuda':
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            counter = argparse.Namespace(paused=False)  # CUDA's sync warnings come from GPU work only
            try:
                yield counter
            finally:
                torch.cuda.set_sync_debug_mode('default')
                counter.count = sum('synchroniz' in str(w.message) for w in caught)
    else:
        with CountHostReads() as counter:
            yield counter


def host_syncs(args: argparse.Namespace, device: torch.device, data: Path) -> dict[str, Any]:
    recipe = load_recipe()
    results = {}
    for in_memory in (True, False):
        run_args = recipe.parse_args([str(data), '-a', next(iter(args.families)), '--image-size',
                                      str(args.recipe_size), '-b', '8', '-j', '0', '-p', '100000', '--seed', '0',
                                      '--sgdrop-rho', '0.1'])
        process = recipe.Process(device=device, rank=0, world_size=1, distributed=False, batch_size=8, workers=0)
        model = recipe.create_model(run_args, num_classes=4).to(device)
        loaders = build_loaders(data, run_args.image_size, 'crop-flip', model.pretrained_cfg['mean'],
                                model.pretrained_cfg['std'], 8, 0, device, in_memory=in_memory)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')
        with count_syncs(device) as counter:
            recipe.train(CountedLoader(loaders.train, counter), model, model, nn.CrossEntropyLoss(), optimizer,
                         torch.amp.GradScaler(device.type, enabled=False), autocast, 0, process, run_args)
        results['in_memory' if in_memory else 'imagefolder'] = {'steps': len(loaders.train), 'syncs': counter.count}
    return results


def exact_k_autocast(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    results = {}
    images, target = torch.randn(8, 3, args.image_size, args.image_size, device=device), torch.arange(8, device=device)
    for name, model_kwargs in args.families.items():
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10, sgdrop_rho=0.01, sgdrop_attribution='online',
                                  **model_kwargs).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            features = model.train().forward_features(images)
            keep = model.saliency_keep_mask(images, features, target)
        k = num_dropped_features(0.01, features[0].numel())
        results[name] = {'k': k, 'dropped': (~keep).flatten(1).sum(1).tolist()}
    return results


def recipe_run(args: argparse.Namespace, device: torch.device, data: Path) -> dict[str, Any]:
    run = data.parent / 'run'
    common = [sys.executable, 'train/main.py', str(data), '-a', next(iter(args.families)), '--image-size',
              str(args.recipe_size), '-b', '16', '-j', '0', '--seed', '0', '--optimizer', 'adam', '--lr', '1e-3',
              '--train-eval-samples', '0', '--output', str(run)]
    cpu_only = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    start = time.time()
    trained = subprocess.run([*common, '--epochs', '2', '--in-memory'], cwd=REPO, capture_output=True, text=True)
    train_s = time.time() - start
    if trained.returncode != 0:
        return {'error': trained.stderr.strip().splitlines()[-1:]}
    log = [json.loads(line) for line in (run / 'log.jsonl').read_text().splitlines()]
    metrics = data.parent / 'metrics.json'
    evaluated = subprocess.run([*common, '--resume', str(run / 'checkpoint.pth.tar'), '--evaluate', '--metrics-json',
                                str(metrics)], cwd=REPO, capture_output=True, text=True, env=cpu_only)
    cpu_acc1 = json.loads(metrics.read_text())['acc1'] if evaluated.returncode == 0 else None
    resumed = subprocess.run([*common, '--epochs', '3', '--in-memory', '--resume', str(run / 'checkpoint.pth.tar')],
                             cwd=REPO, capture_output=True, text=True)
    epochs = [json.loads(line)['epoch'] for line in (run / 'log.jsonl').read_text().splitlines()]
    return {'train_2_epochs_s': round(train_s, 1), 'logged_val_acc1': log[-1]['val_acc1'],
            'cpu_evaluate_val_acc1': cpu_acc1, 'resumed_ok': resumed.returncode == 0, 'epochs_after_resume': epochs}


def compile_step(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = timm.create_model(next(iter(args.families)), num_classes=10, sgdrop_rho=0.01).to(device).train()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    target = torch.randint(0, 10, (args.batch_size,), device=device)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=args.compile_backend)
    times = []
    for _ in range(3):
        start = time.time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda'):
            loss = nn.functional.cross_entropy(compiled(images, target=target), target)
        loss.backward()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(round(time.time() - start, 3))
    return {'backend': args.compile_backend, 'step_s': times, 'graph_breaks': sum(counters['graph_break'].values()),
            'loss_finite': math.isfinite(loss.item())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--smoke', action='store_true', help='every stage on the CPU at toy sizes')
    parser.add_argument('--budget-s', type=float, default=480, help='stop starting stages after this many seconds')
    parser.add_argument('--output', type=Path, default=None,
                        help='the JSON (default: benchmarks/results/gpu_check.json, gpu_check_smoke.json)')
    args = parser.parse_args()
    smoke = args.smoke
    device = torch.device('cpu' if smoke or not torch.cuda.is_available() else 'cuda')
    if device.type == 'cpu' and not smoke:
        raise SystemExit('error: no GPU here; pass --smoke to run every stage on the CPU at toy sizes')
    args.families = FAMILIES['smoke' if smoke else 'full']
    args.image_size, args.batch_size = (32, 2) if smoke else (224, 64)
    args.warmup, args.steps = (0, 1) if smoke else (5, 20)
    args.recipe_size = 32 if smoke else 64
    args.compile_backend = 'eager' if smoke else 'inductor'
    output = args.output or REPO / 'benchmarks' / 'results' / f"gpu_check{'_smoke' if smoke else ''}.json"
    report = {'command': ' '.join(['python', 'benchmarks/gpu_check.py', *sys.argv[1:]]),
              'device': torch.cuda.get_device_name() if device.type == 'cuda' else f'cpu ({platform.processor()})',
              'versions': {'torch': torch.__version__, 'timm': timm.__version__, 'cuda': torch.version.cuda,
                           'python': platform.python_version()},
              'git_commit': subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True,
                                           text=True).stdout.strip() or None,
              'stages': {}}
    start = time.time()
    with tempfile.TemporaryDirectory(prefix='gpu-check.') as tmp:
        data = make_image_folder(Path(tmp) / 'data', classes=4, train=4 if smoke else 16, val=2 if smoke else 8,
                                 size=args.recipe_size)
        stages = {'eval_equals_timm': lambda: eval_equals_timm(args, device),
                  'step_overhead': lambda: step_overhead(args, device),
                  'host_syncs': lambda: host_syncs(args, device, data),
                  'exact_k_autocast': lambda: exact_k_autocast(args, device),
                  'recipe': lambda: recipe_run(args, device, data),
                  'compile': lambda: compile_step(args, device)}
        for name, stage in stages.items():
            left = args.budget_s - (time.time() - start)
            if STAGE_COST_S[name][smoke] > left:
                report['stages'][name] = {'skipped': f'{left:.0f} s left, it takes about {STAGE_COST_S[name][smoke]}'}
            else:
                stage_start = time.time()
                report['stages'][name] = dict(stage(), seconds=round(time.time() - stage_start, 1))
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(report, indent=1) + '\n')
            print(f'{name}: {json.dumps(report["stages"][name])}', flush=True)
    print(f'wrote {output}')


if __name__ == '__main__':
    main()
