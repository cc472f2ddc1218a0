"""Ship the zoo's checkpoints: the SGDrop run of the median seed of each family of a finished study, and its twin.

For every architecture a protocol of ``benchmarks/reproduce.py`` ships (those plain timm can rebuild), takes the run
of the protocol's SGDrop method whose final val top-1 is the median of its seeds (the lower middle one for an even
count; the rule was fixed before training) and, where the protocol ships twins, the vanilla run of the same seed
(tag suffix ``_vanilla``, each record naming the other as ``twin``), and writes for each:

- ``hub_configs/<arch>.<tag>/``: the folder of a Hub repo (``model.safetensors`` in float16, timm ``config.json``,
  model card ``README.md``), ready for ``sgdrop-zoo publish hub_configs/<arch>.<tag> --repo-id ORG/<arch>.<tag>``;
- ``hub_configs/<arch>.<tag>.json``: its record (sha256, preprocessing, SGDrop settings, every seed's top-1, the
  vanilla twin's, the commands), which registers the tag with timm.

The shipped float16 weights are evaluated as timm users evaluate a model, ``resolve_model_data_config(model)`` +
``create_transform(**cfg)`` on an ImageFolder, on the whole validation split; the script stops if that top-1 differs
from its run's float32 figure by more than 0.1 points. It also records the exact number of correct images on a fixed
100-image subset of the split, which the tests check on every run.

    python benchmarks/ship_zoo.py --data ../shared/data/imagenette --protocol zoo

Run folders do not outlive their session; ``reproduce.py --rerun`` trains a run again for its weights. On a CPU with
other kernels than the study's (AVX2 against AVX-512) that is a new run of the same command and seed, with its own
result in the results' ``reruns/`` subfolder: the folder's log tells which result its weights are, and the record
carries that result's figures (its ``rerun_of`` names the study's run) beside every seed of the study.

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

from sgdrop_zoo.data import fixed_order
from sgdrop_zoo.export import read_config, to_published_config, write_config
from sgdrop_zoo.hub import hub_config_record, prepare_hub_folder
from sgdrop_zoo.model_card import render_model_card
from sgdrop_zoo.pretrained import CONFIG_NAME, WEIGHTS_NAME, sha256_of_file
from sgdrop_zoo.run_files import read_log

from reproduce import PROTOCOLS, RERUNS, RESULTS, read_overhead, run_name  # benchmarks/reproduce.py, beside this script

REPO = Path(__file__).resolve().parents[1]
DATASET = 'imagenette'
CHECK_IMAGES = 100  # size of the fixed validation subset whose correct count the tests compare
MAX_TOP1_DRIFT = 0.1  # points of top-1 the float16 weights may differ by from the study's float32 figure


def check_indices(num_images: int) -> list[int]:
    """The fixed validation images of the tests' check: the first 100 of a seed-0 permutation, in folder order."""
    return sorted(fixed_order(num_images)[:CHECK_IMAGES])


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
    record = prepare_hub_folder(source, folder, f'sgdrop-zoo/{name}', dataset=DATASET, tag=name.split('.', 1)[1],
                                label_descriptions=descriptions)
    to_float16(folder / WEIGHTS_NAME)
    return record


def reuse_shipped(name: str, seed: int, shipped: Path, folder: Path) -> tuple[dict[str, Any], Path]:
    """Copy the weights already shipped as ``name`` into ``folder``, with their config.json in the current schema.

    For a study that gained seeds after shipping, once its run folders are gone: the median seed must still be the
    shipped one, and the shipped weights must still have the record's sha256.

    Returns:
        The record of the rewritten config.json, as ``prepare_hub_folder`` returns it, and the result JSON of the
        shipped weights that the old record names.
    """
    record = json.loads((shipped.parent / f'{name}.json').read_text())
    if record['metrics']['seed'] != seed:
        raise SystemExit(f'error: {name}: the median seed is now {seed}, the shipped weights are seed '
                         f'{record["metrics"]["seed"]}\'s; ship it from its run folder (without --keep-weights)')
    if sha256_of_file(shipped / WEIGHTS_NAME) != record['sha256']:
        raise SystemExit(f"error: {name}: {shipped / WEIGHTS_NAME} does not have its record's sha256; restore it "
                         f'(git checkout) or ship from the run folder')
    shutil.copyfile(shipped / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    config = to_published_config(read_config(shipped / CONFIG_NAME))
    write_config(config, folder)
    return (hub_config_record(config, record['sha256'], f'sgdrop-zoo/{name}', DATASET, name.split('.', 1)[1],
                              record['license']), REPO / record['metrics']['results'])


def choose_pair(runs: list[dict[str, Any]], arch: str, method: str) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """The runs a family ships: the ``method`` run of the median seed, and the vanilla run of the same seed (its twin:
    same initialisation and data order, no SGDrop), or None when the study has no vanilla run of that seed.

    Raises:
        SystemExit: The study has no ``method`` run of ``arch``.
    """
    shipped_runs = [r for r in runs if r['arch'] == arch and r['method'] == method]
    if not shipped_runs:
        raise SystemExit(f'error: no {method} run of {arch} among the results; run benchmarks/reproduce.py first')
    chosen = median_run(shipped_runs)
    twin = next((r for r in runs if r['arch'] == arch and r['method'] == 'vanilla' and r['seed'] == chosen['seed']),
                None)
    return chosen, twin


def rerun_command(run: dict[str, Any], data: Path) -> str:
    """The command that trains the study's ``run`` again, for its weights (``reproduce.py --rerun``)."""
    return (f"python benchmarks/reproduce.py {run['protocol']} --data {data} --archs {run['arch']} --methods "
            f"{run['method']} --seeds {run['seed']} --rerun")


def result_of_folder(run: dict[str, Any], results_dir: Path, folder: Path, data: Path) -> tuple[dict[str, Any], Path]:
    """The result whose weights a run folder holds, and its JSON: the study's ``run``, or ``run`` trained again with
    other CPU kernels (``reproduce.py --rerun``, in the ``RERUNS`` subfolder), told apart by the folder's log.

    Raises:
        SystemExit: The folder's per-epoch training loss and val top-1 are neither result's.
    """
    name = run_name(run['arch'], run['method'], run['seed'])
    candidates = [(run, results_dir / f'{name}.json')]
    rerun_path = results_dir / RERUNS / f'{name}.json'
    if rerun_path.is_file():
        candidates.append((json.loads(rerun_path.read_text()), rerun_path))
    logged = [(line['train_loss'], line['val_acc1']) for line in read_log(folder)]
    for result, path in candidates:
        if [(line['train_loss'], line['val_acc1']) for line in result['curve']] == logged:
            return result, path
    known = ' or '.join(os.path.relpath(path, REPO) for _, path in candidates)
    raise SystemExit(f'error: {folder} holds another run than {known}; train it again with {rerun_command(run, data)}')


def checkpoint_names(arch: str, tag: str) -> tuple[str, str]:
    """The tags of a family's SGDrop checkpoint and of its vanilla twin."""
    return f'{arch}.{tag}', f'{arch}.{tag}_vanilla'


def study_metrics(runs: list[dict[str, Any]], run: dict[str, Any], arch: str) -> dict[str, Any]:
    """The study's figures a record carries for the checkpoint of ``run``: every seed of its method and of vanilla,
    the mean attribution areas, the last epoch's SGDrop diagnostics, the commands that trained and evaluated it and,
    when ``run`` is a study run trained again with other CPU kernels, the result it re-trained and those kernels."""
    group = [r for r in runs if r['arch'] == arch and r['method'] == run['method']]
    vanilla_runs = [r for r in runs if r['arch'] == arch and r['method'] == 'vanilla']
    seeds, vanilla = (mean_std([r['final_val_acc1'] for r in rs]) for rs in (group, vanilla_runs))
    area = {name: round(statistics.mean(r['curve'][-1]['val_area_ratio'] for r in rs), 3)
            for name, rs in (('area_ratio', group), ('vanilla_area_ratio', vanilla_runs))
            if rs and all('val_area_ratio' in r['curve'][-1] for r in rs)}
    diagnostics = {key: run[key] for key in ('final_dropped_attribution_share', 'final_nonpositive_feature_share')
                   if run.get(key) is not None}
    return dict(
        top1_float32=run['final_val_acc1'],
        seed=run['seed'],
        method=run['method'],
        seeds_top1=by_seed(group),
        seeds_top1_mean=seeds['mean'],
        seeds_top1_std=seeds['std'],
        **(dict(vanilla_top1=by_seed(vanilla_runs), vanilla_top1_mean=vanilla['mean'],
                vanilla_top1_std=vanilla['std']) if vanilla_runs else {}),
        **area,
        **diagnostics,
        train_command=run['command'],
        eval_command=run['final_eval_command'],
        **({key: run[key] for key in ('rerun_of', 'cpu_capability')} if 'rerun_of' in run else {}),
    )


def measure(model: torch.nn.Module, val: Path, study_top1: float, name: str) -> dict[str, Any]:
    """Top-1 of the shipped weights on all of ``val`` with timm's eval transform, and the tests' fixed-subset count.

    Raises:
        SystemExit: The top-1 is more than ``MAX_TOP1_DRIFT`` points from the study's float32 figure.
    """
    num_val = len(datasets.ImageFolder(str(val)))
    correct = correct_count(model, val)
    top1 = round(100 * correct / num_val, 3)
    if abs(top1 - study_top1) > MAX_TOP1_DRIFT:
        raise SystemExit(f"error: {name}: the float16 weights give {top1}% top-1 with timm's transform, the study "
                         f'measured {study_top1}%: more than {MAX_TOP1_DRIFT} points apart')
    check = dict(images=CHECK_IMAGES, rule='first 100 of torch.randperm(num_images, seed 0), folder order',
                 correct=correct_count(model, val, check_indices(num_val)))
    return dict(top1=top1, split='val', num_images=num_val, correct=correct, check=check,
                params=sum(p.numel() for p in model.parameters()), gflops=round(forward_gflops(model), 3))


def write_folder(tmp: Path, folder: Path) -> None:
    """Put a finished Hub-repo folder in place of ``folder``, readable by all as a Hub repo's files are."""
    for path in tmp.iterdir():
        path.chmod(0o644)  # TemporaryDirectory and safetensors create them private
    tmp.chmod(0o755)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    tmp.mkdir()  # TemporaryDirectory removes its path on exit


def ship_checkpoint(name: str, run: dict[str, Any], runs: list[dict[str, Any]], data: Path, runs_dir: Path,
                    results_dir: Path, overhead: dict[str, Any], twin: Optional[str],
                    keep_weights: bool = False) -> dict[str, Any]:
    """Export (or, with ``keep_weights``, re-record) one checkpoint of the study into ``hub_configs/``: its folder
    and its record, which names its ``twin`` (the other checkpoint of the pair) when there is one."""
    arch = run['arch']
    folder = REPO / 'hub_configs' / name
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f'.{name}.') as tmp:
        if keep_weights:
            record, results_path = reuse_shipped(name, run['seed'], folder, Path(tmp))
            weights_run = json.loads(results_path.read_text())
        else:
            # the last epoch's weights, which the study's top-1 measures (the run's own export holds its best epoch's)
            source = runs_dir / run_name(arch, run['method'], run['seed']) / 'checkpoint.pth.tar'
            if not source.is_file():
                raise SystemExit(f'error: {name}: {source} is missing (run folders do not outlive their session); '
                                 f'train it again with {rerun_command(run, data)}')
            weights_run, results_path = result_of_folder(run, results_dir, source.parent, data)
            record = export_run(name, source, Path(tmp))
        config = read_config(Path(tmp) / CONFIG_NAME)
        model = timm.create_model(f'local-dir:{tmp}', pretrained=True)
        command = (f'python benchmarks/ship_zoo.py --data ../shared/data/{data.name} --protocol {run["protocol"]} '
                   f'--results-dir {os.path.relpath(results_dir, REPO)} --archs {arch}')
        record.update(
            hf_hub_id=None,
            local_dir=name,
            crop_mode=config['pretrained_cfg'].get('crop_mode', 'center'),
            **(dict(twin=twin) if twin else {}),
            metrics=dict(
                **measure(model, data / 'val', weights_run['final_val_acc1'], name),
                **study_metrics(runs, weights_run, arch),
                file_mib=round((Path(tmp) / WEIGHTS_NAME).stat().st_size / 2 ** 20, 2),
                **(dict(step_overhead=overhead[arch]['sgdrop_ema_overhead'],
                        step_overhead_command=overhead[arch]['command'])
                   if run['method'] != 'vanilla' and arch in overhead else {}),
                # the command that exported the weights; a --keep-weights run only rewrote the figures
                ship_command=command,
                **(dict(record_command=f'{command} --keep-weights') if keep_weights else {}),
                results=os.path.relpath(results_path, REPO),
            ),
            sha256=sha256_of_file(Path(tmp) / WEIGHTS_NAME),
        )
        render_model_card([record], checkpoint=record).save(Path(tmp) / 'README.md')
        write_folder(Path(tmp), folder)
    (REPO / 'hub_configs' / f'{name}.json').write_text(json.dumps(record, indent=2) + '\n')
    metrics = record['metrics']
    print(f'{name}: seed {run["seed"]}, top-1 {metrics["top1"]} (float32 {weights_run["final_val_acc1"]}), check '
          f'{metrics["check"]["correct"]}/{CHECK_IMAGES}, {metrics["file_mib"]:.1f} MiB', flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', type=Path, required=True, help="the study's ImageFolder root (train/ and val/)")
    parser.add_argument('--protocol', default='zoo', choices=sorted(p for p, c in PROTOCOLS.items() if 'ship' in c),
                        help='the reproduce.py protocol whose study is shipped')
    parser.add_argument('--results-dir', type=Path, default=None,
                        help="the study's results (default: benchmarks/results/reproduce_PROTOCOL, where reproduce.py "
                             "writes them)")
    parser.add_argument('--runs-dir', type=Path, default=None,
                        help="the study's recipe output folders (default: runs/reproduce/PROTOCOL)")
    parser.add_argument('--archs', nargs='+', default=None,
                        help="ship only these of the protocol's architectures (default: all it ships)")
    parser.add_argument('--keep-weights', action='store_true',
                        help='re-evaluate and re-record the weights already in hub_configs/ instead of exporting them '
                             'from --runs-dir (after seeds were added; the median seed must be unchanged)')
    args = parser.parse_args()
    protocol = PROTOCOLS[args.protocol]
    results_dir = (args.results_dir or RESULTS / protocol.get('results', f'reproduce_{args.protocol}')).resolve()
    runs_dir = (args.runs_dir or REPO / 'runs' / 'reproduce' / args.protocol).resolve()
    archs = args.archs or protocol['ship']
    unknown = sorted(set(archs) - set(protocol['ship']))
    if unknown:
        sys.exit(f"error: --archs {', '.join(unknown)}: the {args.protocol} protocol ships "
                 f"{', '.join(protocol['ship'])}")
    runs = [json.loads(p.read_text()) for p in sorted(results_dir.glob('*__*__seed*.json'))]
    missing = [arch for arch in archs if not any(r['arch'] == arch for r in runs)]
    if missing:
        sys.exit(f'error: no run results of {", ".join(missing)} in {results_dir}; run python benchmarks/reproduce.py '
                 f'{args.protocol} --data {args.data} first')
    overhead = read_overhead(args.protocol, results_dir)
    for arch in archs:
        method = protocol.get('ship_method', {}).get(arch, 'sgdrop')
        chosen, twin = choose_pair(runs, arch, method)
        name, twin_name = checkpoint_names(arch, protocol['tag'])
        # before anything is written: a checkpoint must not ship naming a twin that cannot follow it
        if protocol.get('ship_twins') and twin is None:
            sys.exit(f'error: no vanilla run of {arch} with seed {chosen["seed"]}, the twin of the checkpoint to '
                     f'ship; run it with python benchmarks/reproduce.py {args.protocol} --data {args.data} --archs '
                     f'{arch} --methods vanilla --seeds {chosen["seed"]}')
        ship_checkpoint(name, chosen, runs, args.data.resolve(), runs_dir, results_dir, overhead,
                        twin_name if protocol.get('ship_twins') else None, args.keep_weights)
        if protocol.get('ship_twins'):
            ship_checkpoint(twin_name, twin, runs, args.data.resolve(), runs_dir, results_dir, overhead, name,
                            args.keep_weights)


if __name__ == '__main__':
    main()
