"""The studies' definitions, shared by the benchmark scripts: the methods and their recipe flags, the protocols, where
their results live and how to read them.

``reproduce.py`` trains a protocol's grid and writes its table; ``ship_zoo.py``, ``transfer_zoo.py`` and
``transfer_saliency.py`` read what it wrote. Imported from beside this file (``sys.path``), as a script's neighbour.
"""
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'train'))
from presets import load_presets, rho_for_arch  # noqa: E402, train/presets.py

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results'
# the subfolder of a protocol's results that holds the runs --rerun trained again with other CPU kernels than the
# committed run's: new runs of the same command, which ship_zoo ships with their own figures
RERUNS = 'reruns'
# benchmarks/overhead.py's timing of a protocol: the recipe's batch and memory format, 3 untimed and 10 timed steps
OVERHEAD_ARGS = ['--batch-size', '64', '--channels-last', '--warmup', '3', '--steps', '10']

# Recipe flags per method. The paper's dropout baseline drops the same latent features; its probability was lost in
# the text extraction of the paper, so we use the usual 0.5. The curriculum's start and end are not given either: we
# grow rho linearly from 0 to 2.5x the fixed value (for VGG, 0.025, the largest rho the paper's Table 7 trains well).
METHODS: dict[str, list[str]] = {
    'vanilla': ['--regularizer', 'none'],
    'dropout': ['--regularizer', 'dropout', '--latent-drop-rate', '0.5'],
    'sgdrop': ['--regularizer', 'sgdrop', '--sgdrop-attribution', 'ema'],
    'sgdrop_online': ['--regularizer', 'sgdrop', '--sgdrop-attribution', 'online'],
    'sgdrop_curriculum': ['--regularizer', 'sgdrop', '--sgdrop-rho', '0.0', '--sgdrop-rho-end', 'RHO_END'],
    # the sign-aware attribution ReLU(d logit_y / d z * z), for the signed latent of ConvNeXt
    'sgdrop_product': ['--regularizer', 'sgdrop', '--sgdrop-attribution', 'ema', '--sgdrop-attribution-relu',
                       'product'],
    # the candidates of the method pilot (benchmarks/README.md, "Method pilot"), each naming its rho
    'sgdrop_rho0.05': ['--regularizer', 'sgdrop', '--sgdrop-attribution', 'ema', '--sgdrop-rho', '0.05'],
    'sgdrop_rho0.1': ['--regularizer', 'sgdrop', '--sgdrop-attribution', 'ema', '--sgdrop-rho', '0.1'],
    'sgdrop_curriculum0.1': ['--regularizer', 'sgdrop', '--sgdrop-attribution', 'ema', '--sgdrop-rho', '0.0',
                             '--sgdrop-rho-end', '0.1'],
    'sgdrop_product_rho0.01': ['--regularizer', 'sgdrop', '--sgdrop-attribution', 'ema', '--sgdrop-attribution-relu',
                               'product', '--sgdrop-rho', '0.01'],
    # attribution ReLU(d logit_y / d z * (z - r)) against the channel mean r, dropped features set to r
    'sgdrop_channel_mean_rho0.01': ['--regularizer', 'sgdrop', '--sgdrop-attribution', 'ema', '--sgdrop-reference',
                                    'channel_mean', '--sgdrop-attribution-relu', 'product', '--sgdrop-rho', '0.01'],
    'sgdrop_channel_mean_rho0.1': ['--regularizer', 'sgdrop', '--sgdrop-attribution', 'ema', '--sgdrop-reference',
                                   'channel_mean', '--sgdrop-attribution-relu', 'product', '--sgdrop-rho', '0.1'],
}


def attribution_source(flags: list[str]) -> Optional[str]:
    """The weights a method's flags compute the attribution with (the recipe's default, the EMA, where they name none);
    None for a method without SGDrop."""
    if flags[flags.index('--regularizer') + 1] != 'sgdrop':
        return None
    return flags[flags.index('--sgdrop-attribution') + 1] if '--sgdrop-attribution' in flags else 'ema'


def with_attribution(flags: list[str], source: str) -> list[str]:
    """A method's flags with the attribution computed by ``source`` instead."""
    if '--sgdrop-attribution' not in flags:
        return [*flags, '--sgdrop-attribution', source]
    at = flags.index('--sgdrop-attribution') + 1
    return [*flags[:at], source, *flags[at + 1:]]


# each EMA method with the cheaper source, the EMA network's head on the online latent: '<method>_ema_head'
METHODS.update({f'{method}_ema_head': with_attribution(flags, 'ema_head') for method, flags in list(METHODS.items())
                if attribution_source(flags) == 'ema'})


def step_overhead_figure(method: str) -> Optional[str]:
    """The ``benchmarks/overhead.py`` figure that times a method's training step: that of the weights its flags compute
    the attribution with; None for a method without SGDrop, whose step is the baseline."""
    source = attribution_source(METHODS[method])
    return None if source is None else f'sgdrop_{source}_overhead'


# The families of the 128 px zoo, the same in its pilot and its final study: VGG-11 with the zoo's narrow head, and
# each family's epochs (VGG-11's step costs 4.5x ResNet-10-T's)
ZOO128_FAMILIES = {
    'archs': ['sgdrop_resnet10t', 'sgdrop_convnext_atto', 'sgdrop_vgg11'],
    'model_kwargs': {'sgdrop_vgg11': {'mlp_ratio': 0.03125}},
    'epochs': {'sgdrop_resnet10t': 40, 'sgdrop_convnext_atto': 40, 'sgdrop_vgg11': 20},
}

# The 128 px pilots' recipe arguments: 150 training images per class, a dev split of 100 other training images per
# class validated every epoch
PILOT128_ARGS = ['--preset', 'lowdata', '--image-size', '128', '--train-subset-per-class', '150',
                 '--holdout-per-class', '100', '--in-memory', '--channels-last', '--train-eval-samples', '500',
                 '--log-area-ratio', '100', '-j', '2', '-p', '1000']
# what else the 128 px pilots share: one seed, every epoch validated on the dev split, and no paper figure to compare
PILOT128_RUNS = {
    'seeds': [0],
    'args': PILOT128_ARGS,
    'curve_val_subset': 0,
    'paper_dataset': 'Imagenette at 224 px with VGG16 / ResNet50 / ConvNeXt-T (Table 3); other architectures and a dev '
                     'split, so no figure compares directly',
    'paper': {},
}

# Protocols: the recipe's low-data preset (from scratch, Adam 1e-4, resize only, constant lr, batch 64) at a size
# that fits the hardware. `paper` holds the paper's Table 3 / Section 4.3 top-1 for the closest setting.
PROTOCOLS: dict[str, dict] = {
    'cpu': {
        'description': "The paper's CIFAR-10 network (sgdrop_cifar_cnn) from scratch on a fixed 1,000-image subset "
                       "of ../shared/data/cifar10_subset (about 100 per class) at 32 px, 30 epochs of the low-data "
                       "protocol (Adam 1e-4, batch 64, constant lr, no augmentation). Per-epoch curves on a fixed "
                       "1,000-image subset of the validation split, with the attribution area ratio on 200 of them; "
                       "the final weights are then evaluated on the full 10,000-image CIFAR-10 test set. Clean train "
                       "accuracy on all 1,000 training images. 2 CPU threads.",
        'archs': ['sgdrop_cifar_cnn'],
        'methods': ['vanilla', 'dropout', 'sgdrop'],
        'seeds': [0, 1, 2],
        'args': ['--preset', 'lowdata', '--image-size', '32', '--epochs', '30', '--train-subset', '1000',
                 '--in-memory', '--channels-last', '--train-eval-samples', '1000', '--log-area-ratio', '200', '-j', '2',
                 '-p', '1000'],
        'curve_val_subset': 1000,
        'paper_dataset': 'CIFAR-10 (full 50,000 training images, 100 epochs)',
        'paper': {'sgdrop_cifar_cnn': {'vanilla': 79.11, 'dropout': 81.60, 'sgdrop': 81.57}},
    },
    'zoo': {
        'description': "The zoo's CPU checkpoints: small members of each family (VGG: sgdrop_vgg_tiny, then "
                       "timm's vgg11 with a 128-wide head, --model-kwargs mlp_ratio=0.03125, which plain timm "
                       "loads) from scratch on ../shared/data/imagenette (official split) at 64 px, on a fixed "
                       "class-balanced subset of 150 training images per class (1,500 images), 40 epochs of the "
                       "paper's low-data protocol (Adam 1e-4, batch 64, constant lr, resize only, no augmentation; "
                       "rho 0.01 for VGG and ResNet, 0.1 "
                       "for ConvNeXt, Appendix B). Per-epoch curves on a fixed 1,000-image subset of the validation "
                       "split, with the attribution area ratio on 200 of them; the final weights are then evaluated "
                       "on all 3,925 validation images. Clean train accuracy on all 1,500 training images. 2 CPU "
                       "threads.",
        'archs': ['sgdrop_resnet10t', 'sgdrop_convnext_atto', 'sgdrop_vgg_tiny', 'sgdrop_vgg11'],
        # timm's vgg11 with a 128-wide first head layer instead of 4096: 13.0M parameters, which plain timm rebuilds
        # from the export's model_args
        'model_kwargs': {'sgdrop_vgg11': {'mlp_ratio': 0.03125}},
        'methods': ['vanilla', 'sgdrop'],
        # the tag of its checkpoints, and its results folder (the study ran before the folder followed the protocol)
        'tag': 'imagenette_64',
        'results': 'zoo_cpu',
        'seeds': [0, 1, 2],
        'args': ['--preset', 'lowdata', '--image-size', '64', '--epochs', '40', '--train-subset-per-class', '150',
                 '--in-memory', '--channels-last', '--train-eval-samples', '1500', '--log-area-ratio', '200', '-j', '2',
                 '-p', '1000'],
        'curve_val_subset': 1000,
        'paper_dataset': 'Imagenette at 224 px with VGG16 / ResNet50 / ConvNeXt-T (Table 3); other architectures, '
                         'so no figure compares directly',
        'paper': {},
    },
    'pilot128': {
        'description': "Pilot of the 128 px zoo, on a dev split: Imagenette's training folder only, at the 128 px it "
                       "is stored at; a fixed class-balanced subset of 150 training images per class (the 64 px "
                       "zoo's images) and a disjoint, fixed dev split of 100 other training images per class "
                       "(--holdout-per-class 100, 1,000 images) that every epoch is validated on; the paper's "
                       "low-data protocol (Adam 1e-4, batch 64, constant lr, resize only), 1 seed. Epochs: 40 for "
                       "ResNet-10-T and ConvNeXt-Atto, 20 for VGG-11 (its step costs 4.5x ResNet-10-T's). Clean "
                       "train top-1 on 500 fixed training images, attribution area ratio on 100 dev images. 2 CPU "
                       "threads. The official validation split is not read.",
        **ZOO128_FAMILIES,
        # the candidates, fixed before the first run (benchmarks/README.md, "Zoo v2 pilot")
        'methods': {'sgdrop_resnet10t': ['vanilla', 'sgdrop'],
                    'sgdrop_convnext_atto': ['vanilla', 'sgdrop', 'sgdrop_product'],
                    'sgdrop_vgg11': ['vanilla', 'sgdrop', 'sgdrop_curriculum']},
        **PILOT128_RUNS,
    },
    'pilot128v2': {
        'description': "Method pilot of the 128 px zoo, on the dev split of the pilot128 protocol (the same 150 "
                       "training images per class of Imagenette's training folder, the same 100 other training "
                       "images per class as the dev split, the same 40 / 20 epochs and settings, seed 0): rho for "
                       "ResNet-10-T, a reference-aware or sign-aware mask for ConvNeXt-Atto, and the cheaper "
                       "ema_head attribution of each family's choice. The official validation split is not read.",
        **ZOO128_FAMILIES,
        # the candidates, fixed before the first run (benchmarks/README.md, "Method pilot"), closest to the paper's
        # defaults first; vanilla and the pilot128 candidates are that protocol's committed runs (baseline_results)
        'candidate_order': {'sgdrop_resnet10t': ['sgdrop', 'sgdrop_rho0.05', 'sgdrop_curriculum0.1', 'sgdrop_rho0.1'],
                            'sgdrop_convnext_atto': ['sgdrop', 'sgdrop_product', 'sgdrop_channel_mean_rho0.1',
                                                     'sgdrop_product_rho0.01', 'sgdrop_channel_mean_rho0.01'],
                            'sgdrop_vgg11': ['sgdrop_curriculum']},
        'baseline_results': 'reproduce_pilot128',
        # trained here: the new candidates; each family's <choice>_ema_head joins once the others have chosen
        'methods': {'sgdrop_resnet10t': ['sgdrop_rho0.05', 'sgdrop_rho0.1', 'sgdrop_curriculum0.1'],
                    'sgdrop_convnext_atto': ['sgdrop_channel_mean_rho0.01', 'sgdrop_channel_mean_rho0.1',
                                             'sgdrop_product_rho0.01'],
                    'sgdrop_vgg11': []},
        **PILOT128_RUNS,
    },
    'zoo128': {
        'description': "The 128 px zoo, the final study of each family's protocol as its dev-split pilot chose it "
                       "(benchmarks/README.md, \"Zoo v2 pilot\"): the pilot's settings without the holdout, from "
                       "scratch on the same 150 training images per class of ../shared/data/imagenette, at 128 px, "
                       "the paper's low-data protocol (Adam 1e-4, batch 64, constant lr, resize only); per-epoch "
                       "curves on a fixed 1,000-image subset of the official validation split, with the attribution "
                       "area ratio on 200 of them; the final weights evaluated on all 3,925 validation images. Clean "
                       "train top-1 on 500 fixed training images. 2 CPU threads.",
        **ZOO128_FAMILIES,
        # each family's SGDrop method is the one its pilot chose; a family enters when its pilot is done, and a method
        # pilot's choice joins the family's earlier methods (benchmarks/README.md, "Method pilot", final study) before
        # its first run; a family ships the last chosen method whose final study has run
        'methods': {'sgdrop_resnet10t': ['vanilla', 'sgdrop', 'sgdrop_ema_head'],
                    'sgdrop_convnext_atto': ['vanilla', 'sgdrop', 'sgdrop_channel_mean_rho0.01_ema_head'],
                    'sgdrop_vgg11': ['vanilla', 'sgdrop_curriculum', 'sgdrop_curriculum_ema_head']},
        'ship': ['sgdrop_resnet10t', 'sgdrop_convnext_atto', 'sgdrop_vgg11'],
        'ship_method': {'sgdrop_resnet10t': 'sgdrop_ema_head',
                        'sgdrop_convnext_atto': 'sgdrop_channel_mean_rho0.01_ema_head',
                        'sgdrop_vgg11': 'sgdrop_curriculum_ema_head'},
        'tag': 'imagenette_128',
        # a family's pair under a tag of its own where a method pilot changed its method: new weights, new tags
        'pair_tag': {'sgdrop_resnet10t': 'imagenette_128_ema_head',
                     'sgdrop_convnext_atto': 'imagenette_128_channel_mean',
                     'sgdrop_vgg11': 'imagenette_128_ema_head'},
        'seeds': [0, 1, 2],
        'args': ['--preset', 'lowdata', '--image-size', '128', '--train-subset-per-class', '150', '--in-memory',
                 '--channels-last', '--train-eval-samples', '500', '--log-area-ratio', '200', '-j', '2', '-p', '1000'],
        'curve_val_subset': 1000,
        'paper_dataset': 'Imagenette at 224 px with VGG16 / ResNet50 / ConvNeXt-T (Table 3); other architectures, '
                         'so no figure compares directly',
        'paper': {},
    },
    'gpu': {
        'description': "The paper's Table 3 protocol on ../shared/data/imagenette: from scratch, Adam 1e-4, 80 "
                       "epochs, batch 64, no augmentation, rho per Appendix B, images resized to 128 px (the size "
                       "the shared copy is stored at; the paper upsampled to 224), bf16, channels_last, in-memory "
                       "data.",
        'archs': ['sgdrop_vgg16', 'sgdrop_resnet50', 'sgdrop_convnext_tiny'],
        # the headline pair first: paper 67.21 -> 81.00 for VGG16
        'methods': ['vanilla', 'sgdrop', 'dropout', 'sgdrop_online', 'sgdrop_curriculum'],
        'seeds': [0],
        'args': ['--preset', 'lowdata', '--image-size', '128', '--epochs', '80', '--in-memory', '--amp',
                 '--channels-last', '--train-eval-samples', '2000', '-j', '8', '-p', '1000'],
        'curve_val_subset': 0,
        'paper_dataset': 'Imagenette at 224 px',
        'paper': {
            'sgdrop_vgg16': {'vanilla': 67.21, 'dropout': 68.66, 'sgdrop': 81.00, 'sgdrop_curriculum': 81.82},
            'sgdrop_resnet50': {'vanilla': 74.96, 'dropout': 74.08, 'sgdrop': 77.54, 'sgdrop_online': 75.25,
                                'sgdrop_curriculum': 77.14},
            'sgdrop_convnext_tiny': {'vanilla': 55.08, 'dropout': 55.36, 'sgdrop': 67.42,
                                     'sgdrop_curriculum': 65.34},
        },
    },
}


def results_folder(protocol: str) -> Path:
    """Where a protocol's results are written by default: ``benchmarks/results/reproduce_PROTOCOL``, or the folder its
    config names."""
    return RESULTS / PROTOCOLS[protocol].get('results', f'reproduce_{protocol}')


def runs_folder(protocol: str) -> Path:
    """Where a protocol's recipe output folders are written by default: ``runs/reproduce/PROTOCOL``."""
    return REPO / 'runs' / 'reproduce' / protocol


def read_results(results_dir: Path) -> list[dict]:
    """Every run result of a results folder (``<arch>__<method>__seed<N>.json``), in name order.

    Raises:
        SystemExit: A result that is not JSON (a write cut short), naming it.
    """
    results = []
    for path in sorted(results_dir.glob('*__*__seed*.json')):
        try:
            results.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise SystemExit(f'error: {os.path.relpath(path, REPO)} is not a run result ({e}); restore it (git '
                             f'checkout) or delete it to train that run again') from None
    return results


def check_data_root(data: Optional[str]) -> None:
    """Refuse, in one line, a ``--data`` that is not an ImageFolder root with ``train/`` and ``val/``."""
    if data is None or not (Path(data) / 'train').is_dir() or not (Path(data) / 'val').is_dir():
        raise SystemExit(f'error: --data must be an ImageFolder root with train/ and val/, got {data!r}')


def family_rho(arch: str) -> float:
    """The fixed rho the low-data preset trains ``arch`` with (Appendix B), the base of the curriculum's end."""
    return rho_for_arch(arch, load_presets()['lowdata'])


def overhead_commands(protocol: str) -> dict[str, list[str]]:
    """The ``benchmarks/overhead.py`` arguments that measure a protocol's step overhead, by the file they write to its
    results folder: ``overhead.json`` for the architectures without --model-kwargs, ``overhead_<arch>.json`` for
    each with them, at the protocol's image size."""
    config = PROTOCOLS[protocol]
    args = config['args']
    common = ['--image-size', args[args.index('--image-size') + 1], *OVERHEAD_ARGS,
              *(['--amp'] if '--amp' in args else [])]
    model_kwargs = config.get('model_kwargs', {})
    plain = [arch for arch in config['archs'] if not model_kwargs.get(arch)]
    commands = {'overhead.json': ['--models', *plain, *common]} if plain else {}
    for arch in config['archs']:
        if model_kwargs.get(arch):
            kwargs = [f'{key}={value}' for key, value in model_kwargs[arch].items()]
            commands[f"overhead_{arch.removeprefix('sgdrop_')}.json"] = ['--models', arch, '--model-kwargs', *kwargs,
                                                                          *common]
    return commands


def read_overhead(protocol: str, results_dir: Path) -> dict[str, dict]:
    """The step overhead of a protocol's architectures, with the command that measured each.

    Raises:
        SystemExit: A file of ``overhead_commands`` is missing, in one line naming the command that makes it.
    """
    overhead = {}
    for name in overhead_commands(protocol):
        path = results_dir / name
        if not path.is_file():
            raise SystemExit(f'error: {os.path.relpath(path, REPO)} is missing; measure it with python '
                             f'benchmarks/reproduce.py {protocol} --overhead')
        report = json.loads(path.read_text())
        overhead.update({arch: dict(result, command=report['command']) for arch, result in report['results'].items()})
    return overhead


def run_name(arch: str, method: str, seed: int) -> str:
    return f'{arch}__{method}__seed{seed}'


def method_args(method: str, arch: str) -> list[str]:
    if method not in METHODS:
        raise SystemExit(f"error: unknown method {method!r}; choose from {', '.join(METHODS)}")
    return [f'{2.5 * family_rho(arch):g}' if flag == 'RHO_END' else flag for flag in METHODS[method]]


def protocol_methods(config: dict, arch: str) -> list[str]:
    """The protocol's methods, or those it names for ``arch`` when it has methods per architecture (none yet for a
    family whose pilot has not chosen them)."""
    methods = config['methods']
    return methods.get(arch, []) if isinstance(methods, dict) else methods


def curve_difference(curve: list[dict], committed_curve: list[dict]) -> Optional[str]:
    """The first epoch figure of a training curve (a run's log.jsonl) that is not a committed result's, in words, or
    None when every epoch's training loss and val top-1 are the same to the bit: the test of "the same run" that
    ``--rerun`` and ship_zoo share. The loss is compared because other CPU kernels change it in its sixth digit
    epochs before they change a top-1."""
    if len(curve) != len(committed_curve):
        return f'the re-trained run has {len(curve)} epochs, the committed result {len(committed_curve)}'
    for ours, theirs in zip(curve, committed_curve):
        for key in ('train_loss', 'val_acc1'):
            if ours[key] != theirs[key]:
                return (f"the re-trained run's epoch {ours['epoch']} gives {key} {ours[key]}, the committed result "
                        f'{theirs[key]}')
    return None


def mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f'{values[0]:.{digits}f}'
    return f'{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}'
