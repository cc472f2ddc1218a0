"""Ship the zoo's checkpoints: the SGDrop run of the median seed of each family of a finished study.

For every architecture the zoo protocol of ``benchmarks/reproduce.py`` ships (those plain timm can rebuild), takes the
SGDrop run whose final val top-1 is the median of its seeds (the lower middle one for an even count; the rule was fixed
before training), and writes:

- ``hub_configs/<arch>.<tag>/``: the folder of a Hub repo (``model.safetensors`` in float16, timm ``config.json``,
  model card ``README.md``), ready for ``sgdrop-zoo publish hub_configs/<arch>.<tag> --repo-id ORG/<arch>.<tag>``;
- ``hub_configs/<arch>.<tag>.json``: its record (sha256, preprocessing, SGDrop settings, every seed's top-1, the
  vanilla twin's, the commands), which registers the tag with timm.

The shipped float16 weights are evaluated as timm users evaluate a model, ``resolve_model_data_config(model)`` +
``create_transform(**cfg)`` on an ImageFolder, on the whole validation split; the script stops if that top-1 differs
from the study's float32 figure by more than 0.1 points. It also records the exact number of correct images on a fixed
100-image subset of the split, which the tests check on every run.

    python benchmarks/ship_zoo.py --data ../shared/data/imagenette

Seeds that finish after a checkpoint shipped change its record, not its weights, while the median seed stays the
same; ``--keep-weights`` then re-evaluates the shipped folder and rewrites its record and card without the run folders:

    python benchmarks/ship_zoo.py --data ../shared/data/imagenette --archs sgdrop_vgg11 --keep-weights
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.data import ImageNetInfo, create_transform, resolve_model_data_config
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets

from sgdrop_zoo.export import read_config, to_hub_config, write_config
from sgdrop_zoo.hub import hub_config_record, prepare_hub_folder
from sgdrop_zoo.model_card import render_model_card
from sgdrop_zoo.pretrained import CONFIG_NAME, WEIGHTS_NAME, sha256_of_file

from reproduce import PROTOCOLS  # benchmarks/reproduce.py, beside this script

REPO = Path(__file__).resolve().parents[1]
TAG = 'imagenette_64'
DATASET = 'imagenette'
CHECK_IMAGES = 100  # size of the fixed validation subset whose correct count the tests compare
MAX_TOP1_DRIFT = 0.1  # points of top-1 the float16 weights may differ by from the study's float32 figure


def check_indices(num_images: int) -> list[int]:
    """The fixed validation images of the tests' check: the first 100 of a seed-0 permutation, in folder order."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(0)).tolist()
    return sorted(order[:CHECK_IMAGES])


@torch.no_grad()
def correct_count(model: torch.nn.Module, root: Path, indices: Optional[list[int]] = None,
                  batch_size: int = 100) -> int:
    """Number of correctly classified images of ``root`` (an ImageFolder split), with timm's eval transform."""
    transform = create_transform(**resolve_model_data_config(model))
    dataset = datasets.ImageFolder(str(root), transform=transform)
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=2)
    model.eval()
    return sum(int((model(images).argmax(1) == targets).sum()) for images, targets in loader)


def forward_gflops(model: torch.nn.Module) -> float:
    """GFLOPs (2 per multiply-add) of one image's forward pass at the model's input size."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, *model.pretrained_cfg['input_size']))
    return counter.get_total_flops() / 1e9


def mean_std(values: list[float]) -> dict[str, float]:
    return dict(mean=round(statistics.mean(values), 2),
                std=round(statistics.stdev(values), 2) if len(values) > 1 else 0.0)


def by_seed(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {str(r['seed']): r['final_val_acc1'] for r in sorted(runs, key=lambda r: r['seed'])}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: (r['final_val_acc1'], r['seed']))
    return ordered[(len(ordered) - 1) // 2]


def to_float16(path: Path) -> None:
    """Store the floating-point tensors of a safetensors file in float16 (integer buffers are kept)."""
    state_dict = load_file(path)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    save_file(half, path, metadata={'format': 'pt'})


def export_run(name: str, source: Path, folder: Path) -> dict[str, Any]:
    """Write a run's last-epoch checkpoint as a Hub-repo folder (float16 weights, timm config.json); its record."""
    info = ImageNetInfo()
    descriptions = {synset: info.label_name_to_description(synset) for synset in info.label_names()}
    record = prepare_hub_folder(source, folder, f'sgdrop-zoo/{name}', dataset=DATASET, tag=TAG,
                                label_descriptions=descriptions)
    to_float16(folder / WEIGHTS_NAME)
    return record


def reuse_shipped(name: str, seed: int, shipped: Path, folder: Path) -> dict[str, Any]:
    """Copy the weights already shipped as ``name`` into ``folder``, with their config.json in the current schema.

    For a study that gained seeds after shipping, once its run folders are gone: the median seed must still be the
    shipped one, and the shipped weights must still have the record's sha256.

    Returns:
        The record of the rewritten config.json, as ``prepare_hub_folder`` returns it.
    """
    record = json.loads((shipped.parent / f'{name}.json').read_text())
    if record['metrics']['seed'] != seed:
        raise SystemExit(f'error: {name}: the median seed is now {seed}, the shipped weights are seed '
                         f'{record["metrics"]["seed"]}\'s; ship it from its run folder (without --keep-weights)')
    if sha256_of_file(shipped / WEIGHTS_NAME) != record['sha256']:
        raise SystemExit(f"error: {name}: {shipped / WEIGHTS_NAME} does not have its record's sha256; restore it "
                         f'(git checkout) or ship from the run folder')
    shutil.copyfile(shipped / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    config = to_hub_config(read_config(shipped / CONFIG_NAME))
    write_config(config, folder)
    return hub_config_record(config, record['sha256'], f'sgdrop-zoo/{name}', DATASET, TAG, record['license'])


def ship(arch: str, runs: list[dict[str, Any]], data: Path, runs_dir: Path, results_dir: Path,
         overhead: dict[str, Any], keep_weights: bool = False) -> dict[str, Any]:
    sgdrop_runs = [r for r in runs if r['arch'] == arch and r['method'] == 'sgdrop']
    vanilla_runs = [r for r in runs if r['arch'] == arch and r['method'] == 'vanilla']
    chosen = median_run(sgdrop_runs)
    name = f'{arch}.{TAG}'
    folder = REPO / 'hub_configs' / name
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f'.{name}.') as tmp:
        if keep_weights:
            record = reuse_shipped(name, chosen['seed'], folder, Path(tmp))
        else:
            # the last epoch's weights, which the study's top-1 measures (the run's own export holds its best epoch's)
            source = runs_dir / f'{arch}__sgdrop__seed{chosen["seed"]}' / 'checkpoint.pth.tar'
            record = export_run(name, source, Path(tmp))
        config = read_config(Path(tmp) / CONFIG_NAME)

        model = timm.create_model(f'local-dir:{tmp}', pretrained=True)
        val = data / 'val'
        num_val = len(datasets.ImageFolder(str(val)))
        correct = correct_count(model, val)
        top1 = round(100 * correct / num_val, 3)
        if abs(top1 - chosen['final_val_acc1']) > MAX_TOP1_DRIFT:
            raise SystemExit(f"error: {name}: the float16 weights give {top1}% top-1 with timm's transform, the "
                             f'study measured {chosen["final_val_acc1"]}%: more than {MAX_TOP1_DRIFT} points apart')
        check = correct_count(model, val, check_indices(num_val))

        seeds, vanilla = (mean_std([r['final_val_acc1'] for r in group]) for group in (sgdrop_runs, vanilla_runs))
        command = (f'python benchmarks/ship_zoo.py --data ../shared/data/{data.name} '
                   f'--results-dir {os.path.relpath(results_dir, REPO)} --archs {arch}')
        record.update(
            hf_hub_id=None,
            local_dir=name,
            crop_mode=config['pretrained_cfg'].get('crop_mode', 'center'),
            metrics=dict(
                top1=top1,
                split='val',
                num_images=num_val,
                correct=correct,
                top1_float32=chosen['final_val_acc1'],
                seed=chosen['seed'],
                seeds_top1=by_seed(sgdrop_runs),
                seeds_top1_mean=seeds['mean'],
                seeds_top1_std=seeds['std'],
                vanilla_top1=by_seed(vanilla_runs),
                vanilla_top1_mean=vanilla['mean'],
                vanilla_top1_std=vanilla['std'],
                params=sum(p.numel() for p in model.parameters()),
                file_mib=round((Path(tmp) / WEIGHTS_NAME).stat().st_size / 2 ** 20, 2),
                gflops=round(forward_gflops(model), 3),
                step_overhead=overhead[arch]['sgdrop_ema_overhead'],
                step_overhead_command=overhead[arch]['command'],
                area_ratio=round(statistics.mean(r['curve'][-1]['val_area_ratio'] for r in sgdrop_runs), 3),
                vanilla_area_ratio=round(statistics.mean(r['curve'][-1]['val_area_ratio'] for r in vanilla_runs), 3),
                check=dict(images=CHECK_IMAGES, rule='first 100 of torch.randperm(num_images, seed 0), folder order',
                           correct=check),
                train_command=chosen['command'],
                eval_command=chosen['final_eval_command'],
                # the command that exported the weights; a --keep-weights run only rewrote the figures
                ship_command=command,
                **(dict(record_command=f'{command} --keep-weights') if keep_weights else {}),
                results=os.path.relpath(results_dir / f'{arch}__sgdrop__seed{chosen["seed"]}.json', REPO),
            ),
            sha256=sha256_of_file(Path(tmp) / WEIGHTS_NAME),
        )
        render_model_card([record], checkpoint=record).save(Path(tmp) / 'README.md')
        # a Hub repo's files are for everyone to read (TemporaryDirectory and safetensors create them private)
        for path in Path(tmp).iterdir():
            path.chmod(0o644)
        Path(tmp).chmod(0o755)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        Path(tmp).mkdir()  # TemporaryDirectory removes its path on exit
    (REPO / 'hub_configs' / f'{name}.json').write_text(json.dumps(record, indent=2) + '\n')
    print(f'{name}: seed {chosen["seed"]}, top-1 {top1} (study {chosen["final_val_acc1"]}), check {check}/'
          f'{CHECK_IMAGES}, {(folder / WEIGHTS_NAME).stat().st_size / 2 ** 20:.1f} MiB', flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', type=Path, required=True, help="the study's ImageFolder root (train/ and val/)")
    parser.add_argument('--results-dir', type=Path, default=REPO / 'benchmarks' / 'results' / 'zoo_cpu')
    parser.add_argument('--runs-dir', type=Path, default=REPO / 'runs' / 'reproduce' / 'zoo',
                        help="the study's recipe output folders")
    parser.add_argument('--archs', nargs='+', default=PROTOCOLS['zoo']['ship'], choices=PROTOCOLS['zoo']['ship'],
                        help="ship only these of the zoo protocol's architectures (default: all of them)")
    parser.add_argument('--keep-weights', action='store_true',
                        help='re-evaluate and re-record the weights already in hub_configs/ instead of exporting them '
                             'from --runs-dir (after seeds were added; the median seed must be unchanged)')
    args = parser.parse_args()
    protocol = PROTOCOLS['zoo']
    runs = [json.loads(p.read_text()) for p in sorted(args.results_dir.glob('*__*__seed*.json'))]
    missing = [arch for arch in args.archs if not any(r['arch'] == arch for r in runs)]
    if missing:
        sys.exit(f'error: no run results of {", ".join(missing)} in {args.results_dir}; run benchmarks/reproduce.py '
                 f'zoo first')
    # benchmarks/overhead.py results, one file per set of --model-kwargs
    overhead = {}
    for name in protocol['overhead']:
        report = json.loads((args.results_dir / name).read_text())
        overhead.update({arch: dict(result, command=report['command']) for arch, result in report['results'].items()})
    for arch in args.archs:
        ship(arch, runs, args.data.resolve(), args.runs_dir.resolve(), args.results_dir.resolve(), overhead,
             args.keep_weights)


if __name__ == '__main__':
    main()
