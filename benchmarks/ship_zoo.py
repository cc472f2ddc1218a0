"""Ship the zoo's checkpoints: the SGDrop run of the median seed of each family of a finished study, and its twin.

For every architecture a protocol of ``benchmarks/reproduce.py`` ships (those plain timm can rebuild), takes the run
of the protocol's SGDrop method whose final val top-1 is the median of its seeds (the lower middle one for an even
count; the rule was fixed before training) and the vanilla run of the same seed, its twin (tag suffix
``_vanilla``, each record naming the other as ``twin``), and writes for each:

- ``hub_configs/<arch>.<tag>/``: the folder of a Hub repo (``model.safetensors`` in float16, timm ``config.json``,
  model card ``README.md``), ready for ``sgdrop-zoo publish hub_configs/<arch>.<tag> --repo-id ORG/<arch>.<tag>``;
- ``hub_configs/<arch>.<tag>.json``: its record (sha256, preprocessing, SGDrop settings, every seed's top-1, the
  vanilla twin's, the commands), which registers the tag with timm.

The shipped float16 weights are evaluated as timm users evaluate a model, ``resolve_model_data_config(model)`` +
``create_transform(**cfg)`` on an ImageFolder, on the whole validation split; the script stops if that top-1 differs
from its run's float32 figure by more than 0.1 points. It also records the exact number of correct images on a fixed
100-image subset of the split, which the tests check on every run.

    python benchmarks/ship_zoo.py --data ../shared/data/imagenette --protocol zoo128

Run folders do not outlive their session; ``reproduce.py --rerun`` trains a run again for its weights. On a CPU with
other kernels than the study's (AVX2 against AVX-512) that is a new run of the same command and seed, with its own
result in the results' ``reruns/`` subfolder: the folder's log tells which result its weights are, and the record
carries that result's figures (its ``rerun_of`` names the study's run) beside every seed of the study.

Seeds that finish after a checkpoint shipped change its record, not its weights, while the median seed stays the
same; ``--keep-weights`` then re-evaluates the shipped folder and rewrites its record and card without the run folders.
It takes any run's weights from the checkpoint whose record names the run, under its own tag or a new one (a new
method's pair whose twin is a run already shipped); the runs no checkpoint holds come from their run folders:

    python benchmarks/ship_zoo.py --data ../shared/data/imagenette --protocol zoo128 --archs sgdrop_vgg11 --keep-weights
"""
import argparse
import contextlib
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
from sgdrop_zoo.hub_files import CONFIG_NAME, WEIGHTS_NAME, sha256_of_file
from sgdrop_zoo.pretrained import checkpoint_description, record_notes
from sgdrop_zoo.run_files import read_log

from study import (  # benchmarks/study.py, beside this script
    PROTOCOLS,
    RERUNS,
    check_data_root,
    curve_difference,
    read_overhead,
    read_results,
    results_folder,
    run_name,
    runs_folder,
    step_overhead_figure,
)

REPO = Path(__file__).resolve().parents[1]
DATASET = 'imagenette'
# the data's terms (../shared/data/imagenette/README.md), which every record, card and tag of the zoo names
DATASET_LICENSE = ("Imagenette (fast.ai), Apache-2.0; its images are ImageNet's (ILSVRC-2012), under ImageNet's terms "
                   'of access')
# what timm's own pretrained cfgs say of their paper, copied from the architecture's cfg into each shipped config.json
PAPER_FIELDS = ('paper_ids', 'paper_name', 'origin_url')
CHECK_IMAGES = 100  # size of the fixed validation subset whose correct count the tests compare
MAX_TOP1_DRIFT = 0.1  # points of top-1 the float16 weights may differ by from the study's float32 figure
SHIPPED_FILES = (WEIGHTS_NAME, CONFIG_NAME, 'README.md')  # a shipped checkpoint's folder: a Hub repo's files


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


def mean_and_std(values: list[float]) -> dict[str, float]:
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
                                label_descriptions=descriptions, dataset_license=DATASET_LICENSE)
    to_float16(folder / WEIGHTS_NAME)
    return record


def shipped_holder(run: dict[str, Any], results_dir: Path) -> Optional[str]:
    """The name of the checkpoint in ``hub_configs/`` whose weights are ``run``'s: its record's ``results`` is the
    run's result JSON in ``results_dir`` or that of its re-training; None when no checkpoint holds them."""
    name = run_name(run['arch'], run['method'], run['seed'])
    results = {results_dir / f'{name}.json', results_dir / RERUNS / f'{name}.json'}
    return next((path.stem for path in sorted((REPO / 'hub_configs').glob('*.json'))
                 if REPO / json.loads(path.read_text())['metrics']['results'] in results), None)


def reuse_shipped(name: str, holder: str, folder: Path) -> tuple[dict[str, Any], Path]:
    """Copy the weights shipped as ``holder`` into ``folder`` for the checkpoint ``name`` (the same checkpoint, or the
    same run under a new tag), with their config.json in the current schema.

    Returns:
        The record of the rewritten config.json, as ``prepare_hub_folder`` returns it, and the result JSON of the
        shipped weights that the holder's record names.

    Raises:
        SystemExit: The shipped weights no longer have their record's sha256.
    """
    shipped = REPO / 'hub_configs' / holder
    record = json.loads((shipped.parent / f'{holder}.json').read_text())
    if sha256_of_file(shipped / WEIGHTS_NAME) != record['sha256']:
        raise SystemExit(f"error: {name}: {shipped / WEIGHTS_NAME} does not have its record's sha256; restore it "
                         f'(git checkout) or ship from the run folder, without --keep-weights')
    shutil.copyfile(shipped / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    config = to_published_config(read_config(shipped / CONFIG_NAME))
    write_config(config, folder)
    return (hub_config_record(config, record['sha256'], f'sgdrop-zoo/{name}', DATASET, name.split('.', 1)[1],
                              record['license'], DATASET_LICENSE), REPO / record['metrics']['results'])


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


def rerun_command(run: dict[str, Any], data: Path, runs_dir: Path, results_dir: Path) -> str:
    """The command that trains the study's ``run`` again, for its weights (``reproduce.py --rerun``), into
    ``runs_dir`` and ``results_dir``."""
    protocol = run['protocol']
    folders = ''.join(f' {flag} {os.path.relpath(folder)}' for flag, folder, default in (
        ('--runs-dir', runs_dir, runs_folder(protocol)), ('--results-dir', results_dir, results_folder(protocol)))
        if folder.resolve() != default.resolve())
    return (f"python benchmarks/reproduce.py {protocol} --data {data} --archs {run['arch']} --methods {run['method']} "
            f"--seeds {run['seed']} --rerun{folders}")


def result_of_folder(run: dict[str, Any], runs_dir: Path, results_dir: Path,
                     data: Path) -> tuple[dict[str, Any], Path]:
    """The result whose weights ``run``'s folder in ``runs_dir`` holds, and its JSON: the study's ``run``, or ``run``
    trained again with other CPU kernels (``reproduce.py --rerun``, in the ``RERUNS`` subfolder), told apart by the
    folder's log (``curve_difference``).

    Raises:
        SystemExit: The folder's per-epoch training loss and val top-1 are neither result's.
    """
    name = run_name(run['arch'], run['method'], run['seed'])
    folder = runs_dir / name
    candidates = [(run, results_dir / f'{name}.json')]
    rerun_path = results_dir / RERUNS / f'{name}.json'
    if rerun_path.is_file():
        candidates.append((json.loads(rerun_path.read_text()), rerun_path))
    logged = read_log(folder)
    for result, path in candidates:
        if curve_difference(logged, result['curve']) is None:
            return result, path
    known = ' or '.join(os.path.relpath(path, REPO) for _, path in candidates)
    # reproduce.py would resume from the folder's finished checkpoint, so the folder has to go first
    raise SystemExit(f'error: {folder} holds another run than {known}; move the folder aside, then train it again '
                     f'with {rerun_command(run, data, runs_dir, results_dir)}')


def checkpoint_names(arch: str, protocol: dict[str, Any]) -> tuple[str, str]:
    """The tags of a family's SGDrop checkpoint and of its vanilla twin (``<tag>_vanilla``): the protocol's
    ``pair_tag`` of the family, else its ``tag``."""
    tag = protocol.get('pair_tag', {}).get(arch, protocol['tag'])
    return f'{arch}.{tag}', f'{arch}.{tag}_vanilla'


def study_metrics(runs: list[dict[str, Any]], run: dict[str, Any], arch: str) -> dict[str, Any]:
    """The study's figures a record carries for the checkpoint of ``run``: every seed of its method and of vanilla,
    the mean attribution areas, the last epoch's SGDrop diagnostics, the commands that trained and evaluated it and,
    when ``run`` is a study run trained again with other CPU kernels, the result it re-trained and those kernels."""
    group = [r for r in runs if r['arch'] == arch and r['method'] == run['method']]
    vanilla_runs = [r for r in runs if r['arch'] == arch and r['method'] == 'vanilla']
    seeds, vanilla = (mean_and_std([r['final_val_acc1'] for r in rs]) for rs in (group, vanilla_runs))
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


def check_replaceable(folder: Path) -> None:
    """Refuse to replace a ``hub_configs/`` folder that holds files a shipped checkpoint's folder does not (someone
    else's: a clone of its Hub repo, notes), before anything is written.

    Raises:
        SystemExit: The folder holds other files, naming them.
    """
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in SHIPPED_FILES) if folder.is_dir() else []
    if foreign:
        raise SystemExit(f'error: {folder} holds {", ".join(foreign)}, which ship_zoo did not write; move them out of '
                         f'the folder, then ship again')


def prepare_checkpoint(name: str, run: dict[str, Any], runs: list[dict[str, Any]], data: Path, runs_dir: Path,
                       results_dir: Path, overhead: dict[str, Any], twin: str, keep_weights: bool,
                       tmp: Path) -> dict[str, Any]:
    """Export one checkpoint of the study into the folder ``tmp`` (with ``keep_weights``, copy its run's weights from
    the checkpoint in ``hub_configs/`` that holds them, where one does): the Hub-repo files of
    ``hub_configs/<name>/``; its record, which names its ``twin`` (the other checkpoint of the pair). Nothing in
    ``hub_configs/`` changes (``place_checkpoint``)."""
    arch = run['arch']
    folder = REPO / 'hub_configs' / name
    check_replaceable(folder)
    held_by = shipped_holder(run, results_dir)
    holder = held_by if keep_weights else None
    if holder is not None:
        record, results_path = reuse_shipped(name, holder, tmp)
        weights_run = json.loads(results_path.read_text())
        print(f'=> {name}: the weights shipped as {holder}, of {os.path.relpath(results_path, REPO)}', flush=True)
    else:
        # the last epoch's weights, which the study's top-1 measures (the run's own export holds its best epoch's)
        source = runs_dir / run_name(arch, run['method'], run['seed']) / 'checkpoint.pth.tar'
        if not source.is_file():
            raise SystemExit(f'error: {name}: {source} is missing (run folders do not outlive their session); '
                             + (f'pass --keep-weights to ship the same weights, which {held_by} holds' if held_by else
                                f'train it again with {rerun_command(run, data, runs_dir, results_dir)}'))
        weights_run, results_path = result_of_folder(run, runs_dir, results_dir, data)
        record = export_run(name, source, tmp)
    config = read_config(tmp / CONFIG_NAME)
    model = timm.create_model(f'local-dir:{tmp}', pretrained=True)
    command = (f'python benchmarks/ship_zoo.py --data ../shared/data/{data.name} --protocol {run["protocol"]} '
               f'--results-dir {os.path.relpath(results_dir, REPO)} --archs {arch}')
    record.update(
        hf_hub_id=None,
        local_dir=name,
        twin=twin,
        metrics=dict(
            **measure(model, data / 'val', weights_run['final_val_acc1'], name),
            **study_metrics(runs, weights_run, arch),
            file_mib=round((tmp / WEIGHTS_NAME).stat().st_size / 2 ** 20, 2),
            **(dict(step_overhead=overhead[arch][step_overhead_figure(run['method'])],
                    step_overhead_command=overhead[arch]['command'])
               if step_overhead_figure(run['method']) and arch in overhead else {}),
            # the command that exported the weights; a --keep-weights run only rewrote the figures (and copied the
            # weights of the checkpoint that held them)
            ship_command=command,
            **(dict(record_command=f'{command} --keep-weights') if holder is not None else {}),
            **(dict(weights_shipped_as=holder) if holder not in (None, name) else {}),
            results=os.path.relpath(results_path, REPO),
        ),
        sha256=sha256_of_file(tmp / WEIGHTS_NAME),
    )
    # the folder's config.json describes these weights by the figures just measured, with timm's paper fields and
    # notes (the training command, the data's terms) as its tag gives them
    config['pretrained_cfg']['description'] = checkpoint_description(record['sgdrop'], record['dataset'],
                                                                     record['metrics']['top1'],
                                                                     record['metrics']['split'])
    architecture_cfg = timm.models.get_pretrained_cfg(arch)
    config['pretrained_cfg'].update({field: getattr(architecture_cfg, field) for field in PAPER_FIELDS},
                                    notes=list(record_notes(record)))
    write_config(config, tmp)
    render_model_card([record], checkpoint=record).save(tmp / 'README.md')
    return record


def place_checkpoint(name: str, record: dict[str, Any], tmp: Path) -> None:
    """Put a prepared checkpoint in ``hub_configs/``: ``tmp`` in place of its folder, readable by all as a Hub
    repo's files are, and its record beside it."""
    folder = REPO / 'hub_configs' / name
    for path in tmp.iterdir():
        path.chmod(0o644)  # TemporaryDirectory and safetensors create them private
    tmp.chmod(0o755)
    if folder.exists():
        shutil.rmtree(folder)  # the files of an earlier shipping only (check_replaceable)
    os.replace(tmp, folder)
    tmp.mkdir()  # TemporaryDirectory removes its path on exit
    (REPO / 'hub_configs' / f'{name}.json').write_text(json.dumps(record, indent=2) + '\n')
    metrics = record['metrics']
    print(f'{name}: seed {metrics["seed"]}, top-1 {metrics["top1"]} (float32 {metrics["top1_float32"]}), check '
          f'{metrics["check"]["correct"]}/{CHECK_IMAGES}, {metrics["file_mib"]:.1f} MiB', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', type=Path, required=True, help="the study's ImageFolder root (train/ and val/)")
    parser.add_argument('--protocol', default='zoo128', choices=sorted(p for p, c in PROTOCOLS.items() if 'ship' in c),
                        help='the reproduce.py protocol whose study is shipped')
    parser.add_argument('--results-dir', type=Path, default=None,
                        help="the study's results (default: benchmarks/results/reproduce_PROTOCOL, where reproduce.py "
                             "writes them)")
    parser.add_argument('--runs-dir', type=Path, default=None,
                        help="the study's recipe output folders (default: runs/reproduce/PROTOCOL)")
    parser.add_argument('--archs', nargs='+', default=None,
                        help="ship only these of the protocol's architectures (default: all it ships)")
    parser.add_argument('--keep-weights', action='store_true',
                        help="take a run's weights from the checkpoint in hub_configs/ that holds them (its record "
                             'names the run) instead of exporting them again from --runs-dir, re-evaluating them and '
                             'rewriting the record; runs no checkpoint holds are exported from --runs-dir')
    args = parser.parse_args()
    check_data_root(str(args.data))
    protocol = PROTOCOLS[args.protocol]
    results_dir = (args.results_dir or results_folder(args.protocol)).resolve()
    runs_dir = (args.runs_dir or runs_folder(args.protocol)).resolve()
    archs = args.archs or protocol['ship']
    unknown = sorted(set(archs) - set(protocol['ship']))
    if unknown:
        sys.exit(f"error: --archs {', '.join(unknown)}: the {args.protocol} protocol ships "
                 f"{', '.join(protocol['ship'])}")
    runs = read_results(results_dir)
    missing = [arch for arch in archs if not any(r['arch'] == arch for r in runs)]
    if missing:
        sys.exit(f'error: no run results of {", ".join(missing)} in {results_dir}; run python benchmarks/reproduce.py '
                 f'{args.protocol} --data {args.data} first')
    overhead = read_overhead(args.protocol, results_dir)
    checkpoints = []
    for arch in archs:
        method = protocol['ship_method'][arch]
        chosen, twin = choose_pair(runs, arch, method)
        name, twin_name = checkpoint_names(arch, protocol)
        if twin is None:
            sys.exit(f'error: no vanilla run of {arch} with seed {chosen["seed"]}, the twin of the checkpoint to '
                     f'ship; run it with python benchmarks/reproduce.py {args.protocol} --data {args.data} --archs '
                     f'{arch} --methods vanilla --seeds {chosen["seed"]}')
        checkpoints += [(name, chosen, twin_name), (twin_name, twin, name)]
    with contextlib.ExitStack() as stack:
        prepared = []
        for name, run, twin_name in checkpoints:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=REPO / 'hub_configs', prefix=f'.{name}.')))
            prepared.append((name, prepare_checkpoint(name, run, runs, args.data.resolve(), runs_dir, results_dir,
                                                      overhead, twin_name, args.keep_weights, tmp), tmp))
        # only once every checkpoint is ready: a pair whose twin fails ships neither, naming the other
        for name, record, tmp in prepared:
            place_checkpoint(name, record, tmp)


if __name__ == '__main__':
    main()
