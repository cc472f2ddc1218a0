"""Reproduction study: vanilla, latent dropout and SGDrop trained side by side with the recipe.

Trains the grid {method} x {architecture} x {seed} of one protocol with ``train/main.py``, one subprocess per run,
writes one JSON per run (final and best val top-1, clean train top-1, the train-val gap, the per-epoch curve, images
per second, wall time, the exact command and the git commit) and a markdown table of mean +- std next to the paper's
numbers. Re-running skips finished runs and resumes an interrupted one from its last checkpoint.

    python benchmarks/reproduce.py cpu --data ../shared/data/cifar10_subset            # 2 CPU cores
    python benchmarks/reproduce.py gpu --data ../shared/data/imagenette --archs sgdrop_vgg16 --methods vanilla sgdrop
    python benchmarks/reproduce.py cpu --table-only                                    # rebuild table.md
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import timm
import torch

import sgdrop_zoo  # noqa: F401, registers the sgdrop_* architectures the table counts the parameters of
from sgdrop_zoo.run_files import read_log

from study import (  # benchmarks/study.py, beside this script
    METHODS,
    PROTOCOLS,
    REPO,
    RERUNS,
    RESULTS,
    check_data_root,
    curve_difference,
    mean_std,
    method_args,
    overhead_commands,
    protocol_methods,
    read_overhead,
    read_results,
    results_folder,
    run_name,
    runs_folder,
    step_overhead_figure,
)

NUM_CLASSES_OF_TABLE = 10  # CIFAR-10 and Imagenette


def measure_overhead(protocol: str, results_dir: Path) -> None:
    """Run ``overhead_commands`` into ``results_dir``, leaving files that are already there."""
    for name, args in overhead_commands(protocol).items():
        output = results_dir / name
        if output.exists():
            print(f'=> {os.path.relpath(output, REPO)}: exists, skipped', flush=True)
            continue
        command = [sys.executable, 'benchmarks/overhead.py', *args, '--output', os.path.relpath(output, REPO)]
        print(f"=> {' '.join(['python'] + command[1:])}", flush=True)
        subprocess.run(command, cwd=REPO, check=True)


def pilot_choice(runs: list[dict], arch: str, candidates: list[str]) -> str:
    """The SGDrop method a pilot's rule chooses for ``arch`` (benchmarks/README.md, "Zoo v2 pilot"): of its SGDrop
    ``candidates``, the one with the best last-epoch dev top-1; the paper's default (``sgdrop``) wins a tie, the same
    number of correct dev images.

    Raises:
        SystemExit: A candidate has no result among ``runs``.
    """
    correct = {r['method']: round(r['final_val_acc1'] * r['final_val_count'] / 100) for r in runs if r['arch'] == arch}
    sgdrop_candidates = [method for method in candidates if method != 'vanilla']
    missing = [method for method in sgdrop_candidates if method not in correct]
    if missing:
        raise SystemExit(f"error: the pilot of {arch} has no result of {', '.join(missing)} yet; its rule chooses "
                         f'once every candidate has run')
    return max(sgdrop_candidates, key=lambda method: (correct[method], method == 'sgdrop'))


def method_pilot_choice(runs: list[dict], arch: str, order: list[str], cheaper: bool = True) -> str:
    """The method the method pilot's rule chooses for ``arch`` (benchmarks/README.md, "Method pilot").

    A candidate of ``order`` (closest to the paper's defaults first) is eligible when its last-epoch share of latent
    features at or below zero is at most 10 points above vanilla's (more is a network parking its features where the
    mask cannot select them) and its last-epoch true-class logit drop is above zero (a run that predates the drop is
    judged on the first alone). The choice is the earliest eligible candidate within
    0.5 points of the best eligible dev top-1; then, with ``cheaper``, ``<choice>_ema_head`` replaces it when that is
    eligible and within 0.5 points of it. None eligible: vanilla.

    Raises:
        SystemExit: A candidate, vanilla or (with ``cheaper``) the choice's ema_head run has no result among ``runs``.
    """
    by_method = {r['method']: r for r in runs if r['arch'] == arch}
    missing = [method for method in ['vanilla', *order] if method not in by_method]
    if missing:
        raise SystemExit(f"error: the method pilot of {arch} has no result of {', '.join(missing)} yet; its rule "
                         f'chooses once every candidate has run')
    vanilla_share = by_method['vanilla']['final_nonpositive_feature_share']

    def eligible(run: dict) -> bool:
        drop = run.get('final_true_class_logit_drop')
        return run['final_nonpositive_feature_share'] - vanilla_share <= 0.10 and (drop is None or drop > 0)

    def correct(run: dict) -> int:
        return round(run['final_val_acc1'] * run['final_val_count'] / 100)

    def within_half_a_point(run: dict, of: int) -> bool:
        # in dev images, so that floating point cannot split a tie: 0.5 points of 1,000 images are 5 images
        return 200 * (of - correct(run)) <= run['final_val_count']

    candidates = [by_method[method] for method in order if eligible(by_method[method])]
    if not candidates:
        return 'vanilla'
    best = max(correct(run) for run in candidates)
    choice = next(run for run in candidates if within_half_a_point(run, best))
    if not cheaper:
        return choice['method']
    ema_head = by_method.get(f"{choice['method']}_ema_head")
    if ema_head is None:
        raise SystemExit(f"error: the method pilot of {arch} chose {choice['method']}; its rule waits for "
                         f"{choice['method']}_ema_head")
    return ema_head['method'] if eligible(ema_head) and within_half_a_point(ema_head, correct(choice)) \
        else choice['method']


def pilot_runs(protocol: str, results_dir: Path) -> list[dict]:
    """The results a protocol's rule reads: its own (in ``results_dir``) and those of its ``baseline_results``."""
    config = PROTOCOLS[protocol]
    baseline = read_results(RESULTS / config['baseline_results']) if 'baseline_results' in config else []
    return baseline + read_results(results_dir)


def pilot_methods(protocol: str, arch: str, results_dir: Path) -> list[str]:
    """The methods a pilot trains for ``arch``: its new candidates, and ``<choice>_ema_head`` once the others have
    chosen a method (none while a candidate has not run, and none when vanilla is chosen)."""
    config = PROTOCOLS[protocol]
    methods = protocol_methods(config, arch)
    if 'candidate_order' not in config:
        return methods
    try:
        choice = method_pilot_choice(pilot_runs(protocol, results_dir), arch, config['candidate_order'][arch],
                                     cheaper=False)
    except SystemExit:
        return methods
    return methods + ([f'{choice}_ema_head'] if choice != 'vanilla' else [])


def epoch_args(config: dict, arch: str) -> list[str]:
    """``--epochs`` of ``arch`` when the protocol sets epochs per architecture (else its args set them)."""
    return ['--epochs', str(config['epochs'][arch])] if 'epochs' in config else []


def git_commit() -> str:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() or 'unknown'


def summarize_run(curve: list[dict], final_val: Optional[dict] = None) -> dict:
    """Figures of one run; ``final_val`` is the last epoch's evaluation on the full validation split when the
    per-epoch curve was measured on a subset of it."""
    last = curve[-1]
    peak = max(curve, key=lambda r: r['val_acc1'])
    final_val = final_val or {'acc1': last['val_acc1'], 'count': last['val_count']}
    return {
        'epochs': last['epoch'],
        'final_val_acc1': final_val['acc1'],
        'final_val_count': final_val['count'],
        'curve_val_count': last['val_count'],
        'curve_final_val_acc1': last['val_acc1'],
        'curve_peak_val_acc1': peak['val_acc1'],
        'curve_peak_epoch': peak['epoch'],
        'final_train_acc1': last['train_clean_acc1'],
        'final_train_val_gap': last['train_clean_acc1'] - final_val['acc1'],
        'final_masked_train_acc1': last['train_acc1'],
        'first_epoch_masked_train_acc1': curve[0]['train_acc1'],
        'first_epoch_train_acc1': curve[0]['train_clean_acc1'],
        # the SGDrop diagnostics of the last epoch (absent from logs of older recipes)
        'final_dropped_attribution_share': last.get('train_dropped_attribution_share'),
        'final_nonpositive_feature_share': last.get('train_nonpositive_feature_share'),
        'final_true_class_logit_drop': last.get('train_true_class_logit_drop'),
        'final_logit_drop_share': last.get('train_logit_drop_share'),
        'img_per_s': statistics.median(r['img_per_s'] for r in curve),
        'train_time_s': sum(r['epoch_time_s'] for r in curve),
    }


def final_eval_args(checkpoint: Path, metrics_path: Path) -> list[str]:
    """The recipe's arguments that evaluate ``checkpoint`` and write its metrics to ``metrics_path``."""
    return ['--evaluate', '--resume', str(checkpoint), '--metrics-json', str(metrics_path)]


def evaluate_full(command: list[str], checkpoint: Path, metrics_path: Path) -> dict:
    """Top-1 of ``checkpoint`` on the whole validation split, with the recipe's ``--evaluate``: its metrics JSON
    (``acc1``, ``acc5``, ``loss``, ``count``, ``checkpoint``, ``epoch``), written to ``metrics_path``."""
    # the file of an invocation interrupted before its result was written: the recipe never replaces one
    (REPO / metrics_path).unlink(missing_ok=True)
    subprocess.run(command + final_eval_args(checkpoint, metrics_path), cwd=REPO, check=True)
    return json.loads((REPO / metrics_path).read_text())


def first_difference(result: dict, committed: dict) -> Optional[str]:
    """The first of a re-trained run's final figures and per-epoch figures (``curve_difference``) that is not its
    committed result's, in words, or None when they are all the same to the bit."""
    for key in ('final_val_acc1', 'final_train_acc1', 'final_masked_train_acc1'):
        if result[key] != committed[key]:
            return f'the re-trained run gives {key} {result[key]}, the committed result {committed[key]}'
    return curve_difference(result['curve'], committed['curve'])


def check_rerun(name: str, result: dict, committed: dict) -> bool:
    """Whether a re-trained run is its committed result to the bit (``first_difference``).

    Another CPU's kernels (AVX2 against AVX-512) sum in another order, so a run re-trained on such a machine is a new
    run of the same command (``benchmarks/results/cross_machine/``); with the committed run's own CPU kernels and
    torch, a difference means that the recipe or its data changed.

    Raises:
        SystemExit: A figure differs although the kernels and torch are the committed run's, naming the first.
    """
    difference = first_difference(result, committed)
    if difference is None:
        return True
    if (result['cpu_capability'], result['versions']['torch']) == (committed.get('cpu_capability'),
                                                                   committed['versions']['torch']):
        raise SystemExit(f"error: {name}: {difference}, with the same CPU kernels ({result['cpu_capability']}) and "
                         f'torch; the recipe or its data changed since the committed run')
    return False


def train_one(protocol: str, config: dict, data: str, arch: str, method: str, seed: int, runs_dir: Path,
              results_dir: Path, rerun: bool = False) -> Optional[dict]:
    """Train one run and write its result JSON; with ``rerun``, train a run whose result is committed again (its run
    folder is gone with the session that made it) and check that it is the same run (``check_rerun``), or, trained
    with other CPU kernels, write its own result to the ``RERUNS`` subfolder."""
    name = run_name(arch, method, seed)
    result_path = results_dir / f'{name}.json'
    if result_path.exists() and not rerun:
        print(f'=> {name}: done, skipped', flush=True)
        return None
    if rerun and not result_path.exists():
        raise SystemExit(f'error: --rerun: {os.path.relpath(result_path, REPO)} is missing; train it without --rerun')
    rerun_path = results_dir / RERUNS / f'{name}.json'
    if rerun and rerun_path.exists():
        # a run is bit-identical only with the same CPU kernels: with kernels neither earlier run used (both
        # recorded), this one would be a third run, which the check after training would refuse, its training lost
        kernels = {json.loads(path.read_text()).get('cpu_capability') for path in (result_path, rerun_path)}
        capability = torch.backends.cpu.get_cpu_capability()
        if None not in kernels and capability not in kernels:
            raise SystemExit(f'error: {name}: {os.path.relpath(rerun_path, REPO)} holds an earlier re-training of this '
                             f"run, and this machine's {capability} CPU kernels are neither its nor the committed "
                             f"run's, so this one would be another run; it is kept: move it aside to record this one")
    output = runs_dir / name
    model_kwargs = [f'{key}={value}' for key, value in config.get('model_kwargs', {}).get(arch, {}).items()]
    base = [sys.executable, 'train/main.py', data, '-a', arch, *(['--model-kwargs', *model_kwargs] if model_kwargs
                                                                  else []), *config['args'], *method_args(method, arch),
            *epoch_args(config, arch), '--seed', str(seed), '--output', str(output)]
    subset = config['curve_val_subset']
    command = base + (['--val-subset', str(subset)] if subset else [])
    checkpoint = output / 'checkpoint.pth.tar'
    resumed = (REPO / checkpoint).exists()
    launch = command + (['--resume', str(checkpoint)] if resumed else [])
    print(f"=> {name}: {' '.join(launch)}", flush=True)
    # the code this invocation starts with (for a resumed run, the resumption's); work committed while it trains is
    # not its code
    commit = git_commit()
    start = time.time()
    subprocess.run(launch, cwd=REPO, check=True)
    metrics_path = output / 'final_val.json'
    final_val = evaluate_full(base, checkpoint, metrics_path) if subset else None
    curve = read_log(REPO / output / 'log.jsonl')
    result = {
        'protocol': protocol,
        'arch': arch,
        'method': method,
        'seed': seed,
        **summarize_run(curve, final_val),
        'wall_time_s': time.time() - start,
        'resumed': resumed,
        'command': ' '.join(['python'] + command[1:]),
        'final_eval_command': ' '.join(['python'] + base[1:] + final_eval_args(checkpoint, metrics_path))
        if subset else None,
        'git_commit': commit,
        'device': torch.cuda.get_device_name() if torch.cuda.is_available()
        else f'cpu ({torch.get_num_threads()} threads)',
        'platform': platform.platform(),
        # the instruction set of torch's CPU kernels: runs on different ones are not bit-identical
        'cpu_capability': torch.backends.cpu.get_cpu_capability(),
        'versions': {'torch': torch.__version__, 'python': platform.python_version()},
        'curve': curve,
    }
    if rerun:
        committed = json.loads(result_path.read_text())
        if check_rerun(name, result, committed):
            print(f'=> {name}: re-trained, the same run as {os.path.relpath(result_path, REPO)}', flush=True)
            return result
        # an earlier re-training, with yet other kernels, that a shipped or retired record may name
        earlier = curve_difference(result['curve'], json.loads(rerun_path.read_text())['curve']) \
            if rerun_path.exists() else None
        if earlier:
            raise SystemExit(f'error: {name}: {os.path.relpath(rerun_path, REPO)} holds an earlier re-training of '
                             f"this run, which this one is not ({earlier.replace('committed result', 'earlier one')}); "
                             f'it is kept: move it aside to record this one')
        rerun_path.parent.mkdir(exist_ok=True)
        rerun_path.write_text(json.dumps(dict(result, rerun_of=os.path.relpath(result_path, REPO)), indent=1) + '\n')
        print(f"=> {name}: re-trained with {result['cpu_capability']} CPU kernels, the committed run with "
              f"{committed.get('cpu_capability') or 'unrecorded ones'}: a new run of the same command (final top-1 "
              f"{result['final_val_acc1']}, the committed {committed['final_val_acc1']}), written to "
              f'{os.path.relpath(rerun_path, REPO)}; ship_zoo ships its weights with its own figures', flush=True)
        return result
    result_path.write_text(json.dumps(result, indent=1) + '\n')
    return result


def logit_drop_cell(group: list[dict]) -> str:
    """The table's logit-drop cell of a group of runs: the drop and, in brackets, its share of the margin; '-' where
    a run predates the diagnostic or trained without a mask."""
    if any(r.get('final_true_class_logit_drop') is None for r in group):
        return '-'
    cell = mean_std([r['final_true_class_logit_drop'] for r in group], digits=3)
    if all(r.get('final_logit_drop_share') is not None for r in group):
        cell += f" ({mean_std([r['final_logit_drop_share'] for r in group], digits=3)})"
    return cell


def overhead_cell(share: float | None) -> str:
    """The table's step-overhead cell: the extra share of a training step, signed ('-1%': the timing's noise made
    SGDrop's step faster); '-' where nothing was measured."""
    return '-' if share is None else f'{100 * share:+.0f}%'


def write_table(protocol: str, config: dict, results_dir: Path) -> str:
    runs = read_results(results_dir)
    lines = [
        f'# Reproduction study: `{protocol}` protocol',
        '',
        config['description'],
        '',
        "Top-1 %, mean ± std over seeds (sample std). Final val: the last epoch's weights on the whole validation "
        "split. Curve peak: the best epoch of the per-epoch validation curve (on the curve's subset where there is "
        "one), an optimistic figure since it picks the epoch on that data. Train: clean (unmasked, eval-mode) top-1 "
        "on the fixed training images at the last epoch; gap = train minus final val. "
        "Area: attribution area ratio at the last epoch (paper section 4.2), on the fixed images of the recipe's "
        f"--log-area-ratio, where it was logged. Params: with a {NUM_CLASSES_OF_TABLE}-class head. img/s: median "
        "training throughput of the runs' epochs. Step overhead: SGDrop's extra time per training step against the "
        "same model without it, from this folder's `overhead*.json` (benchmarks/overhead.py) where they exist: the "
        "EMA attribution's for every SGDrop method but the online one. "
        "Masked ep. 1: top-1 of the SGDrop-masked training logits in the first epoch (below the 10% of chance: the "
        "mask removed most of an untrained network's evidence). Dropped: the mean share of each training sample's "
        "positive attribution that the mask removed, at the last epoch; <= 0: the share of latent features at or "
        "below zero, at the last epoch; logit drop: the mean true-class logit drop of the mask, the online head's "
        "true-class logit on the unmasked latent minus on the masked one, and in brackets that drop as a share of "
        "the clean true-class margin over the runner-up, at the last epoch (benchmarks/README.md, \"Diagnostics\"). "
        f"Paper: {config['paper_dataset']}.",
        '',
        '| arch | method | seeds | final val top-1 | curve peak | train top-1 | train-val gap | masked ep. 1 | dropped '
        '| <= 0 | logit drop | area | params | img/s | step overhead | paper |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    try:
        overhead = read_overhead(protocol, results_dir)
    except SystemExit as missing:
        print(f'note: no step overhead in the table: {missing}', file=sys.stderr)
        overhead = {}
    for arch in dict.fromkeys(r['arch'] for r in runs):
        model_kwargs = config.get('model_kwargs', {}).get(arch, {})
        model = timm.create_model(arch, num_classes=NUM_CLASSES_OF_TABLE, **model_kwargs)
        params = sum(p.numel() for p in model.parameters())
        for method in METHODS:
            group = [r for r in runs if r['arch'] == arch and r['method'] == method]
            if not group:
                continue
            paper = config['paper'].get(arch, {}).get(method)
            lines.append('| ' + ' | '.join([
                f'`{arch}`', method, str(len(group)),
                mean_std([r['final_val_acc1'] for r in group]),
                mean_std([r['curve_peak_val_acc1'] for r in group]),
                mean_std([r['final_train_acc1'] for r in group]),
                mean_std([r['final_train_val_gap'] for r in group]),
                mean_std([r['first_epoch_masked_train_acc1'] for r in group])
                if all('first_epoch_masked_train_acc1' in r for r in group) else '-',
                *(mean_std([r[key] for r in group], digits=3)
                  if all(r.get(key) is not None for r in group) else '-'
                  for key in ('final_dropped_attribution_share', 'final_nonpositive_feature_share')),
                logit_drop_cell(group),
                mean_std([r['curve'][-1]['val_area_ratio'] for r in group], digits=3)
                if all('val_area_ratio' in r['curve'][-1] for r in group) else '-',
                f'{params / 1e6:.2f}M',
                f"{statistics.mean(r['img_per_s'] for r in group):.0f}",
                overhead_cell(overhead.get(arch, {}).get(step_overhead_figure(method))),
                f'{paper:.2f}' if paper is not None else '-',
            ]) + ' |')
    if 'candidate_order' in config:
        lines += ['', 'The rule (benchmarks/README.md, "Method pilot"), with vanilla and the earlier candidates from '
                      f"`results/{config['baseline_results']}/`:", '']
        for arch, order in config['candidate_order'].items():
            try:
                lines.append(f'- `{arch}`: {method_pilot_choice(pilot_runs(protocol, results_dir), arch, order)}')
            except SystemExit as waiting:
                lines.append(f"- `{arch}`: not chosen yet ({str(waiting).removeprefix('error: ')})")
    table = '\n'.join(lines) + '\n'
    (results_dir / 'table.md').write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('protocol', choices=sorted(PROTOCOLS))
    parser.add_argument('--data', default=None, help='ImageFolder dataset root (train/ and val/)')
    parser.add_argument('--archs', nargs='+', default=None, help="subset of the protocol's architectures")
    parser.add_argument('--methods', nargs='+', default=None, choices=sorted(METHODS),
                        help="subset of the protocol's methods")
    parser.add_argument('--seeds', nargs='+', type=int, default=None, help="seeds (default: the protocol's)")
    parser.add_argument('--runs-dir', default=None, help='recipe output folders (default: runs/reproduce/PROTOCOL)')
    parser.add_argument('--results-dir', default=None,
                        help='one JSON per run and table.md (default: benchmarks/results/reproduce_PROTOCOL; '
                             'zoo_cpu for the zoo protocol)')
    parser.add_argument('--table-only', action='store_true', help='only rebuild table.md from the finished runs')
    parser.add_argument('--rerun', action='store_true',
                        help='train runs whose result is committed again, for their checkpoints (ship_zoo.py), and '
                             'check that they are the committed runs (with other CPU kernels: keep their own result '
                             'in reruns/)')
    parser.add_argument('--overhead', action='store_true',
                        help="measure the protocol's step overhead (benchmarks/overhead.py) into its results folder, "
                             'then rebuild table.md')
    args = parser.parse_args()

    config = PROTOCOLS[args.protocol]
    unknown = sorted(set(args.archs or []) - set(config['archs']))
    if unknown:
        parser.error(f"--archs {' '.join(unknown)}: not in the {args.protocol} protocol, whose architectures are "
                     f"{', '.join(config['archs'])}")
    results_dir = Path(args.results_dir or results_folder(args.protocol)).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    if args.overhead:
        measure_overhead(args.protocol, results_dir)
    elif not args.table_only:
        check_data_root(args.data)
        # relative to the repository, where the runs start, so that recorded commands hold no local paths
        runs_dir = Path(os.path.relpath(Path(args.runs_dir or runs_folder(args.protocol)).resolve(), REPO))
        data = os.path.relpath(Path(args.data).resolve(), REPO)
        # Seeds outermost: a grid cut short still has every method at the first seeds.
        for seed in args.seeds or config['seeds']:
            for arch in args.archs or config['archs']:
                for method in args.methods or pilot_methods(args.protocol, arch, results_dir):
                    if method not in pilot_methods(args.protocol, arch, results_dir):
                        continue
                    train_one(args.protocol, config, data, arch, method, seed, runs_dir, results_dir, args.rerun)
                    write_table(args.protocol, config, results_dir)
    print(write_table(args.protocol, config, results_dir))


if __name__ == '__main__':
    main()
