"""Transfer and saliency of the reproduction study's encoders (paper sections 4.2 and 4.4).

Takes the final weights of one seed of each method trained by ``reproduce.py``, and measures:

- transfer: a linear probe (``sgdrop-zoo finetune --mode linear-probe``: frozen encoder, new classifier) on another
  dataset; the paper trains VGG16 on RESISC45 and probes it on RSICD (vanilla 64.18, dropout 65.69, SGDrop 70.35);
- saliency on the source dataset's validation split (``sgdrop-zoo saliency``): top-1, attribution area ratio and
  neuron coverage, and the Grad-CAM picture grid;
- the training curves of the same runs (``sgdrop-zoo plot``): validation top-1 and attribution area ratio per epoch.

    python benchmarks/transfer_saliency.py --source-data ../shared/data/cifar10_subset \\
        --target-data ../shared/data/eurosat                      # after `reproduce.py cpu`

Writes ``summary.json``, ``table.md``, ``saliency.json``, ``saliency_grid.png``, ``curves.png`` and each probe's
``metrics.json`` / ``log.jsonl`` to the output folder; the probes' weights stay in ``--work-dir``.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sgdrop_zoo.finetune import finetune  # noqa: E402
from sgdrop_zoo.plots import plot_runs  # noqa: E402
from sgdrop_zoo.run_files import read_log  # noqa: E402
from sgdrop_zoo.saliency import format_table, saliency_report  # noqa: E402

from study import runs_folder  # noqa: E402, benchmarks/study.py, beside this script

# Paper, VGG16: transfer RESISC45 -> RSICD (section 4.4); area ratio and coverage on ImageNet (section 4.2).
PAPER = {
    'vanilla': {'transfer': 64.18, 'area_ratio': 0.01, 'coverage_global': 0.40, 'coverage_last_conv': 0.09},
    'dropout': {'transfer': 65.69, 'area_ratio': 0.02, 'coverage_global': 0.38, 'coverage_last_conv': 0.13},
    'sgdrop': {'transfer': 70.35, 'area_ratio': 0.14, 'coverage_global': 0.39, 'coverage_last_conv': 0.58},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--source-data', required=True, help='dataset the encoders were trained on (saliency)')
    parser.add_argument('--target-data', required=True, help='dataset of the linear probe')
    parser.add_argument('--protocol', default='cpu', help='reproduce.py protocol whose runs are used')
    parser.add_argument('--arch', default='sgdrop_cifar_cnn')
    parser.add_argument('--seed', type=int, default=0, help='seed of the reproduce.py runs used')
    parser.add_argument('--methods', nargs='+', default=['vanilla', 'dropout', 'sgdrop'])
    parser.add_argument('--image-size', type=int, default=32, help='input side of the probe and the saliency')
    parser.add_argument('--probe-epochs', type=int, default=2)
    parser.add_argument('--saliency-images', type=int, default=2000,
                        help='fixed random subset of the source validation split measured by saliency')
    parser.add_argument('--runs-dir', default=None, help='reproduce.py run folders (default: runs/reproduce/PROTOCOL)')
    parser.add_argument('--output', default=None, help='default: benchmarks/results/transfer_saliency_PROTOCOL')
    parser.add_argument('--work-dir', default=None, help='probe outputs (default: runs/transfer_saliency/PROTOCOL)')
    args = parser.parse_args()

    # relative to where the script runs (the repository, as documented), so that the results record no local paths
    runs_dir = Path(os.path.relpath(Path(args.runs_dir or runs_folder(args.protocol)).resolve()))
    output = Path(args.output or REPO / 'benchmarks' / 'results' / f'transfer_saliency_{args.protocol}')
    work_dir = Path(args.work_dir or REPO / 'runs' / 'transfer_saliency' / args.protocol)
    runs = {m: runs_dir / f'{args.arch}__{m}__seed{args.seed}' for m in args.methods}
    for method, run in runs.items():
        if not (run / 'checkpoint.pth.tar').is_file():
            raise SystemExit(f'error: {run}/checkpoint.pth.tar is missing; run benchmarks/reproduce.py '
                             f'{args.protocol} first')
    output.mkdir(parents=True, exist_ok=True)

    # the final epoch's weights, as reproduce.py's final top-1 is measured on
    checkpoints = [str(run / 'checkpoint.pth.tar') for run in runs.values()]
    summary: dict[str, dict] = {m: {'source_run': str(run)} for m, run in runs.items()}
    for method, checkpoint in zip(args.methods, checkpoints):
        probe_dir = work_dir / f'probe_{method}'
        if not (probe_dir / 'metrics.json').is_file():
            finetune(checkpoint, args.target_data, probe_dir, mode='linear-probe', epochs=args.probe_epochs,
                     image_size=args.image_size, seed=0, progress=False)
        for name in ('metrics.json', 'log.jsonl'):
            shutil.copy(probe_dir / name, output / f'probe_{method}_{name}')
        log = read_log(probe_dir / 'log.jsonl')
        summary[method].update(probe_final_val_acc1=log[-1]['val_acc1'], probe_best_val_acc1=max(
            r['val_acc1'] for r in log), probe_val_count=log[-1]['val_count'])

    # the report of this script's own results folder, made again
    results = saliency_report(checkpoints, args.source_data, output, image_size=args.image_size,
                              num_images=args.saliency_images, labels=args.methods, overwrite=True)
    print(format_table(results))
    for method, metrics in results['models'].items():
        summary[method].update({k: metrics[k] for k in ('acc1', 'area_ratio', 'coverage_global',
                                                         'coverage_last_conv', 'images')})
    plot_runs([run / 'log.jsonl' for run in runs.values()], output / 'curves.png', labels=args.methods)

    (output / 'summary.json').write_text(json.dumps(dict(vars(args), command=' '.join(['python'] + sys.argv),
                                                         results=summary, paper_vgg16=PAPER), indent=1) + '\n')
    lines = [
        f'# Transfer and saliency: `{args.arch}`, seed {args.seed}',
        '',
        f'Encoders trained on `{args.source_data}` by `reproduce.py {args.protocol}` (final epoch). Linear probe on '
        f'`{args.target_data}` at {args.image_size} px, {args.probe_epochs} epochs (top-1 on its val split). '
        f'Saliency on {args.saliency_images} fixed images of the source val split. Paper: VGG16, transfer '
        'RESISC45 -> RSICD, saliency on ImageNet.',
        '',
        '| method | probe top-1 (final) | probe top-1 (best) | source top-1 | area ratio | coverage (all ReLU) | '
        'coverage (z) | paper transfer | paper area | paper coverage (all / z) |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for method, r in summary.items():
        paper = {k: f'{v:.2f}' for k, v in PAPER.get(method, {}).items()}
        lines.append(f"| {method} | {r['probe_final_val_acc1']:.2f} | {r['probe_best_val_acc1']:.2f} | "
                     f"{r['acc1']:.2f} | {r['area_ratio']:.3f} | {r['coverage_global']:.3f} | "
                     f"{r['coverage_last_conv']:.3f} | {paper.get('transfer', '-')} | {paper.get('area_ratio', '-')} | "
                     f"{paper.get('coverage_global', '-')} / {paper.get('coverage_last_conv', '-')} |")
    (output / 'table.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
