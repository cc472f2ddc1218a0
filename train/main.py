"""Train a timm classifier with Saliency-Guided Dropout (SGDrop) on an ImageFolder dataset.

The interface and defaults are those of the official PyTorch ImageNet example (pytorch/examples `imagenet/main.py`),
which the SGDrop paper used for its ImageNet and Places365 results: same arguments, SGD + StepLR, RandomResizedCrop +
flip, `checkpoint.pth.tar` / `model_best.pth.tar`. On top of it: any timm architecture, the SGDrop options and the
paper's baselines (`--regularizer`), plain-data presets (`--preset lowdata` is the paper's low-data protocol), torchrun,
bf16 autocast, channels_last, torch.compile and an in-memory dataset for small data.

Paper: Saliency-Guided Dropout, Bertoin et al., https://arxiv.org/abs/2409.17370

Examples:
    python train/main.py ../shared/data/imagenette --preset demo --output runs/demo
    python train/main.py DATA --preset lowdata -a sgdrop_vgg16 --output runs/vgg16
    torchrun --nproc-per-node 8 train/main.py DATA -a sgdrop_resnet50 --dist-url env:// --amp --channels-last
    python train/main.py DATA -a sgdrop_resnet50 --resume runs/r50/model_best.pth.tar --evaluate
"""
import argparse
import collections
import difflib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.backends.cudnn as cudnn
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.utils.data
import torch.utils.data.distributed
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from safetensors import SafetensorError

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import AverageMeter, ParseKwargs, accuracy, random_seed

import sgdrop_zoo
from sgdrop_zoo.data import (
    DatasetError,
    InMemoryLoader,
    check_image_folders,
    decode_images,
    eval_transform,
    load_rgb,
    per_class_subset,
    stored_train_resize,
    with_transform,
)
from sgdrop_zoo.export import PARTIAL_WRITE_SUFFIX, regularizer_settings, save_recipe_export
from sgdrop_zoo.loading import check_writable_folder, read_checkpoint
from sgdrop_zoo.pretrained import CONFIG_NAME, WEIGHTS_NAME
from sgdrop_zoo.sgdrop import DEFAULT_EMA_DECAY, DEFAULT_RHO, check_sgdrop_settings

PRESETS_PATH = Path(__file__).with_name('presets.json')
MAX_IMAGE_SIZE = 4096
DUMMY_TRAIN_IMAGES, DUMMY_VAL_IMAGES = 1281167, 50000  # ImageNet's sizes


class RecipeError(Exception):
    """Bad input found before training starts; the message says what is wrong and what to do."""


def load_presets() -> dict[str, dict]:
    with PRESETS_PATH.open() as f:
        return {name: preset for name, preset in json.load(f).items() if not name.startswith('_')}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='PyTorch ImageNet Training with Saliency-Guided Dropout (SGDrop)',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # The official script's arguments, names and defaults.
    parser.add_argument('data', metavar='DIR', nargs='?', default='imagenet',
                        help='path to dataset, holding train/<class>/* and val/<class>/*')
    parser.add_argument('-a', '--arch', metavar='ARCH', default='sgdrop_resnet50',
                        help='any timm model name; sgdrop_* names are registered by sgdrop_zoo')
    parser.add_argument('-j', '--workers', default=4, type=int, metavar='N', help='number of data loading workers')
    parser.add_argument('--epochs', default=90, type=int, metavar='N', help='number of total epochs to run')
    parser.add_argument('--start-epoch', default=0, type=int, metavar='N',
                        help='manual epoch number (useful on restarts)')
    parser.add_argument('-b', '--batch-size', default=256, type=int, metavar='N',
                        help='mini-batch size, the total of all processes on this node when distributed')
    parser.add_argument('--lr', '--learning-rate', default=0.1, type=float, metavar='LR', help='initial learning rate',
                        dest='lr')
    parser.add_argument('--momentum', default=0.9, type=float, metavar='M', help='momentum (SGD only)')
    parser.add_argument('--wd', '--weight-decay', default=1e-4, type=float, metavar='W', help='weight decay',
                        dest='weight_decay')
    parser.add_argument('-p', '--print-freq', default=10, type=int, metavar='N', help='print frequency')
    parser.add_argument('--resume', default='', type=str, metavar='PATH', help='path to a checkpoint to resume from')
    parser.add_argument('-e', '--evaluate', dest='evaluate', action='store_true',
                        help='evaluate model on validation set')
    parser.add_argument('--pretrained', dest='pretrained', action='store_true', help='use pre-trained model')
    parser.add_argument('--world-size', default=-1, type=int, help='number of nodes for distributed training')
    parser.add_argument('--rank', default=-1, type=int, help='node rank for distributed training')
    parser.add_argument('--dist-url', default='tcp://224.66.41.62:23456', type=str,
                        help='url used to set up distributed training; env:// under torchrun')
    parser.add_argument('--dist-backend', default=None, type=str,
                        help='distributed backend (default: nccl with GPUs, gloo on CPU)')
    parser.add_argument('--seed', default=None, type=int, help='seed for initializing training')
    parser.add_argument('--gpu', default=None, type=int, help='GPU id to use')
    parser.add_argument('--multiprocessing-distributed', action='store_true',
                        help='launch N processes per node, one per GPU (one on CPU), as the official script does')
    parser.add_argument('--dummy', action='store_true', help='use fake data to benchmark')

    group = parser.add_argument_group("SGDrop and the paper's protocols")
    group.add_argument('--preset', default=None, choices=sorted(load_presets()),
                       help=f'named defaults from {PRESETS_PATH.name}; explicit flags still win')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                       help="architecture arguments, as timm's train.py takes them, e.g. mlp_ratio=0.03125; the "
                            "export records them so that plain timm rebuilds the same model")
    group.add_argument('--regularizer', default='sgdrop', choices=('none', 'dropout', 'sgdrop'),
                       help="sgdrop, or one of the paper's baselines on the same latent features")
    group.add_argument('--sgdrop-rho', default=None, type=float, metavar='RHO',
                       help=f"fraction of latent features dropped per sample (default: {DEFAULT_RHO}, or the "
                            "preset's value for the architecture family)")
    group.add_argument('--sgdrop-rho-end', default=None, type=float, metavar='RHO',
                       help='if set, rho grows linearly from --sgdrop-rho to this value over the epochs (curriculum)')
    group.add_argument('--sgdrop-attribution', default='ema', choices=('ema', 'online'),
                       help='weights that compute the attribution: EMA of the network (paper) or the online network')
    group.add_argument('--sgdrop-attribution-relu', default='gradient', choices=('gradient', 'product'),
                       help="where the attribution's ReLU applies: gradient, ReLU(d logit_y / d z) * z (paper), or "
                            'product, ReLU(d logit_y / d z * z), which also reaches negative features of a signed '
                            'latent (ConvNeXt)')
    group.add_argument('--sgdrop-ema-decay', default=DEFAULT_EMA_DECAY, type=float,
                       help=f'decay of the attribution EMA ({DEFAULT_EMA_DECAY})')
    # --dropout-p: the option's former name, which recorded commands use
    group.add_argument('--latent-drop-rate', '--dropout-p', default=0.5, type=float,
                       help='drop probability of --regularizer dropout on the latent features')
    group.add_argument('--optimizer', default='sgd', choices=('sgd', 'adam'), help='optimizer')
    group.add_argument('--lr-step-size', default=30, type=int, help='StepLR: epochs between lr decays')
    group.add_argument('--lr-gamma', default=0.1, type=float, help='StepLR: lr factor per step (1.0 = constant lr)')
    group.add_argument('--image-size', default=224, type=int, help='training and validation image size')
    group.add_argument('--train-transform', default='crop-flip', choices=('crop-flip', 'resize'),
                       help="crop-flip: official RandomResizedCrop + flip, val resize + center crop; "
                            "resize: train and val images only resized to a square (paper's low-data protocol)")
    group.add_argument('--train-subset', default=0, type=int, metavar='N',
                       help='train on a fixed random subset of N training images (0: all)')
    group.add_argument('--train-subset-per-class', default=0, type=int, metavar='N',
                       help='train on a fixed, class-balanced random subset: N training images of each class '
                            '(0: off; not with --train-subset)')
    group.add_argument('--holdout-per-class', default=0, type=int, metavar='N',
                       help='validate on a dev split instead of val/: N images of each class held out of the training '
                            'folder, fixed (independent of --seed), disjoint from the training images (0: off)')
    group.add_argument('--val-subset', default=0, type=int, metavar='N',
                       help='validate each epoch on N fixed validation images, the same for every seed (0: all); '
                            '--log-area-ratio takes its images among them')
    group.add_argument('--train-eval-samples', default=1000, type=int, metavar='N',
                       help='per epoch, accuracy of the unmasked eval-mode model on N fixed training images; far '
                            'below the masked train accuracy means the SGDrop mask leaks the label (0: off)')
    group.add_argument('--log-area-ratio', default=0, type=int, metavar='N',
                       help='per epoch (and with --evaluate), the attribution area ratio (paper section 4.2) of the '
                            'eval-mode model on N fixed validation images, logged as val_area_ratio: the share of '
                            'each image where the Grad-CAM map of the true class at z exceeds half its peak (0: off)')

    group = parser.add_argument_group('performance and output')
    group.add_argument('--amp', action='store_true', help='autocast (bf16 by default)')
    group.add_argument('--amp-dtype', default='bfloat16', choices=('bfloat16', 'float16'),
                       help='autocast dtype; float16 adds a gradient scaler')
    group.add_argument('--channels-last', action='store_true', help='channels_last memory format')
    group.add_argument('--compile', action='store_true', help='torch.compile the model')
    group.add_argument('--in-memory', action='store_true',
                       help='decode the dataset once into a uint8 tensor kept in memory (on the GPU when there is '
                            'one); for small datasets')
    group.add_argument('--output', default='.', metavar='DIR',
                       help='directory for checkpoints, log.jsonl and the exported model')
    group.add_argument('--overwrite', action='store_true',
                       help='replace the files of a previous run in --output instead of refusing to start')
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; a preset changes the defaults, so flags given explicitly override it."""
    parser = get_parser()
    preset_name = parser.parse_known_args(argv)[0].preset
    preset = load_presets()[preset_name] if preset_name else {}
    unknown = set(preset.get('args', {})) - set(vars(parser.parse_args([])))
    if unknown:
        parser.error(f'preset {preset_name!r} sets unknown options {sorted(unknown)}; fix {PRESETS_PATH}')
    parser.set_defaults(**preset.get('args', {}))
    args = parser.parse_args(argv)
    if args.sgdrop_rho is None:
        args.sgdrop_rho = rho_for_arch(args.arch, preset.get('sgdrop_rho_by_arch', []))
    return args


def rho_for_arch(arch: str, rho_by_arch: list[list]) -> float:
    """First rho whose architecture pattern occurs in `arch`, else the paper's default."""
    for pattern, rho in rho_by_arch:
        if pattern in arch:
            return rho
    return DEFAULT_RHO


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)

    try:
        check_inputs(args)
    except (RecipeError, DatasetError) as e:
        # under torchrun every process finds the same problem; one line is enough
        if int(os.environ.get('RANK', '0')) == 0:
            print(f'error: {e}', file=sys.stderr)
        sys.exit(2)

    if args.seed is not None and torch.cuda.is_available():
        warnings.warn('You have chosen to seed training. This will turn on the CUDNN deterministic setting, '
                      'which can slow down your training considerably!')
    if args.gpu is not None:
        warnings.warn('You have chosen a specific GPU. This will completely disable data parallelism.')

    if args.dist_url == 'env://' and args.world_size == -1:
        args.world_size = int(os.environ['WORLD_SIZE'])
    args.distributed = args.world_size > 1 or args.multiprocessing_distributed
    if torch.cuda.is_available():
        ngpus_per_node = torch.cuda.device_count()
    else:
        ngpus_per_node = 1
    if args.dist_backend is None:
        args.dist_backend = 'nccl' if torch.cuda.is_available() else 'gloo'

    if args.multiprocessing_distributed:
        # world_size is the number of nodes here; it becomes the total number of processes
        args.world_size = ngpus_per_node * args.world_size
        try:
            mp.spawn(run_worker, nprocs=ngpus_per_node, args=(ngpus_per_node, args))
        except mp.ProcessExitedException as e:  # the process has said why
            sys.exit(e.exit_code)
    else:
        if args.distributed and torch.cuda.is_available() and args.gpu is None and 'LOCAL_RANK' in os.environ:
            args.gpu = int(os.environ['LOCAL_RANK'])  # torchrun: one process per GPU
        run_worker(args.gpu, ngpus_per_node, args)


def run_worker(gpu: Optional[int], ngpus_per_node: int, args: argparse.Namespace) -> None:
    """`main_worker`, stopped in one line by an image that cannot be decoded (the checks before training read only
    the headers) or a write the system refused; the checkpoint of the last finished epoch stays as it was."""
    try:
        main_worker(gpu, ngpus_per_node, args)
    except (DatasetError, RecipeError) as e:
        checkpoint = Path(args.output) / 'checkpoint.pth.tar'
        resume = f' (continue the run with --resume {checkpoint})' if checkpoint.exists() else ''
        print(f'error: {e}{resume}', file=sys.stderr)
        sys.exit(2)


def check_inputs(args: argparse.Namespace) -> None:
    """Stop with one clear line for every problem that can be seen before training starts.

    Sets `args.class_names` from the dataset (or the fake dataset of `--dummy`).
    """
    if not timm.is_model(args.arch):
        close = difflib.get_close_matches(args.arch, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ''
        raise RecipeError(f"unknown --arch {args.arch!r}: not a timm model; {hint}"
                          f"list names with timm.list_models('*{args.arch.split('_')[-1]}*')")
    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(args.arch)
    except RuntimeError:  # timm's "Invalid pretrained tag"
        tags = timm.list_pretrained(f"{args.arch.split('.')[0]}.*")
        raise RecipeError(f"--arch {args.arch}: no such pretrained tag; the tags of {args.arch.split('.')[0]} are "
                          f"{', '.join(tags) if tags else 'none'}") from None
    if args.pretrained and not (pretrained_cfg and pretrained_cfg.has_weights):
        tags = timm.list_pretrained(f"{args.arch.split('.')[0]}*")
        raise RecipeError(f"--pretrained: {args.arch} has no pretrained weights; "
                          f"{'pass one of ' + ', '.join(tags) if tags else 'leave --pretrained out'}")
    if args.dist_url == 'env://' and 'WORLD_SIZE' not in os.environ:
        raise RecipeError('--dist-url env:// reads WORLD_SIZE and RANK from the launcher; start the script with '
                          'torchrun, e.g. torchrun --nproc-per-node 2 train/main.py DATA --dist-url env://')
    if args.multiprocessing_distributed and (args.world_size < 1 or args.rank < 0):
        raise RecipeError('--multiprocessing-distributed needs --world-size (number of nodes) and --rank (node rank), '
                          'e.g. --world-size 1 --rank 0 on one machine')
    check_arguments(args)
    if args.train_subset and args.train_subset_per_class:
        raise RecipeError('--train-subset and --train-subset-per-class both choose the training images; pass one')
    if args.log_area_ratio < 0:
        raise RecipeError(f'--log-area-ratio {args.log_area_ratio} is negative; pass a number of validation images, '
                          f'or 0 to turn it off')

    if args.model_kwargs.get('in_chans', 3) != 3:
        raise RecipeError(f"--model-kwargs in_chans={args.model_kwargs['in_chans']}: the recipe reads every image as "
                          f"RGB, 3 channels; leave in_chans out")
    reserved = sorted(set(args.model_kwargs) & {'num_classes', 'pretrained', *regularizer_settings(vars(args))})
    if reserved:
        raise RecipeError(f"--model-kwargs sets {', '.join(reserved)}, which the recipe sets from its own options; "
                          f"leave them out")
    try:
        with torch.device('meta'):  # builds nothing but the module tree
            create_model(argparse.Namespace(**{**vars(args), 'pretrained': False}), num_classes=2)
    except TypeError as e:
        raise RecipeError(f'--model-kwargs {args.model_kwargs}: {args.arch} does not take them ({e})') from e

    if args.dummy:
        args.class_names = [str(i) for i in range(1000)]
    else:
        args.class_names = check_image_folders(Path(args.data), args.workers)
    if args.holdout_per_class:
        check_holdout(args)

    if args.val_subset < 0:
        raise RecipeError(f'--val-subset {args.val_subset} is negative; pass a number of validation images, or 0 for '
                          f'all of them')
    if args.val_subset and args.log_area_ratio > args.val_subset:
        raise RecipeError(f'--log-area-ratio {args.log_area_ratio} is larger than --val-subset {args.val_subset}; its '
                          f'images are taken among the validated ones, so pass at most {args.val_subset}')
    if args.log_area_ratio or args.val_subset:
        if args.dummy:
            num_val = DUMMY_VAL_IMAGES
        elif args.holdout_per_class:
            num_val = args.holdout_per_class * len(args.class_names)
        else:
            # the images ImageFolder will list, without decoding any
            class_to_idx = {name: i for i, name in enumerate(args.class_names)}
            num_val = len(datasets.folder.make_dataset(os.path.join(args.data, 'val'), class_to_idx,
                                                       datasets.folder.IMG_EXTENSIONS))
        for flag, value in (('--log-area-ratio', args.log_area_ratio), ('--val-subset', args.val_subset)):
            if value > num_val:
                raise RecipeError(f'{flag} {value} asks for more images than the {num_val} of the validation split; '
                                  f'pass at most {num_val}')

    if args.resume:
        log_path = Path(args.output) / 'log.jsonl'
        if log_path.exists() and not args.evaluate:
            read_log_lines(log_path)
        checkpoint = load_checkpoint(args.resume)
        if checkpoint.get('arch') != args.arch:
            raise RecipeError(f"--resume {args.resume} holds a {checkpoint.get('arch')!r} model, not {args.arch!r}; "
                              f"pass -a {checkpoint.get('arch')} or a checkpoint of {args.arch}")
        saved_kwargs = checkpoint['args'].get('model_kwargs', {})
        if saved_kwargs != args.model_kwargs:
            raise RecipeError(f'--resume {args.resume} was built with --model-kwargs {saved_kwargs}, not '
                              f'{args.model_kwargs}; pass the same --model-kwargs')
        saved_classes = checkpoint.get('class_names')
        if saved_classes is not None and saved_classes != args.class_names:
            raise RecipeError(f'--resume {args.resume} was trained on {len(saved_classes)} other classes than the '
                              f'{len(args.class_names)} in {args.data}; resume on the same dataset')
        if not args.evaluate:
            check_same_run(args, checkpoint['args'])


def check_holdout(args: argparse.Namespace) -> None:
    """Every class must hold its --holdout-per-class images besides its --train-subset-per-class ones."""
    if args.dummy:
        raise RecipeError('--holdout-per-class holds out images of the training folder, and --dummy has none; '
                          'leave one of them out')
    class_to_idx = {name: i for i, name in enumerate(args.class_names)}
    sizes = collections.Counter(target for _, target in datasets.folder.make_dataset(
        os.path.join(args.data, 'train'), class_to_idx, datasets.folder.IMG_EXTENSIONS))
    needed = args.holdout_per_class + args.train_subset_per_class
    smallest = min(range(len(args.class_names)), key=lambda c: (sizes[c], c))
    if sizes[smallest] < needed + (0 if args.train_subset_per_class else 1):
        train_part = f' + --train-subset-per-class {args.train_subset_per_class}' if args.train_subset_per_class \
            else ' and at least one to train on'
        raise RecipeError(f'--holdout-per-class {args.holdout_per_class}{train_part} needs {needed or 1} training '
                          f'images of each class, but class {args.class_names[smallest]} has only {sizes[smallest]}; '
                          f'pass a smaller --holdout-per-class')


# the settings that define a run: a resume that changed one would continue another run than the checkpoint's
RUN_SETTINGS = ('regularizer', 'image_size', 'train_transform', 'optimizer', 'train_subset', 'train_subset_per_class',
                'holdout_per_class')
SETTINGS_OF_REGULARIZER = {'sgdrop': ('sgdrop_rho', 'sgdrop_rho_end', 'sgdrop_attribution', 'sgdrop_attribution_relu',
                                      'sgdrop_ema_decay'),
                           'dropout': ('latent_drop_rate',), 'none': ()}


def check_same_run(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    """Refuse a --resume whose run-defining settings differ from those its checkpoint was trained with."""
    names = RUN_SETTINGS + SETTINGS_OF_REGULARIZER[saved.get('regularizer', 'sgdrop')]
    for name in names:
        # settings newer than the checkpoint have their default there
        if name in saved and saved[name] != getattr(args, name):
            flag = '--' + name.replace('_', '-')
            raise RecipeError(f'--resume {args.resume} was trained with {flag} {saved[name]}, not '
                              f'{getattr(args, name)}; pass {flag} {saved[name]} to continue it, or start a new run '
                              f'in another --output')


RUN_FILES = ('log.jsonl', 'checkpoint.pth.tar', 'model_best.pth.tar', WEIGHTS_NAME, CONFIG_NAME)


def check_arguments(args: argparse.Namespace) -> None:
    """The checks of single arguments: each bad value stops the run before any work, with the fix."""
    at_least_one = (('--epochs', args.epochs), ('-b/--batch-size', args.batch_size), ('-p/--print-freq',
                    args.print_freq), ('--image-size', args.image_size), ('--lr-step-size', args.lr_step_size))
    for flag, value in at_least_one:
        if value < 1:
            raise RecipeError(f'{flag} {value}: pass a positive number')
    for flag, value in (('-j/--workers', args.workers), ('--train-subset', args.train_subset),
                        ('--train-subset-per-class', args.train_subset_per_class), ('--start-epoch', args.start_epoch),
                        ('--train-eval-samples', args.train_eval_samples),
                        ('--holdout-per-class', args.holdout_per_class)):
        if value < 0:
            raise RecipeError(f'{flag} {value} is negative; pass 0 or more')
    if not 0 < args.lr < math.inf:
        raise RecipeError(f'--lr {args.lr}: the learning rate must be a positive number, e.g. 0.1 for SGD or 1e-4 for '
                          f'Adam')
    if not 0 <= args.momentum < 1:
        raise RecipeError(f'--momentum {args.momentum}: pass a number in [0, 1), e.g. 0.9')
    if not 0 <= args.weight_decay < math.inf:
        raise RecipeError(f'--wd {args.weight_decay}: pass 0 or a positive number, e.g. 1e-4')
    if not 0 < args.lr_gamma < math.inf:
        raise RecipeError(f'--lr-gamma {args.lr_gamma}: pass a positive factor, e.g. 0.1, or 1.0 for a constant lr')
    if args.seed is not None and not 0 <= args.seed < 2 ** 32:
        raise RecipeError(f'--seed {args.seed}: pass a number in [0, 2**32)')
    if args.image_size > MAX_IMAGE_SIZE:
        raise RecipeError(f'--image-size {args.image_size}: larger than {MAX_IMAGE_SIZE} px, which no batch of these '
                          f'models fits in memory; pass the side the model is trained at, e.g. 224')
    # by the models' own rule, whatever the --regularizer: every run builds its rho schedule and model from them
    for name in ('sgdrop_rho', 'sgdrop_rho_end', 'sgdrop_ema_decay', 'latent_drop_rate'):
        value = getattr(args, name)
        if value is not None:
            try:
                check_sgdrop_settings(**{name: value})
            except ValueError as e:
                raise RecipeError(f"--{name.replace('_', '-')} {value}: {e}") from e
    if args.gpu is not None and not torch.cuda.is_available():
        raise RecipeError(f'--gpu {args.gpu}: no CUDA GPU is visible; leave --gpu out to train on the CPU')
    if args.start_epoch >= args.epochs and not args.evaluate and not args.resume:
        raise RecipeError(f'--start-epoch {args.start_epoch} leaves nothing to train with --epochs {args.epochs}; '
                          f'pass a larger --epochs')
    check_output(args)


def check_output(args: argparse.Namespace) -> None:
    """--output must be a writable folder that holds no other run, unless resuming it or told to overwrite it.

    --evaluate writes nothing, and --resume writes only into the resumed run's own folder or into a new one.
    """
    output = Path(args.output)
    if args.evaluate:
        if args.overwrite:
            raise RecipeError('--evaluate writes nothing, so --overwrite would only delete the run in --output; leave '
                              '--overwrite out')
        if not (args.resume or args.pretrained or args.dummy):
            raise RecipeError('--evaluate needs weights to evaluate: pass --resume CHECKPOINT or --pretrained (a '
                              'freshly initialised model scores at chance)')
        return
    try:
        check_writable_folder(output)
    except ValueError as e:
        raise RecipeError(str(e)) from e
    previous = [name for name in RUN_FILES if (output / name).exists()]
    resumed_folder = Path(args.resume).resolve().parent if args.resume else None
    if previous and resumed_folder is not None and resumed_folder != output.resolve():
        raise RecipeError(f"--output {output} holds another run ({', '.join(previous)}) than the resumed "
                          f"{args.resume}; resume into its own folder (--output {Path(args.resume).parent}) or into "
                          f"a new one")
    if previous and not (args.resume or args.overwrite):
        raise RecipeError(f"--output {output} holds another run ({', '.join(previous)}); continue it with --resume "
                          f"{output / 'checkpoint.pth.tar'}, choose a new --output, or pass --overwrite to replace it")


RECIPE_CHECKPOINT_KEYS = ('epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer', 'scheduler', 'args')


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint written by this script, tensors on the CPU, without executing pickled code."""
    if not os.path.isfile(path):
        raise RecipeError(f'--resume {path}: no such checkpoint file; pass a checkpoint.pth.tar written by this script')
    try:
        checkpoint = read_checkpoint(Path(path))
    except ValueError as e:
        raise RecipeError(f'--resume {e} Pass an intact checkpoint.pth.tar') from e
    missing = [key for key in RECIPE_CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise RecipeError(f"--resume {path}: not a checkpoint of this script (no {', '.join(missing)}); pass the "
                          f"checkpoint.pth.tar or model_best.pth.tar of a train/main.py run")
    return checkpoint


def create_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The timm model `args.arch` with the regularizer of `args`; plain timm names get SGDrop added."""
    options = regularizer_settings(vars(args))
    if args.arch.startswith('sgdrop_'):
        return timm.create_model(args.arch, pretrained=args.pretrained, num_classes=num_classes, **options,
                                 **args.model_kwargs)
    model = timm.create_model(args.arch, pretrained=args.pretrained, num_classes=num_classes, **args.model_kwargs)
    return sgdrop_zoo.add_sgdrop(model, **options)


def main_worker(gpu: Optional[int], ngpus_per_node: int, args: argparse.Namespace) -> None:
    args.gpu = gpu
    if args.distributed:
        if args.dist_url == 'env://' and args.rank == -1:
            args.rank = int(os.environ['RANK'])
        if args.multiprocessing_distributed:
            # the global rank of this process among all processes
            args.rank = args.rank * ngpus_per_node + gpu
        dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                                world_size=args.world_size, rank=args.rank)
    else:
        args.rank, args.world_size = 0, 1
    args.is_main = args.rank == 0
    output = Path(args.output)
    if args.is_main and not args.evaluate:
        output.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(output)
        if args.overwrite and not args.resume:
            # the replaced run's files go now, so that none of them can pass for this run's
            for name in RUN_FILES:
                (output / name).unlink(missing_ok=True)

    if torch.cuda.is_available():
        device = torch.device('cuda', args.gpu if args.gpu is not None else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    if args.seed is not None:
        # the same seed on every process would give every process the same dropout masks
        random_seed(args.seed, args.rank)
        cudnn.deterministic = True
        cudnn.benchmark = False
    else:
        cudnn.benchmark = True

    # create model
    if args.is_main:
        print(f"=> creating model '{args.arch}'{' (pretrained)' if args.pretrained else ''} "
              f"with regularizer {args.regularizer}", flush=True)
    model = create_model(args, num_classes=len(args.class_names)).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        # in place, so state_dict keys and the SGDrop methods stay those of the model
        model.compile()
    model_without_ddp = model
    if args.distributed:
        # the batch size and workers are totals for this node, as in the official script
        procs_per_node = ngpus_per_node if args.multiprocessing_distributed else int(
            os.environ.get('LOCAL_WORLD_SIZE', '1'))
        args.batch_size = max(1, args.batch_size // procs_per_node)
        args.workers = (args.workers + procs_per_node - 1) // procs_per_node
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)

    criterion = nn.CrossEntropyLoss().to(device)
    if args.optimizer == 'sgd':
        optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), args.lr, weight_decay=args.weight_decay)
    # "Sets the learning rate to the initial LR decayed by 10 every 30 epochs" with the defaults
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    amp_dtype = getattr(torch, args.amp_dtype)
    # bf16 has float32's range and needs no loss scaling; the scaler is a no-op unless float16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)
    rho_schedule = sgdrop_zoo.LinearRhoSchedule(args.sgdrop_rho, args.sgdrop_rho_end, args.epochs)

    best_acc1, best_epoch = 0.0, None
    rng_state = None
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        args.start_epoch = checkpoint['epoch']
        best_acc1 = checkpoint['best_acc1']
        best_epoch = checkpoint.get('best_epoch', 0)  # 0: a checkpoint of an older version, which did not record it
        model_without_ddp.load_state_dict(checkpoint['state_dict'])
        if checkpoint.get('sgdrop_ema') is not None and model_without_ddp.sgdrop_attribution.value == 'ema':
            model_without_ddp.load_ema_state_dict(checkpoint['sgdrop_ema'])
        if not args.evaluate:
            optimizer.load_state_dict(checkpoint['optimizer'])
            scheduler.load_state_dict(checkpoint['scheduler'])
            if checkpoint.get('scaler'):
                scaler.load_state_dict(checkpoint['scaler'])
            rng_state = checkpoint.get('rng_state')
        if args.is_main:
            print(f"=> loaded checkpoint '{args.resume}' (epoch {checkpoint['epoch']})", flush=True)
        if args.is_main and not args.evaluate:
            best_acc1, best_epoch = restore_model_best(checkpoint, Path(args.resume), output / 'model_best.pth.tar')
        del checkpoint

    # Data loading code
    train_loader, val_loader, train_eval_loader, area_loader = build_loaders(args, model_without_ddp, device)

    if args.evaluate:
        metrics = validate(val_loader, model_without_ddp, criterion, device, args)
        if area_loader is not None:
            validate_area_ratio(area_loader, model_without_ddp, device, args)
        if args.is_main:
            print(f"=> val Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f} on {metrics['count']} images "
                  f"({args.resume or 'no checkpoint'})", flush=True)
        cleanup(args)
        return

    if rng_state is not None and not args.distributed:
        # continues exactly where the interrupted run stopped: shuffling, augmentation, dropout
        set_rng_state(rng_state)

    log_path = output / 'log.jsonl'
    if args.is_main:
        keep_log_until(log_path, args.start_epoch)
    for epoch in range(args.start_epoch, args.epochs):
        if hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        if args.regularizer == 'sgdrop':
            model_without_ddp.sgdrop_rho = rho_schedule(epoch)

        # train for one epoch
        start = time.time()
        train_metrics = train(train_loader, model, model_without_ddp, criterion, optimizer, scaler, epoch, device,
                              args)
        epoch_time = time.time() - start

        # evaluate on validation set
        val_metrics = validate(val_loader, model_without_ddp, criterion, device, args)
        clean_metrics = validate(train_eval_loader, model_without_ddp, criterion, device, args, 'Train (clean)') \
            if train_eval_loader is not None else None
        # main process only (the others hold no area loader), and without collectives: the other processes simply
        # wait for it at the first collective of the next epoch
        area_ratio = validate_area_ratio(area_loader, model_without_ddp, device, args) \
            if area_loader is not None else None
        lr = optimizer.param_groups[0]['lr']
        scheduler.step()

        # remember best acc@1 and save checkpoint
        acc1 = val_metrics['acc1']
        # the first epoch of a run is its best so far whatever its top-1, so every run has a model_best to export
        is_best = best_epoch is None or acc1 > best_acc1
        if is_best:
            best_acc1, best_epoch = acc1, epoch + 1
        if args.is_main:
            # the log line goes first: a run killed before its checkpoint is written repeats this epoch on resume,
            # and resuming drops the lines of epochs the checkpoint does not hold
            append_log(log_path, {
                'epoch': epoch + 1,
                'train_loss': train_metrics['loss'],
                'train_acc1': train_metrics['acc1'],
                'train_clean_acc1': clean_metrics['acc1'] if clean_metrics else None,
                # the SGDrop diagnostics of the training forwards (README, "Diagnostics")
                'train_dropped_attribution_share': train_metrics['dropped_attribution_share']
                if args.regularizer == 'sgdrop' else None,
                'train_nonpositive_feature_share': train_metrics['nonpositive_feature_share'],
                'val_loss': val_metrics['loss'],
                'val_acc1': val_metrics['acc1'],
                'val_acc5': val_metrics['acc5'],
                'val_count': val_metrics['count'],
                # only when measured, so that plots draw no empty area-ratio panel for the runs without it
                **({'val_area_ratio': area_ratio} if area_ratio is not None else {}),
                'lr': lr,
                'sgdrop_rho': model_without_ddp.sgdrop_rho,
                'img_per_s': train_metrics['count'] / epoch_time,
                'epoch_time_s': epoch_time,
            })
            save_checkpoint({
                'epoch': epoch + 1,
                'arch': args.arch,
                'state_dict': model_without_ddp.state_dict(),
                'acc1': acc1,
                'best_acc1': best_acc1,
                'best_epoch': best_epoch,
                'optimizer': optimizer.state_dict(),
                'scheduler': scheduler.state_dict(),
                'sgdrop_ema': model_without_ddp.ema_state_dict(),
                'sgdrop_rho': model_without_ddp.sgdrop_rho,
                'rho_schedule': {'start': args.sgdrop_rho, 'end': args.sgdrop_rho_end, 'num_epochs': args.epochs},
                'scaler': scaler.state_dict(),
                'rng_state': get_rng_state(),
                'class_names': args.class_names,
                'args': {k: v for k, v in vars(args).items() if k != 'class_names'},
            }, is_best, output)

    if args.is_main and (output / 'model_best.pth.tar').exists():
        export_dir = export_for_hub(output / 'model_best.pth.tar', output, args)
        print(f"=> best val Acc@1 {best_acc1:.3f}; checkpoints {output / 'checkpoint.pth.tar'} and "
              f"{output / 'model_best.pth.tar'}; weights {export_dir / 'model.safetensors'}", flush=True)
    cleanup(args)


def remove_partial_writes(output: Path) -> None:
    """Remove what a run killed while writing a checkpoint, the log or the export left; the previous files are intact.

    Only names that the recipe's writers make are removed (``atomic_write``'s and ``save_export``'s), nothing of a
    user's that happens to look temporary.
    """
    for name in RUN_FILES:
        for partial in output.glob(f'.{name}.*{PARTIAL_WRITE_SUFFIX}'):
            if partial.is_file() and not partial.is_symlink():
                partial.unlink()
    for partial in output.glob(f'.export.*{PARTIAL_WRITE_SUFFIX}'):
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial)


def append_log(log_path: Path, record: dict[str, Any]) -> None:
    # a line cut short by a failed write is dropped when the run is resumed (read_log_lines)
    try:
        with log_path.open('a') as f:
            f.write(json.dumps(record) + '\n')
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(log_path, e) from e


def read_log_lines(log_path: Path) -> list[str]:
    """The complete lines of a `log.jsonl`; an incomplete last line (a run killed while appending it, before that
    epoch's checkpoint) is left out, since that epoch is trained again.

    Raises:
        RecipeError: A line before the last one is not JSON.
    """
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                return lines[:-1]
            record = None
        epoch = record.get('epoch') if isinstance(record, dict) else None
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            # not JSON, or no whole-number "epoch"
            raise RecipeError(f'{log_path}: line {number} is not an epoch record; delete or repair that line, then '
                              f'resume again')
    return lines


def keep_log_until(log_path: Path, last_epoch: int) -> None:
    """Drop the log lines of epochs after `last_epoch`, which the run is about to train (again)."""
    if not log_path.exists():
        return
    lines = read_log_lines(log_path)
    kept = [line for line in lines if json.loads(line)['epoch'] <= last_epoch]
    if kept != log_path.read_text().splitlines():
        atomic_write(log_path, lambda f: f.write(''.join(line + '\n' for line in kept).encode()))


def cleanup(args: argparse.Namespace) -> None:
    if args.distributed:
        dist.destroy_process_group()


def build_loaders(args: argparse.Namespace, model: nn.Module, device: torch.device) -> tuple[Any, Any, Any, Any]:
    """Train and val loaders, a loader of fixed training images with the val transform (or None), and the loader of
    the fixed validation images of `--log-area-ratio` (None when off, and on every process but the main one).

    Loaders yield (images, targets); the in-memory ones yield batches already normalised on `device`.
    """
    mean = model.pretrained_cfg.get('mean', IMAGENET_DEFAULT_MEAN)
    std = model.pretrained_cfg.get('std', IMAGENET_DEFAULT_STD)
    size = args.image_size
    normalize = transforms.Normalize(mean=mean, std=std)
    if args.train_transform == 'resize':
        train_resize = [transforms.Resize((size, size))]
    else:
        train_resize = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]

    if args.dummy:
        if args.is_main:
            print('=> Dummy data is used!', flush=True)
        train_dataset = datasets.FakeData(DUMMY_TRAIN_IMAGES, (3, size, size), 1000, transforms.ToTensor())
        val_dataset = datasets.FakeData(DUMMY_VAL_IMAGES, (3, size, size), 1000, transforms.ToTensor())
        val_indices, area_indices = fixed_val_indices(len(val_dataset), args)
        area_loader = make_loader(torch.utils.data.Subset(val_dataset, area_indices), False, args, shard=False) \
            if area_indices else None
        val_loader = make_loader(torch.utils.data.Subset(val_dataset, val_indices), False, args)
        return make_loader(train_dataset, True, args), val_loader, None, area_loader

    # scanned once: listing the files of a large dataset takes a while
    train_folder = datasets.ImageFolder(os.path.join(args.data, 'train'), loader=load_rgb)
    val_folder = datasets.ImageFolder(os.path.join(args.data, 'val'), loader=load_rgb)
    num_train = len(train_folder)
    # Fixed subsets, independent of --seed, so that runs with different seeds see the same images.
    train_indices = torch.randperm(num_train, generator=torch.Generator().manual_seed(0)).tolist()
    val_pool = range(len(val_folder))
    if args.holdout_per_class:
        # the dev split: the last images of each class in the fixed order, so that the training subset, taken from
        # its front, is the same as without a holdout whenever both fit in every class
        holdout = set(per_class_subset(train_indices[::-1], train_folder.targets, args.holdout_per_class))
        train_indices = [index for index in train_indices if index not in holdout]
        val_folder, val_pool = train_folder, sorted(holdout)
    if args.train_subset:
        train_indices = train_indices[:args.train_subset]
    elif args.train_subset_per_class:
        train_indices = per_class_subset(train_indices, train_folder.targets, args.train_subset_per_class)
    train_eval_indices = train_indices[:args.train_eval_samples]
    val_positions, area_positions = fixed_val_indices(len(val_pool), args)
    val_indices, area_indices = [val_pool[i] for i in val_positions], [val_pool[i] for i in area_positions]

    if not args.in_memory:
        to_tensor = [transforms.ToTensor(), normalize]
        train_dataset = with_transform(train_folder, transforms.Compose(train_resize + to_tensor))
        if len(train_indices) < num_train:
            train_dataset = torch.utils.data.Subset(train_dataset, sorted(train_indices))
        train_loader = make_loader(train_dataset, True, args)
        val_transform = eval_transform(size, args.train_transform, mean, std)
        val_dataset = with_transform(val_folder, val_transform)
        val_loader = make_loader(torch.utils.data.Subset(val_dataset, val_indices), False, args)
        train_eval_loader = None
        if train_eval_indices:
            train_eval_dataset = with_transform(train_folder, val_transform)
            train_eval_loader = make_loader(torch.utils.data.Subset(train_eval_dataset, train_eval_indices), False,
                                            args)
        area_loader = make_loader(torch.utils.data.Subset(val_dataset, area_indices), False, args, shard=False) \
            if area_indices else None
        return train_loader, val_loader, train_eval_loader, area_loader

    # In memory: decode every image once, after the deterministic part of the transform; the random crop and flip
    # run per batch on `device`.
    store_device = device if device.type == 'cuda' else torch.device('cpu')
    decode = dict(workers=args.workers, device=store_device, verbose=args.is_main)
    train_images = decode_images(with_transform(train_folder, stored_train_resize(size, args.train_transform)),
                                 sorted(train_indices), **decode)
    val_images = decode_images(with_transform(val_folder, eval_transform(size, args.train_transform)), val_indices,
                               **decode)
    common = dict(mean=mean, std=std, rank=args.rank, world_size=args.world_size, device=device)
    train_loader = InMemoryLoader(*train_images, args.batch_size, shuffle=True, seed=args.seed or 0,
                                  crop_flip_size=size if args.train_transform == 'crop-flip' else None, **common)
    val_loader = InMemoryLoader(*val_images, args.batch_size, shuffle=False, **common)
    train_eval_loader = None
    if train_eval_indices:
        train_eval_images = decode_images(with_transform(train_folder, eval_transform(size, args.train_transform)),
                                          train_eval_indices, **decode)
        train_eval_loader = InMemoryLoader(*train_eval_images, args.batch_size, shuffle=False, **common)
    area_loader = None
    if area_indices:
        # all N images on the main process alone: no shard
        position = {index: i for i, index in enumerate(val_indices)}
        subset = torch.tensor([position[index] for index in area_indices], device=store_device)
        area_loader = InMemoryLoader(val_images[0][subset], val_images[1][subset], args.batch_size, shuffle=False,
                                     **{**common, 'rank': 0, 'world_size': 1})
    return train_loader, val_loader, train_eval_loader, area_loader


def fixed_val_indices(num_val: int, args: argparse.Namespace) -> tuple[list[int], list[int]]:
    """The validation images: all, or the first N of a permutation independent of --seed with `--val-subset N`, so
    that runs with different seeds are measured on the same images (sorted, in folder order); and the images of
    `--log-area-ratio N`, the first N of the same permutation (none when off, or on processes other than the main one).
    """
    order = torch.randperm(num_val, generator=torch.Generator().manual_seed(0)).tolist()
    val_indices = sorted(order[:args.val_subset]) if args.val_subset else list(range(num_val))
    area_indices = order[:args.log_area_ratio] if args.log_area_ratio and args.is_main else []
    return val_indices, area_indices


def make_loader(dataset: torch.utils.data.Dataset, train: bool, args: argparse.Namespace, shard: bool = True
                ) -> torch.utils.data.DataLoader:
    """Training: shuffled (one shard per process when distributed). Evaluation: in order, this process's shard, or
    all of `dataset` when not `shard`.
    """
    if train:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, seed=args.seed or 0) \
            if args.distributed else None
    else:
        sampler = ShardSampler(len(dataset), args.rank, args.world_size) if shard else None
    # Starting an iteration draws a base seed from the global RNG unless the loader has its own generator; an
    # unsharded loader (the area ratio's) gets one, so measuring leaves the training's random stream as it was.
    generator = None if shard else torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=train and sampler is None, sampler=sampler,
        num_workers=args.workers, pin_memory=torch.cuda.is_available(), generator=generator)


class ShardSampler(torch.utils.data.Sampler):
    """Every `world_size`-th index from `rank`, without the padding of DistributedSampler.

    Each sample is evaluated by exactly one process; the metrics are then summed over processes.
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train(train_loader: Any, model: nn.Module, model_without_ddp: nn.Module, criterion: nn.Module,
          optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, epoch: int, device: torch.device,
          args: argparse.Namespace) -> dict[str, float]:
    """Train for one epoch; returns the loss and the accuracy of the (SGDrop-masked) training logits, and the means of
    the model's per-sample SGDrop diagnostics (``sgdrop_step_stats``)."""
    batch_time, data_time, losses, top1, top5 = (AverageMeter() for _ in range(5))
    diagnostics = {name: AverageMeter() for name in ('dropped_attribution_share', 'nonpositive_feature_share')}
    # the first step whose loss is not finite, kept on the device (no host read per step) and checked once an epoch
    no_step = len(train_loader)
    first_nonfinite_step = torch.tensor(no_step, device=device)
    progress = ProgressMeter(len(train_loader), {'Time': (batch_time, '6.3f'), 'Data': (data_time, '6.3f'),
                                                 'Loss': (losses, '.4e'), 'Acc@1': (top1, '6.2f'),
                                                 'Acc@5': (top5, '6.2f')},
                             prefix=f'Epoch: [{epoch}]', enabled=args.is_main)
    amp_dtype = getattr(torch, args.amp_dtype)

    # switch to train mode
    model.train()

    end = time.time()
    for i, (images, target) in enumerate(train_loader):
        # measure data loading time
        data_time.update(time.time() - end)

        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        # compute output: the logits of the SGDrop-masked latent features (the target picks the attributed class)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            output = model(images, target=target)
            loss = criterion(output, target)

        # measure accuracy and record loss
        record_batch((losses, top1, top5), output, target, loss)
        for name, values in model_without_ddp.sgdrop_step_stats.items():
            diagnostics[name].update(values.double().mean(), values.numel())
        first_nonfinite_step = torch.where(torch.isfinite(loss.detach()), first_nonfinite_step,
                                           first_nonfinite_step.clamp_max(i))

        # compute gradient and do optimizer step
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        model_without_ddp.update_ema()

        # measure elapsed time
        batch_time.update(time.time() - end)
        end = time.time()

        if i % args.print_freq == 0:
            progress.display(i + 1)

    if args.distributed:
        all_reduce_meters((losses, top1, top5, *diagnostics.values()), device)
        dist.all_reduce(first_nonfinite_step, dist.ReduceOp.MIN)
    step = first_nonfinite_step.item()
    if step < no_step:
        raise RecipeError(f'the training loss is not finite from epoch {epoch + 1}, step {step + 1} on: the weights '
                          f'have diverged, and nothing of this epoch was saved; start again with a lower --lr than '
                          f'{args.lr}')
    return {'loss': float(losses.avg), 'acc1': float(top1.avg), 'acc5': float(top5.avg), 'count': top1.count,
            **{name: float(meter.avg) for name, meter in diagnostics.items()}}


def validate(val_loader: Any, model: nn.Module, criterion: nn.Module, device: torch.device, args: argparse.Namespace,
             name: str = 'Test') -> dict[str, float]:
    """Evaluate the unwrapped eval-mode model on this process's shard, then sum the metrics over processes.

    The unwrapped model is used so that processes with one batch more or less than the others never wait on a DDP
    collective.
    """
    batch_time, losses, top1, top5 = (AverageMeter() for _ in range(4))
    progress = ProgressMeter(len(val_loader), {'Time': (batch_time, '6.3f'), 'Loss': (losses, '.4e'),
                                               'Acc@1': (top1, '6.2f'), 'Acc@5': (top5, '6.2f')},
                             prefix=f'{name}: ', enabled=args.is_main)
    amp_dtype = getattr(torch, args.amp_dtype)

    # switch to evaluate mode
    model.eval()

    with torch.no_grad():
        end = time.time()
        for i, (images, target) in enumerate(val_loader):
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)

            # compute output
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                output = model(images)
                loss = criterion(output, target)

            # measure accuracy and record loss
            record_batch((losses, top1, top5), output, target, loss)

            # measure elapsed time
            batch_time.update(time.time() - end)
            end = time.time()

            if i % args.print_freq == 0:
                progress.display(i + 1)

    if args.distributed:
        all_reduce_meters((losses, top1, top5), device)
    progress.display_summary(['Acc@1', 'Acc@5'])
    return {'loss': float(losses.avg), 'acc1': float(top1.avg), 'acc5': float(top5.avg), 'count': int(top1.count)}


def validate_area_ratio(loader: Any, model: nn.Module, device: torch.device, args: argparse.Namespace) -> float:
    """Mean attribution area ratio (paper section 4.2, Figure 3) of the eval-mode `model` on all images of `loader`.

    The Grad-CAM map of the true class at the latent map z, upsampled to the image, is divided by its maximum; the
    ratio is the share of its pixels above 0.5. Computed in float32, outside autocast, on the unwrapped model (a
    backward through a DDP wrapper would wait for the other processes); the train/eval mode is restored afterwards.
    """
    # imported here: Grad-CAM brings matplotlib, OpenCV and scikit-learn, seconds of start-up that runs without
    # --log-area-ratio should not pay
    from sgdrop_zoo.saliency import attribution_area_ratio, grad_cam_maps

    was_training = model.training
    ratios = []
    try:
        # bf16 or fp16 activations and gradients would shift which pixels clear the 0.5 threshold
        with torch.autocast(device.type, enabled=False):
            for images, target in loader:
                images = images.to(device, non_blocking=True)
                if args.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                # class indices on the CPU: Grad-CAM reads them one by one, which would sync a GPU each time
                ratios.append(attribution_area_ratio(grad_cam_maps(model, images, target.cpu())))
    finally:
        model.train(was_training)
        # Grad-CAM's backward leaves gradients on the weights; the next step would set them to None anyway
        model.zero_grad(set_to_none=True)
    area_ratio = torch.cat(ratios).mean().item()
    print(f' * Area ratio {area_ratio:.4f} ({sum(len(r) for r in ratios)} images)', flush=True)
    return area_ratio


def restore_model_best(checkpoint: dict[str, Any], resume_path: Path, best_path: Path) -> tuple[float, int]:
    """Check that `best_path` holds the resumed run's best epoch, rebuilding it when a kill left it missing or stale.

    A run stopped between writing its checkpoint and copying it to model_best leaves model_best missing or one best
    epoch behind. When the resumed checkpoint is that best epoch, the copy is made again and nothing is lost; when
    model_best is missing and the best epoch's weights are gone, the resumed epoch stands in for it and becomes the
    best to beat. A model_best of another epoch that the resumed checkpoint cannot replace is kept.

    Returns:
        The best top-1 and best epoch to continue with.
    """
    best_acc1, best_epoch = checkpoint['best_acc1'], checkpoint.get('best_epoch', 0)
    if best_path.exists():
        held = read_checkpoint(best_path)['epoch']
        if 'best_epoch' not in checkpoint or held == best_epoch:
            return best_acc1, best_epoch
        if best_epoch != checkpoint['epoch']:
            # not what a kill leaves (an older checkpoint resumed, say): weights the resumed one cannot replace
            print(f'=> {best_path} holds epoch {held}, not the best epoch {best_epoch} of {resume_path}; it is kept '
                  f'until this run has a better epoch', flush=True)
            return best_acc1, best_epoch
        print(f'=> {best_path} holds epoch {held}, not the best epoch {best_epoch} (the run was stopped while '
              f'writing it); copied again from {resume_path}, which holds that epoch', flush=True)
    elif best_epoch == checkpoint['epoch']:
        print(f'=> {best_path} is missing (the run was stopped while writing it); copied again from {resume_path}, '
              f'which holds its best epoch', flush=True)
    else:
        best_acc1, best_epoch = checkpoint.get('acc1', best_acc1), checkpoint['epoch']
        print(f"=> {best_path} is missing and the best epoch's weights are gone; rebuilt from {resume_path} (epoch "
              f"{best_epoch}, val Acc@1 {best_acc1:.3f}), the best to beat from now on", flush=True)
    with resume_path.open('rb') as src:
        atomic_write(best_path, lambda f: shutil.copyfileobj(src, f))
    return best_acc1, best_epoch


def save_checkpoint(state: dict[str, Any], is_best: bool, output: Path, filename: str = 'checkpoint.pth.tar') -> None:
    """Write `state` to `output`/`filename`, and copy it to model_best.pth.tar when best.

    Each file is written to a temporary file in the same directory and renamed over the old one, so a run killed at any
    moment leaves the previous complete checkpoint in place.
    """
    path = output / filename
    atomic_write(path, lambda f: torch.save(state, f))
    if is_best:
        with path.open('rb') as src:
            atomic_write(output / 'model_best.pth.tar', lambda f: shutil.copyfileobj(src, f))


def atomic_write(path: Path, write: Any) -> None:
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix=PARTIAL_WRITE_SUFFIX)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes the file private; a checkpoint is an ordinary output file
        os.replace(tmp_name, path)
    except BaseException as e:
        os.unlink(tmp_name)
        # torch.save reports a failed write as a RuntimeError raised while handling the OSError
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, OSError):
            raise write_error(path, cause) from e
        raise


def write_error(path: Path, error: OSError) -> RecipeError:
    """The one-line error of a write that the system refused (a full disk, a lost mount); no file was changed."""
    return RecipeError(f'cannot write {path} ({error.strerror or error}); the files written before it are intact: '
                       f'free some space there, or fix the folder')


def export_for_hub(checkpoint_path: Path, output: Path, args: argparse.Namespace) -> Path:
    """Export the weights of a checkpoint as `model.safetensors` + timm's `config.json`, in `output`.

    The model is rebuilt on the CPU from the checkpoint, so the export holds plain contiguous float32 weights whatever
    the training memory format or compile state.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    model = create_model(argparse.Namespace(**{**vars(args), 'pretrained': False}), len(args.class_names))
    model.load_state_dict(checkpoint['state_dict'])
    try:
        # model_best holds its own epoch, whose top-1 is the best one (checkpoints of older versions have no "acc1")
        save_recipe_export(model, output, vars(args), args.class_names, checkpoint['epoch'],
                           checkpoint.get('acc1', checkpoint['best_acc1']))
    except ValueError as e:  # weights that are not finite
        raise RecipeError(str(e)) from e
    except (OSError, SafetensorError) as e:
        # safetensors reports a refused write as its own error, with the OS's reason in the message
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise RecipeError(f'cannot write the export {output / WEIGHTS_NAME} ({reason}); the checkpoints are intact: '
                          f'free some space there, then resume the run, which exports again') from e
    return output


def get_rng_state() -> dict[str, Any]:
    state = {'python': random.getstate(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state['python'])
    torch.set_rng_state(state['torch'])
    if torch.cuda.is_available() and 'cuda' in state:
        torch.cuda.set_rng_state_all(state['cuda'])


def record_batch(meters: Sequence[AverageMeter], output: torch.Tensor, target: torch.Tensor,
                 loss: torch.Tensor) -> None:
    """Add a batch's loss, Acc@1 and Acc@5 to `meters` without reading them on the host.

    The meters add float64 tensors on the device, read only when printed and at the end of the epoch, so that a step
    does not wait for the GPU (float64: sums over a whole ImageNet epoch stay exact to the image).
    """
    acc1, acc5 = accuracy(output, target, topk=(1, 5))
    for meter, value in zip(meters, (loss.detach(), acc1, acc5)):
        meter.update(value.double(), target.size(0))


def all_reduce_meters(meters: Sequence[AverageMeter], device: torch.device) -> None:
    """Sum each meter's sum and count over the processes, so that its average is over all their images."""
    # float64: the counts of large validation sets stay exact
    totals = torch.tensor([[float(meter.sum), meter.count] for meter in meters], dtype=torch.float64, device=device)
    dist.all_reduce(totals, dist.ReduceOp.SUM)
    for meter, (total, count) in zip(meters, totals.tolist()):
        meter.sum, meter.count = total, int(count)
        meter.avg = meter.sum / max(meter.count, 1)


class ProgressMeter:
    """Prints named meters every few batches and their averages at the end, on the main process only."""

    def __init__(self, num_batches: int, meters: dict[str, tuple[AverageMeter, str]], prefix: str = '',
                 enabled: bool = True):
        """`meters` maps each name to its meter and the format of its values, e.g. "6.3f"."""
        digits = len(str(num_batches))
        self.batch_fmtstr = f'[{{:{digits}d}}/{num_batches:{digits}d}]'
        self.meters = meters
        self.prefix = prefix
        self.enabled = enabled

    def display(self, batch: int) -> None:
        if self.enabled:
            entries = [self.prefix + self.batch_fmtstr.format(batch)]
            entries += [f'{name} {meter.val:{fmt}} ({meter.avg:{fmt}})' for name, (meter, fmt) in self.meters.items()]
            print('\t'.join(entries), flush=True)

    def display_summary(self, names: Sequence[str]) -> None:
        if self.enabled:
            averages = ' '.join(f'{name} {self.meters[name][0].avg:.3f}' for name in names)
            print(f' * {averages} ({self.meters[names[0]][0].count} images)', flush=True)


if __name__ == '__main__':
    main()
