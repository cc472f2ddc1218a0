"""The ``sgdrop-zoo`` command line.

    sgdrop-zoo models                                   # the registered SGDrop models
    sgdrop-zoo info sgdrop_vgg16 --image-size 224       # latent map and features dropped per sample
    sgdrop-zoo publish runs/vgg16 --repo-id ORG/NAME    # upload a trained checkpoint to the Hugging Face Hub
    sgdrop-zoo model-card --output MODEL_CARD.md        # regenerate the zoo's card from hub_configs/
    sgdrop-zoo finetune --model runs/vgg --data DIR --output runs/probe   # linear probe (or --mode full)
    sgdrop-zoo saliency --model runs/a --model runs/b --data DIR --output runs/saliency   # area, coverage, grid
    sgdrop-zoo plot runs/a/log.jsonl runs/b/log.jsonl --output curves.png           # accuracy (and area) per epoch
"""
import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import timm
import torch

from .data import MAX_IMAGE_SIZE
from .errors import OptionError
from .finetune import MODES, TRAIN_TRANSFORMS, finetune
from .hub import publish_checkpoint
from .plots import plot_runs
from .model_card import render_model_card
from .hub_files import HubError
from .pretrained import load_hub_configs, retired_tag
from .run_files import RunFileError, check_writable_file
from .saliency import format_table, saliency_report
from .sgdrop import DEFAULT_RHO, num_dropped_features

# the flag of each API parameter that the library's errors name and that is not ``--<name with hyphens>``
FLAGS = {'dry_run_dir': '--output', 'labels': '--label', 'model_name': '--model', 'model_names': '--model'}


def list_models_command(args: argparse.Namespace) -> int:
    for name in timm.list_models(args.filter):
        tags = [tag for tag in timm.list_pretrained(name) if '.' in tag]
        print(name + (f'  (pretrained: {", ".join(tags)})' if tags else ''))
    return 0


def info_command(args: argparse.Namespace) -> int:
    if args.model not in timm.list_models('sgdrop_*') + timm.list_pretrained('sgdrop_*'):
        retired = retired_tag(args.model)
        raise ValueError(f'{args.model}: {retired}.' if retired else f'unknown model {args.model!r}; `sgdrop-zoo '
                         f'models` lists them, with their pretrained tags.')
    if args.image_size is not None and not 1 <= args.image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"--image-size must be from 1 to {MAX_IMAGE_SIZE} px, or left out for the model's, got "
                         f'{args.image_size}.')
    if args.num_classes < 1:
        raise ValueError(f'--num-classes must be at least 1, got {args.num_classes}.')
    # on the meta device: shapes and parameter counts, without allocating or computing anything at any image size
    with torch.device('meta'):
        rho = {} if args.sgdrop_rho is None else {'sgdrop_rho': args.sgdrop_rho}
        model = timm.create_model(args.model, num_classes=args.num_classes, **rho).eval()
        size = args.image_size or model.pretrained_cfg['input_size'][-1]
        try:
            features = model.forward_features(torch.zeros(1, 3, size, size))
        except RuntimeError as e:  # a pooling or stride left with less than one pixel
            raise ValueError(f'--image-size {size} is too small for {args.model} ({str(e).splitlines()[0]}).') from e
    num_features = features[0].numel()
    print(f'model:            {args.model} ({type(model).__name__})')
    print(f'input:            3x{size}x{size}')
    print(f'latent map:       {"x".join(map(str, features.shape[1:]))} = {num_features} features')
    print(f'dropped / sample: {num_dropped_features(model.sgdrop_rho, num_features)} at sgdrop_rho={model.sgdrop_rho}')
    settings = ', '.join(f'{name}={value}' for name, value in model.sgdrop_cfg.model_args().items())
    print(f'settings:         {settings}')
    print(f'parameters:       {sum(p.numel() for p in model.parameters()):,}')
    return 0


def publish_command(args: argparse.Namespace) -> int:
    if args.output is not None and not args.dry_run:
        raise ValueError('--output is the folder of a dry run: pass --dry-run with it, or leave --output out to '
                         'upload.')
    dry_run_dir = (args.output if args.output is not None else args.repo_id.split('/')[-1]) if args.dry_run else None
    result = publish_checkpoint(
        args.checkpoint, args.repo_id, revision=args.revision, private=args.private,
        token_from_env=args.token_from_env, dry_run_dir=dry_run_dir, dataset=args.dataset, tag=args.tag,
        license=args.license, dataset_license=args.dataset_license)
    print(f'{"wrote" if args.dry_run else "published"} {result.location}', file=sys.stderr)
    # the hub_configs/ record, to save as hub_configs/<architecture>.<tag>.json once the upload is checked
    print(json.dumps(result.record, indent=2))
    return 0


def model_card_command(args: argparse.Namespace) -> int:
    if args.output:
        check_writable_file(Path(args.output), args.overwrite)
    card = render_model_card(load_hub_configs())
    if args.output:
        card.save(args.output)
    else:
        print(card.content)
    return 0


def finetune_command(args: argparse.Namespace) -> int:
    metrics = finetune(
        args.model, args.data, args.output, mode=args.mode, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        image_size=args.image_size, sgdrop_rho=args.sgdrop_rho, train_transform=args.train_transform,
        evaluate_only=args.evaluate, seed=args.seed, workers=args.workers,
        train_subset_per_class=args.train_subset_per_class, val_subset_per_class=args.val_subset_per_class,
        overwrite=args.overwrite)
    print(json.dumps(metrics, indent=2))
    return 0


def saliency_command(args: argparse.Namespace) -> int:
    results = saliency_report(args.model, args.data, args.output, split=args.split, image_size=args.image_size,
                              batch_size=args.batch_size, grid_images=args.grid_images, workers=args.workers,
                              num_images=args.num_images, labels=args.label, overwrite=args.overwrite,
                              command=shlex.join(['sgdrop-zoo', *args.argv]))
    print(format_table(results))
    print(f'wrote {args.output}/saliency.json and {args.output}/saliency_grid.png', file=sys.stderr)
    return 0


def plot_command(args: argparse.Namespace) -> int:
    check_writable_file(Path(args.output), args.overwrite)
    print(f'wrote {plot_runs(args.logs, args.output, labels=args.label)}', file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='sgdrop-zoo', description='Saliency-Guided Dropout models for timm.')
    commands = parser.add_subparsers(dest='command', required=True)
    models = commands.add_parser('models', help='list the registered SGDrop models')
    models.add_argument('filter', nargs='?', default='sgdrop_*', help='wildcard filter (default: sgdrop_*)')
    models.set_defaults(func=list_models_command)
    info = commands.add_parser('info', help='latent feature map and SGDrop mask size of a model')
    info.add_argument('model', help='registered model name or pretrained tag, e.g. sgdrop_resnet50 or '
                                    'sgdrop_resnet10t.imagenette_128_ema_head')
    info.add_argument('--image-size', type=int, default=None,
                      help=f"input side, 1 to {MAX_IMAGE_SIZE} (default: the model's)")
    info.add_argument('--sgdrop-rho', type=float, default=None,
                      help=f"share of features dropped (default: the tag's, or the paper's {DEFAULT_RHO})")
    info.add_argument('--num-classes', type=int, default=10, help='classes of the head (10)')
    info.set_defaults(func=info_command)
    publish = commands.add_parser('publish', help='upload a trained checkpoint to the Hugging Face Hub')
    publish.add_argument('checkpoint', metavar='CHECKPOINT_OR_DIR',
                         help='output folder of train/main.py (model.safetensors + config.json) or a .pth.tar')
    publish.add_argument('--repo-id', required=True, metavar='ORG/NAME', help='Hub repo to create')
    publish.add_argument('--revision', default=None, help='new branch to publish to (default: main of a new repo)')
    publish.add_argument('--private', action='store_true', help='create a private repo')
    publish.add_argument('--token-from-env', action='store_true',
                         help='read the token from HF_TOKEN only (default: HF_TOKEN, then the `hf auth login` token)')
    publish.add_argument('--dry-run', action='store_true', help='write the repo folder locally, upload nothing')
    publish.add_argument('--output', default=None, metavar='DIR', help='dry-run folder (default: ./NAME)')
    publish.add_argument('--dataset', default=None, help='dataset name for the card (default: from the config)')
    publish.add_argument('--tag', default=None, help="pretrained tag (default: NAME after its last '.')")
    publish.add_argument('--license', default='apache-2.0', help='license of the weights (apache-2.0)')
    publish.add_argument('--dataset-license', default=None, metavar='TEXT',
                         help="the terms of the training data, for the record, the card and timm's notes")
    publish.set_defaults(func=publish_command)
    card = commands.add_parser('model-card', help="render the zoo's model card from hub_configs/")
    card.add_argument('--output', default=None, metavar='PATH', help='write it here (default: print it)')
    card.add_argument('--overwrite', action='store_true', help='replace an existing --output')
    card.set_defaults(func=model_card_command)
    tune = commands.add_parser('finetune', help='fine-tune a model on an ImageFolder dataset (linear probe or full)')
    tune.add_argument('--model', required=True, metavar='NAME_OR_PATH',
                      help='zoo name (NAME or NAME.TAG), hf-hub:ORG/NAME, local-dir:PATH, an export folder or '
                           'model.safetensors, or a model_best.pth.tar of train/main.py')
    tune.add_argument('--data', required=True, metavar='DIR',
                      help='dataset root holding train/<class>/ and val/<class>/')
    tune.add_argument('--output', required=True, metavar='DIR', help='folder for the weights, config and metrics')
    tune.add_argument('--mode', default='linear-probe', choices=MODES,
                      help='linear-probe: frozen encoder, new classifier; full: train everything (linear-probe)')
    tune.add_argument('--sgdrop-rho', type=float, default=0.0, help='SGDrop share of latent features (0: off)')
    tune.add_argument('--epochs', type=int, default=10, help='training epochs (10)')
    tune.add_argument('--lr', type=float, default=None, help='Adam learning rate (1e-3 linear-probe, 1e-4 full)')
    tune.add_argument('--batch-size', type=int, default=64, help='images per step (64)')
    tune.add_argument('--image-size', type=int, default=None, help="input side (default: the model's)")
    tune.add_argument('--train-transform', default='resize', choices=TRAIN_TRANSFORMS,
                      help='resize (paper low-data protocol) or crop-flip (random resized crop + flip) (resize)')
    tune.add_argument('--evaluate', action='store_true',
                      help="only measure the model on val/; the dataset must have the model's classes")
    tune.add_argument('--seed', type=int, default=0, help='seed of the new head, shuffling and crops (0)')
    tune.add_argument('--workers', type=int, default=2, help='image decoding workers (2)')
    tune.add_argument('--train-subset-per-class', type=int, default=0, metavar='N',
                      help='train on a fixed, class-balanced subset of N images per class (0: all)')
    tune.add_argument('--val-subset-per-class', type=int, default=0, metavar='N',
                      help='validate on a fixed, class-balanced subset of N images per class (0: all)')
    tune.add_argument('--overwrite', action='store_true',
                      help='replace the files of an earlier run in --output instead of refusing to start')
    tune.set_defaults(func=finetune_command)
    saliency = commands.add_parser('saliency', help='attribution area ratio, neuron coverage, accuracy, Grad-CAM grid')
    saliency.add_argument('--model', required=True, action='append', metavar='NAME_OR_PATH',
                          help="a model as for finetune, with the dataset's classes; repeat to compare models")
    saliency.add_argument('--data', required=True, metavar='DIR', help='dataset root holding train/ and val/')
    saliency.add_argument('--output', required=True, metavar='DIR', help='folder for saliency.json and the PNG grid')
    saliency.add_argument('--split', default='val', help='split measured (val)')
    saliency.add_argument('--image-size', type=int, default=None, help="input side (default: the first model's)")
    saliency.add_argument('--batch-size', type=int, default=32, help='images per batch (32)')
    saliency.add_argument('--grid-images', type=int, default=8, help='rows of the PNG grid (8)')
    saliency.add_argument('--workers', type=int, default=2, help='image decoding workers (2)')
    saliency.add_argument('--num-images', type=int, default=None, metavar='N',
                          help='measure N images of the split drawn by a fixed seed, the same for every model '
                               '(default: all)')
    saliency.add_argument('--label', action='append', default=None,
                          help='name per --model in the JSON, table and grid (default: the --model values)')
    saliency.add_argument('--overwrite', action='store_true',
                          help='replace the report of an earlier run in --output instead of refusing to start')
    saliency.set_defaults(func=saliency_command)
    plot = commands.add_parser('plot', help='validation accuracy (and area ratio) per epoch of several runs')
    plot.add_argument('logs', nargs='+', metavar='LOG', help='log.jsonl files or run folders')
    plot.add_argument('--output', required=True, metavar='PATH', help='image file (.png, .svg or .pdf)')
    plot.add_argument('--label', action='append', default=None, help='legend name per log (default: folder names)')
    plot.add_argument('--overwrite', action='store_true', help='replace an existing --output')
    plot.set_defaults(func=plot_command)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    import sgdrop_zoo  # noqa: F401  (registers the models with timm)

    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # what the results record
    try:
        return args.func(args)
    # bad input, which the package reports in one line; anything else is a bug, whose traceback is needed
    except OptionError as error:
        print(f'error: {error.for_command_line(FLAGS)}', file=sys.stderr)
        return 2
    except (ValueError, HubError, RunFileError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
