"""Transfer of the zoo's shipped pairs: linear probes of each checkpoint's frozen encoder on another dataset.

The paper's section 4.4 probes a frozen encoder on a second dataset to ask whether SGDrop's features transfer better.
For every SGDrop checkpoint of ``--tag`` in ``hub_configs/`` and its vanilla twin (the record's ``twin``), this trains
a linear probe (``sgdrop-zoo finetune --mode linear-probe``: frozen encoder, new classifier) with each probe seed, on a
fixed class-balanced subset of the target's training split, at the checkpoint's input size, and measures it on a fixed
class-balanced subset of the target's validation split. The settings are fixed before the first probe
(benchmarks/README.md, "Transfer of the shipped pairs").

    python benchmarks/transfer_zoo.py --data ../shared/data/eurosat --tag imagenette_128

Writes one JSON per probe and ``table.md`` (mean ± std over the probe seeds, SGDrop beside its twin) to
``benchmarks/results/transfer_<tag>/``; the probes' exports stay in ``runs/transfer/<tag>/``. Re-running skips the
probes whose JSON exists, and stops if one of them probed other weights (a checkpoint shipped again) or other data.
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sgdrop_zoo.data import DatasetError, check_image_folders, smallest_class  # noqa: E402
from sgdrop_zoo.finetune import finetune  # noqa: E402
from sgdrop_zoo.pretrained import load_hub_configs  # noqa: E402
from sgdrop_zoo.run_files import read_log  # noqa: E402

from study import check_data_root, mean_std  # noqa: E402, benchmarks/study.py, beside this script

PROBE_SEEDS = [0, 1, 2]
PROBE_EPOCHS = 10
TRAIN_PER_CLASS = 100  # fixed class-balanced subsets of the target's splits (finetune's subset rule)
VAL_PER_CLASS = 100


def shipped_pairs(records: list[dict[str, Any]], tag: str) -> list[tuple[str, str]]:
    """The (SGDrop checkpoint, vanilla twin) names of ``tag``, by architecture.

    Raises:
        SystemExit: No SGDrop checkpoint of ``tag`` names a twin that is shipped.
    """
    by_name = {f"{r['architecture']}.{r['tag']}": r for r in records}
    pairs = sorted((name, record['twin']) for name, record in by_name.items()
                   if record['tag'] == tag and record.get('twin') in by_name
                   and record['metrics'].get('method') != 'vanilla')
    if not pairs:
        raise SystemExit(f'error: hub_configs/ holds no SGDrop checkpoint of tag {tag!r} with a shipped vanilla twin; '
                         f'ship them first with python benchmarks/ship_zoo.py')
    return pairs


def check_probe_data(data: Path) -> None:
    """Refuse, before any probe, a dataset with fewer images in a class than the probes' fixed subsets take.

    Raises:
        SystemExit: In one line, naming the split and the class.
    """
    try:
        check_image_folders(data, workers=0)
    except DatasetError as e:
        raise SystemExit(f'error: {e}') from None
    for split, per_class in (('train', TRAIN_PER_CLASS), ('val', VAL_PER_CLASS)):
        name, count = smallest_class(data / split)
        if count < per_class:
            raise SystemExit(f'error: {data / split}/{name} holds {count} images; the probes take a fixed subset of '
                             f'{TRAIN_PER_CLASS} training and {VAL_PER_CLASS} validation images per class: probe a '
                             f'dataset with at least that many')


def probe_name(name: str, seed: int) -> str:
    return f'{name}__probe_seed{seed}'


def finished_probe(result_path: Path, sha256: str, data: str) -> Optional[dict[str, Any]]:
    """The result of a probe already run, None when there is none yet.

    Raises:
        SystemExit: It probed other weights than the shipped ones (``sha256``: the checkpoint was shipped again) or
            another dataset than ``data``, so that its figures do not belong in this table.
    """
    if not result_path.exists():
        return None
    result = json.loads(result_path.read_text())
    if (result['checkpoint_sha256'], result['data']) != (sha256, data):
        raise SystemExit(f"error: {os.path.relpath(result_path)} probed weights {result['checkpoint_sha256'][:12]} on "
                         f"{result['data']}, not the shipped {sha256[:12]} on {data}; move it aside to probe again")
    return result


def write_table(pairs: list[tuple[str, str]], results: dict[str, list[dict]], data: str, output: Path) -> str:
    lines = [
        f'# Transfer of the shipped pairs: linear probes on `{data}`',
        '',
        f'Frozen encoder, new linear classifier (`sgdrop-zoo finetune --mode linear-probe`), {PROBE_EPOCHS} epochs, '
        f"Adam 1e-3, at the checkpoint's input size, on a fixed subset of {TRAIN_PER_CLASS} training images per "
        f'class; top-1 % of the last epoch on a fixed subset of {VAL_PER_CLASS} validation images per class, mean ± '
        f'std over probe seeds {", ".join(map(str, PROBE_SEEDS))} (the seed of the new head and of the shuffling).',
        '',
        '| checkpoint | probe top-1 | its vanilla twin | twin probe top-1 | difference |',
        '|---|---|---|---|---|',
    ]
    for name, twin in pairs:
        ours, theirs = ([r['probe_final_val_acc1'] for r in results[n]] for n in (name, twin))
        lines.append(f'| `{name}` | {mean_std(ours)} | `{twin}` | {mean_std(theirs)} | '
                     f'{statistics.mean(ours) - statistics.mean(theirs):+.2f} |')
    table = '\n'.join(lines) + '\n'
    (output / 'table.md').write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', required=True, help='ImageFolder root (train/ and val/) of the probes')
    parser.add_argument('--tag', required=True, help='pretrained tag of the shipped pairs, e.g. imagenette_128')
    args = parser.parse_args()
    check_data_root(args.data)
    check_probe_data(Path(args.data))
    data = os.path.relpath(Path(args.data).resolve(), REPO)
    output = REPO / 'benchmarks' / 'results' / f'transfer_{args.tag}'
    work_dir = REPO / 'runs' / 'transfer' / args.tag
    records = load_hub_configs()
    sha256 = {f"{r['architecture']}.{r['tag']}": r['sha256'] for r in records}
    pairs = shipped_pairs(records, args.tag)
    output.mkdir(parents=True, exist_ok=True)

    results: dict[str, list[dict]] = {}
    for name in (n for pair in pairs for n in pair):
        for seed in PROBE_SEEDS:
            result_path = output / f'{probe_name(name, seed)}.json'
            result = finished_probe(result_path, sha256[name], data)
            if result is None:
                probe_dir = work_dir / probe_name(name, seed)
                metrics = finetune(name, REPO / data, probe_dir, mode='linear-probe', epochs=PROBE_EPOCHS, seed=seed,
                                   train_subset_per_class=TRAIN_PER_CLASS, val_subset_per_class=VAL_PER_CLASS,
                                   progress=False, overwrite=True)
                log = read_log(probe_dir)
                result = dict(checkpoint=name, checkpoint_sha256=sha256[name], data=data, probe_seed=seed,
                              probe_final_val_acc1=log[-1]['val_acc1'],
                              probe_best_val_acc1=metrics['val_acc1'], probe_val_count=log[-1]['val_count'],
                              epochs=PROBE_EPOCHS, command=f'python benchmarks/transfer_zoo.py --data {data} '
                                                           f'--tag {args.tag}', curve=log)
                result_path.write_text(json.dumps(result, indent=1) + '\n')
                print(f'{name} probe seed {seed}: {result["probe_final_val_acc1"]:.2f}', flush=True)
            results.setdefault(name, []).append(result)
    print(write_table(pairs, results, data, output))


if __name__ == '__main__':
    main()
