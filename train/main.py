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
import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.backends.cudnn as cudnn
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import timm
from timm.data import resolve_model_data_config
from timm.utils import AverageMeter, ParseKwargs, distribute_bn, random_seed

import sgdrop_zoo
from sgdrop_zoo.checkpoint import RecipeCheckpoint
from sgdrop_zoo.data import DatasetError, check_image_folders
from sgdrop_zoo.export import save_recipe_export
from sgdrop_zoo.hub_files import WEIGHTS_NAME
from sgdrop_zoo.run_files import (BEST_NAME, CHECKPOINT_NAME, LOG_NAME, RunFileError, append_log, atomic_write,
                                  copy_file, epoch_record, get_rng_state, hold_folder, keep_log_until, prepare_output,
                                  read_log, set_rng_state)
from sgdrop_zoo.run_settings import RunSettings
from sgdrop_zoo.sgdrop import DEFAULT_EMA_DECAY, DEFAULT_RHO, STEP_STAT_NAMES

# the recipe's own plumbing, beside this script
import recipe_data
from meters import ProgressMeter, all_reduce_meters, record_batch
from recipe_checks import (RecipeError, check_arch, check_counts, check_fits_val_split, check_gpu, check_holdout,
                           check_launcher, check_metrics_json, check_model_kwargs, check_output, check_resumed,
                           check_sgdrop_flags, check_start_epoch, check_subset_options, check_training_numbers,
                           check_val_subset, load_checkpoint)
from presets import PRESETS_PATH, load_presets, rho_for_arch
from recipe_data import RecipeLoaders

# the errors that stop the script with their one-line message
ONE_LINE_ERRORS = (DatasetError, RecipeError, RunFileError)


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
    group.add_argument('--sgdrop-attribution', default='ema', choices=('ema', 'online', 'ema_head'),
                       help='weights that compute the attribution: EMA of the network (paper), the online network, or '
                            "the EMA network's head on the online latent (no second encoder pass)")
    group.add_argument('--sgdrop-attribution-relu', default='gradient', choices=('gradient', 'product'),
                       help="where the attribution's ReLU applies: gradient, ReLU(d logit_y / d z) * z (paper), or "
                            'product, ReLU(d logit_y / d z * z), which also reaches negative features of a signed '
                            'latent (ConvNeXt)')
    group.add_argument('--sgdrop-reference', default='zero', choices=('zero', 'channel_mean'),
                       help='what a latent feature is attributed against and set to when dropped: zero (paper), or '
                            'the mean over channels at its position, for signed latents (ConvNeXt)')
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
    group.add_argument('--compile-backend', default='inductor', metavar='NAME',
                       help="torch.compile's backend (inductor; eager or aot_eager compile nothing, for checks)")
    group.add_argument('--in-memory', action='store_true',
                       help='decode the dataset once into a uint8 tensor kept in memory (on the GPU when there is '
                            'one); for small datasets')
    group.add_argument('--output', default='.', metavar='DIR',
                       help='directory for checkpoints, log.jsonl and the exported model')
    group.add_argument('--overwrite', action='store_true',
                       help='replace the files of a previous run in --output instead of refusing to start')
    group.add_argument('--metrics-json', default=None, metavar='PATH',
                       help='with --evaluate, which writes nothing into --output, write its metrics (acc1, acc5, loss, '
                            'count, the checkpoint evaluated and its epoch) as JSON to PATH, a new file')
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
    if args.dist_url == parser.get_default('dist_url') and int(os.environ.get('WORLD_SIZE', '1')) > 1 \
            and 'LOCAL_RANK' in os.environ:
        # started by torchrun (or torch.distributed.launch): its processes are one run, joined through its environment
        args.dist_url = 'env://'
    if args.sgdrop_rho is None:
        args.sgdrop_rho = rho_for_arch(args.arch, preset)
    args.settings = run_settings(args)
    return args


def run_settings(args: argparse.Namespace) -> RunSettings:
    """What defines the run, as its checkpoints store it; built once, before any process changes an argument."""
    return RunSettings(
        arch=args.arch, model_kwargs=args.model_kwargs, regularizer=args.regularizer,
        sgdrop=check_sgdrop_flags({name: getattr(args, name) for name in sgdrop_zoo.SGDROP_SETTINGS}),
        image_size=args.image_size, train_transform=args.train_transform,
        optimizer=args.optimizer, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
        data=args.data, train_subset=args.train_subset, train_subset_per_class=args.train_subset_per_class,
        holdout_per_class=args.holdout_per_class)


def main(argv: Optional[Sequence[str]] = None) -> None:
    held = contextlib.ExitStack()
    try:
        args = parse_args(argv)
        class_names, checkpoint = check_inputs(args)
        held.enter_context(hold_output(args))
    except ONE_LINE_ERRORS as e:
        # under torchrun every process finds the same problem; one line is enough
        if int(os.environ.get('RANK', '0')) == 0:
            print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    with held:
        launch(args, class_names, checkpoint)


@contextlib.contextmanager
def hold_output(args: argparse.Namespace) -> Iterator[None]:
    """This run's hold on --output while it runs (``hold_folder``), on the process that writes there: a second run
    into the folder is refused. Nothing for --evaluate, which writes nothing there."""
    if args.evaluate or int(os.environ.get('RANK', '0')) != 0 or args.rank > 0:
        yield
        return
    with hold_folder(Path(args.output)):
        # again, now that no other run can write there: one may have finished into the folder since the first check
        check_output(Path(args.output), args.resume, args.evaluate, args.overwrite, args.pretrained, args.dummy)
        yield


@dataclasses.dataclass(frozen=True)
class Launch:
    """How the run's processes start, decided once from the arguments and torchrun's environment.

    Args:
        distributed: Whether the run spans several processes.
        world_size: The number of its processes.
        backend: The process group's backend.
        procs_per_node: The processes on this node, which share its batch size and loader workers.
    """
    distributed: bool
    world_size: int
    backend: str
    procs_per_node: int


@dataclasses.dataclass(frozen=True)
class Process:
    """This process's part of the run: its device and rank, and its share of the batch size and loader workers."""
    device: torch.device
    rank: int
    world_size: int
    distributed: bool
    batch_size: int
    workers: int

    @property
    def is_main(self) -> bool:
        """Whether this process prints, logs and saves: the first."""
        return self.rank == 0


def launch(args: argparse.Namespace, class_names: list[str], checkpoint: Optional[RecipeCheckpoint]) -> None:
    """Train in this process, in one per GPU (--multiprocessing-distributed) or as one of torchrun's."""
    if args.seed is not None and torch.cuda.is_available():
        warnings.warn('You have chosen to seed training. This will turn on the CUDNN deterministic setting, '
                      'which can slow down your training considerably!')
    if args.gpu is not None:
        warnings.warn('You have chosen a specific GPU. This will completely disable data parallelism.')

    world_size = int(os.environ['WORLD_SIZE']) if args.dist_url == 'env://' and args.world_size == -1 \
        else args.world_size
    distributed = world_size > 1 or args.multiprocessing_distributed
    ngpus_per_node = torch.cuda.device_count() if torch.cuda.is_available() else 1
    backend = args.dist_backend or ('nccl' if torch.cuda.is_available() else 'gloo')

    if args.multiprocessing_distributed:
        # --world-size is the number of nodes here; the run has one process per GPU of each
        setup = Launch(True, ngpus_per_node * world_size, backend, ngpus_per_node)
        # each spawned process reads the --resume checkpoint again: handed over, its tensors would all go through
        # shared memory
        del checkpoint
        try:
            mp.spawn(run_worker, nprocs=ngpus_per_node, args=(setup, args, class_names))
        except mp.ProcessExitedException as e:  # the process has said why
            sys.exit(e.exit_code)
    else:
        gpu = args.gpu
        if distributed and torch.cuda.is_available() and gpu is None and 'LOCAL_RANK' in os.environ:
            gpu = int(os.environ['LOCAL_RANK'])  # torchrun: one process per GPU
        procs_per_node = int(os.environ.get('LOCAL_WORLD_SIZE', '1')) if distributed else 1
        run_worker(gpu, Launch(distributed, world_size, backend, procs_per_node), args, class_names, checkpoint)


def run_worker(gpu: Optional[int], setup: Launch, args: argparse.Namespace, class_names: list[str],
               checkpoint: Optional[RecipeCheckpoint] = None) -> None:
    """`main_worker`, stopped in one line by an image that cannot be decoded (the checks before training read only
    the headers) or a write the system refused; the checkpoint of the last finished epoch stays as it was."""
    try:
        main_worker(gpu, setup, args, class_names, checkpoint)
    except ONE_LINE_ERRORS as e:
        last = Path(args.output) / CHECKPOINT_NAME
        resume = f' (continue the run with --resume {last})' if last.exists() else ''
        print(f'error: {e}{resume}', file=sys.stderr)
        sys.exit(2)


def check_inputs(args: argparse.Namespace) -> tuple[list[str], Optional[RecipeCheckpoint]]:
    """Stop with one clear line for every problem that can be seen before training starts.

    Returns:
        The dataset's classes (those of the fake dataset of `--dummy`), and the `--resume` checkpoint, read and
        checked (None without `--resume`).
    """
    check_arch(args.arch, args.pretrained)
    check_launcher(args.dist_url, args.world_size, args.rank, args.multiprocessing_distributed)
    check_counts(positive=(('--epochs', args.epochs), ('-b/--batch-size', args.batch_size),
                           ('-p/--print-freq', args.print_freq), ('--image-size', args.image_size),
                           ('--lr-step-size', args.lr_step_size)),
                 not_negative=(('-j/--workers', args.workers), ('--train-subset', args.train_subset),
                               ('--train-subset-per-class', args.train_subset_per_class),
                               ('--start-epoch', args.start_epoch), ('--train-eval-samples', args.train_eval_samples),
                               ('--holdout-per-class', args.holdout_per_class)))
    check_training_numbers(args.lr, args.momentum, args.weight_decay, args.lr_gamma, args.seed, args.image_size)
    check_gpu(args.gpu)
    check_start_epoch(args.start_epoch, args.epochs, args.evaluate, bool(args.resume))
    check_output(Path(args.output), args.resume, args.evaluate, args.overwrite, args.pretrained, args.dummy)
    check_metrics_json(args.metrics_json, args.evaluate)
    check_subset_options(args.train_subset, args.train_subset_per_class, args.log_area_ratio)
    check_model_kwargs(args.arch, args.model_kwargs, lambda: create_model(args, num_classes=2), args.image_size)

    if args.dummy:
        class_names = [str(i) for i in range(1000)]
    else:
        class_names = check_image_folders(Path(args.data), args.workers)
    if args.holdout_per_class:
        check_holdout(Path(args.data), args.holdout_per_class, args.train_subset_per_class, args.dummy)
    check_val_subset(args.val_subset, args.log_area_ratio)
    if args.log_area_ratio or args.val_subset:
        num_val = recipe_data.num_val_images(Path(args.data), class_names, args.dummy, args.holdout_per_class)
        check_fits_val_split(args.val_subset, args.log_area_ratio, num_val)

    if not args.resume:
        return class_names, None
    log_path = Path(args.output) / LOG_NAME
    if log_path.exists() and not args.evaluate:
        read_log(log_path)
    checkpoint = load_checkpoint(args.resume)
    check_resumed(checkpoint, args.resume, args.arch, args.model_kwargs, class_names, args.data)
    saved = checkpoint.settings
    if not args.evaluate:
        check_same_run(args.resume, saved, args.settings)
        check_no_rewind(Path(args.resume), checkpoint.epoch, Path(args.output))
    elif args.holdout_per_class != saved.holdout_per_class and args.holdout_per_class:
        # the dev split is carved from the training folder: one of another size holds images the run trained on
        raise RecipeError(f'--evaluate --holdout-per-class {args.holdout_per_class}: {args.resume} was trained with '
                          f'--holdout-per-class {saved.holdout_per_class}, so this dev split holds images it trained '
                          f'on; pass --holdout-per-class {saved.holdout_per_class or 0} '
                          f'({"its own dev split" if saved.holdout_per_class else "val/"})')
    return class_names, checkpoint


def check_no_rewind(resume: Path, epoch: int, output: Path) -> None:
    """Refuse a --resume into its own folder from a checkpoint older than the folder's last one (model_best.pth.tar,
    say): training on from it would replace the later epochs' checkpoint and log lines."""
    last = output / CHECKPOINT_NAME
    if resume.resolve() == last.resolve() or resume.resolve().parent != output.resolve() or not last.is_file():
        return
    try:
        last_epoch = RecipeCheckpoint.read_epoch(last)
    except ValueError as e:
        raise RecipeError(f"--resume {resume}: the run's last checkpoint cannot be read, so whether training on would "
                          f'replace later epochs cannot be told; move it aside, or copy {resume.name} into a new '
                          f'--output ({e})') from e
    if epoch < last_epoch:
        raise RecipeError(f'--resume {resume} holds epoch {epoch}, and {last} of the same run epoch {last_epoch}, '
                          f'which training on from it would replace; resume from {last}, or copy {resume.name} into '
                          f'a new --output to train on from it there')


def check_same_run(resume: str, saved: RunSettings, settings: RunSettings) -> None:
    """Refuse a --resume whose run-defining settings differ from those its checkpoint was trained with."""
    changed = saved.changed_run_settings(settings)
    if changed:
        name = changed[0]
        flag, was, now = '--' + name.replace('_', '-'), saved.run_defining()[name], settings.run_defining()[name]
        raise RecipeError(f'--resume {resume} was trained with {flag} {was}, not {now}; pass {flag} {was} to continue '
                          f'it, or start a new run in another --output')


def create_model(args: argparse.Namespace, num_classes: int, pretrained: bool = False) -> nn.Module:
    """The timm model `args.arch` with the regularizer of `args`; plain timm names get SGDrop added."""
    options = args.settings.sgdrop_cfg.model_args()
    if args.arch.startswith('sgdrop_'):
        return timm.create_model(args.arch, pretrained=pretrained, num_classes=num_classes, **options,
                                 **args.model_kwargs)
    model = timm.create_model(args.arch, pretrained=pretrained, num_classes=num_classes, **args.model_kwargs)
    return sgdrop_zoo.add_sgdrop(model, **options)


def main_worker(gpu: Optional[int], setup: Launch, args: argparse.Namespace, class_names: list[str],
                checkpoint: Optional[RecipeCheckpoint] = None) -> None:
    """Train (or, with `--evaluate`, evaluate) in this process; `checkpoint` is the `--resume` one, if already read."""
    process = init_process(gpu, setup, args)
    device = process.device
    output, log_path = Path(args.output), Path(args.output) / LOG_NAME
    if process.is_main and not args.evaluate:
        prepare_output(output, remove_previous_run=args.overwrite and not args.resume)

    model, model_without_ddp = build_model(args, process, class_names)
    criterion = nn.CrossEntropyLoss().to(device)
    if args.optimizer == 'sgd':
        optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), args.lr, weight_decay=args.weight_decay)
    # "Sets the learning rate to the initial LR decayed by 10 every 30 epochs" with the defaults
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)
    amp_dtype = getattr(torch, args.amp_dtype)
    amp_autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype, enabled=args.amp)
    # bf16 has float32's range and needs no loss scaling; the scaler is a no-op unless float16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype == torch.float16)
    rho_schedule = args.settings.sgdrop_cfg.rho_schedule(args.epochs)

    start_epoch, best_acc1, best_epoch, rng_state = args.start_epoch, 0.0, None, None
    if args.resume:
        checkpoint = checkpoint if checkpoint is not None else load_checkpoint(args.resume)
        start_epoch, best_acc1, best_epoch, rng_state = resume(checkpoint, model_without_ddp, optimizer, scheduler,
                                                               scaler, process, args)

    # Data loading code
    loaders = build_loaders(args, process, model_without_ddp)

    if args.evaluate:
        evaluate(loaders, model_without_ddp, criterion, amp_autocast, process, args,
                 start_epoch if args.resume else None)
        cleanup(process)
        return

    if rng_state is not None and not process.distributed:
        # continues exactly where the interrupted run stopped: shuffling, augmentation, dropout
        set_rng_state(rng_state)
    if process.is_main:
        keep_log_until(log_path, start_epoch)
    for epoch in range(start_epoch, args.epochs):
        if hasattr(loaders.train.sampler, 'set_epoch'):
            loaders.train.sampler.set_epoch(epoch)
        if args.regularizer == 'sgdrop':
            model_without_ddp.sgdrop_rho = rho_schedule(epoch)

        # train for one epoch
        start = time.time()
        train_metrics = train(loaders.train, model, model_without_ddp, criterion, optimizer, scaler, amp_autocast,
                              epoch, process, args)
        epoch_time = time.time() - start
        if process.distributed:
            # each process's BatchNorm statistics come from its own shard: their mean, in the attribution's EMA network
            # too, so that every process validates, and the first saves, one model
            distribute_bn(model_without_ddp, process.world_size, reduce=True)
            if model_without_ddp.ema_model is not None:
                distribute_bn(model_without_ddp.ema_model, process.world_size, reduce=True)

        # evaluate on validation set
        val_metrics = validate(loaders.val, model_without_ddp, criterion, amp_autocast, process, args)
        if not math.isfinite(val_metrics['loss']):
            # a last step that diverged leaves a finite training loss behind: its weights show it here
            raise RecipeError(f'the validation loss is not finite after epoch {epoch + 1}: the weights have diverged, '
                              f'and nothing of this epoch was saved; start again with a lower --lr than {args.lr}')
        clean_metrics = validate(loaders.train_eval, model_without_ddp, criterion, amp_autocast, process, args,
                                 'Train (clean)') if loaders.train_eval is not None else None
        # main process only (the others hold no area loader), and without collectives: the other processes simply
        # wait for it at the first collective of the next epoch
        area_ratio = validate_area_ratio(loaders.area, model_without_ddp, device, args) \
            if loaders.area is not None else None
        lr = optimizer.param_groups[0]['lr']
        scheduler.step()

        # remember best acc@1 and save checkpoint
        acc1 = val_metrics['acc1']
        # the first epoch of a run is its best so far whatever its top-1, so every run has a model_best to export
        is_best = best_epoch is None or acc1 > best_acc1
        if is_best:
            best_acc1, best_epoch = acc1, epoch + 1
        if process.is_main:
            # the log line goes first: a run killed before its checkpoint is written repeats this epoch on resume,
            # and resuming drops the lines of epochs the checkpoint does not hold
            append_log(log_path, epoch_record(epoch, train_metrics, val_metrics, clean_metrics, area_ratio, lr,
                                              model_without_ddp.sgdrop_rho, epoch_time, args.regularizer))
            save_checkpoint(RecipeCheckpoint(
                epoch=epoch + 1, acc1=acc1, best_acc1=best_acc1, best_epoch=best_epoch, class_names=class_names,
                settings=args.settings, state_dict=model_without_ddp.state_dict(),
                sgdrop_ema=model_without_ddp.ema_state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), rng_state=get_rng_state(),
            ), is_best, output)

    if process.is_main and (output / BEST_NAME).exists():
        export_dir = export_for_hub(output / BEST_NAME, output, args, class_names)
        print(f'=> best val Acc@1 {best_acc1:.3f}; checkpoints {output / CHECKPOINT_NAME} and '
              f'{output / BEST_NAME}; weights {export_dir / WEIGHTS_NAME}', flush=True)
    cleanup(process)


def init_process(gpu: Optional[int], setup: Launch, args: argparse.Namespace) -> Process:
    """Join the process group when distributed, and seed this process.

    Returns:
        This process's device, rank and share of the batch size and workers.
    """
    # the device first: NCCL binds a process group to the current device when it is created
    if torch.cuda.is_available():
        device = torch.device('cuda', gpu if gpu is not None else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    if setup.distributed:
        rank = int(os.environ['RANK']) if args.dist_url == 'env://' and args.rank == -1 else args.rank
        if args.multiprocessing_distributed:
            # the global rank of this process among all processes
            rank = rank * setup.procs_per_node + gpu
        dist.init_process_group(backend=setup.backend, init_method=args.dist_url, world_size=setup.world_size,
                                rank=rank)
        # the batch size and workers are totals for this node, as in the official script
        process = Process(device, rank, setup.world_size, True, max(1, args.batch_size // setup.procs_per_node),
                          (args.workers + setup.procs_per_node - 1) // setup.procs_per_node)
    else:
        process = Process(device, 0, 1, False, args.batch_size, args.workers)

    if args.seed is not None:
        # the same seed on every process would give every process the same dropout masks
        random_seed(args.seed, process.rank)
        cudnn.deterministic = True
        cudnn.benchmark = False
    else:
        cudnn.benchmark = True
    return process


def build_model(args: argparse.Namespace, process: Process, class_names: list[str]) -> tuple[nn.Module, nn.Module]:
    """The model to train on the process's device (wrapped in DDP when distributed), and the unwrapped model."""
    if process.is_main:
        print(f"=> creating model '{args.arch}'{' (pretrained)' if args.pretrained else ''} "
              f"with regularizer {args.regularizer}", flush=True)
    model = create_model(args, len(class_names), pretrained=args.pretrained).to(process.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        # in place, so state_dict keys and the SGDrop methods stay those of the model
        model.compile(backend=args.compile_backend)
    if not process.distributed:
        return model, model
    device_ids = [process.device.index] if process.device.type == 'cuda' else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids), model


def resume(checkpoint: RecipeCheckpoint, model: nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, process: Process,
           args: argparse.Namespace) -> tuple[int, float, int, Optional[dict[str, Any]]]:
    """Load the `--resume` checkpoint into the unwrapped `model` and, unless evaluating, the training state.

    Releases the checkpoint's state once loaded, so that its tensors are freed however many callers hold it.

    Returns:
        The epoch to start from, the best top-1 and best epoch to continue with, and the RNG state to restore (None
        when evaluating).
    """
    best_acc1, best_epoch = checkpoint.best_acc1, checkpoint.best_epoch
    model.load_state_dict(checkpoint.state_dict)
    if checkpoint.sgdrop_ema is not None:  # the 'ema' and 'ema_head' sources' EMA network
        model.load_ema_state_dict(checkpoint.sgdrop_ema)
    rng_state = None
    if not args.evaluate:
        optimizer.load_state_dict(checkpoint.optimizer)
        scheduler.load_state_dict(checkpoint.scheduler)
        if checkpoint.scaler:  # a float16 scaler's state; a disabled scaler's is empty
            scaler.load_state_dict(checkpoint.scaler)
        rng_state = checkpoint.rng_state
    if process.is_main:
        print(f"=> loaded checkpoint '{args.resume}' (epoch {checkpoint.epoch})", flush=True)
    if process.is_main and not args.evaluate:
        best_acc1, best_epoch = restore_model_best(checkpoint, Path(args.resume), Path(args.output) / BEST_NAME)
    checkpoint.release_state()
    return checkpoint.epoch, best_acc1, best_epoch, rng_state


def restore_model_best(checkpoint: RecipeCheckpoint, resume_path: Path, best_path: Path) -> tuple[float, int]:
    """Check that `best_path` holds the resumed run's best epoch, rebuilding it when a kill left it missing or stale.

    A run stopped between writing its checkpoint and copying it to model_best leaves model_best missing or one best
    epoch behind. When the resumed checkpoint is that best epoch, the copy is made again and nothing is lost; when
    model_best is missing and the best epoch's weights are gone, the resumed epoch stands in for it and becomes the
    best to beat. A model_best of another epoch that the resumed checkpoint cannot replace is kept.

    Args:
        checkpoint: The resumed checkpoint, read from `resume_path`.
        resume_path: Its file.
        best_path: The run's model_best.

    Returns:
        The best top-1 and best epoch to continue with.
    """
    best_acc1, best_epoch = checkpoint.best_acc1, checkpoint.best_epoch
    if best_path.exists():
        held = RecipeCheckpoint.read_epoch(best_path)
        if held == best_epoch:
            return best_acc1, best_epoch
        if best_epoch != checkpoint.epoch:
            # not what a kill leaves (an older checkpoint resumed, say): weights the resumed one cannot replace
            print(f'=> {best_path} holds epoch {held}, not the best epoch {best_epoch} of {resume_path}; it is kept '
                  f'until this run has a better epoch', flush=True)
            return best_acc1, best_epoch
        print(f'=> {best_path} holds epoch {held}, not the best epoch {best_epoch} (the run was stopped while '
              f'writing it); copied again from {resume_path}, which holds that epoch', flush=True)
    elif best_epoch == checkpoint.epoch:
        print(f'=> {best_path} is missing (the run was stopped while writing it); copied again from {resume_path}, '
              f'which holds its best epoch', flush=True)
    else:
        best_acc1, best_epoch = checkpoint.acc1, checkpoint.epoch
        print(f"=> {best_path} is missing and the best epoch's weights are gone; rebuilt from {resume_path} (epoch "
              f"{best_epoch}, val Acc@1 {best_acc1:.3f}), the best to beat from now on", flush=True)
    copy_file(resume_path, best_path)
    return best_acc1, best_epoch


def build_loaders(args: argparse.Namespace, process: Process, model: nn.Module) -> RecipeLoaders:
    """The loaders of the run (``recipe_data.build_loaders``), normalised with the model's mean and std."""
    data_config = resolve_model_data_config(model)
    return recipe_data.build_loaders(
        Path(args.data), args.image_size, args.train_transform, data_config['mean'], data_config['std'],
        process.batch_size, process.workers, process.device, rank=process.rank, world_size=process.world_size,
        distributed=process.distributed, shuffle_seed=args.seed or 0, dummy=args.dummy, in_memory=args.in_memory,
        train_subset=args.train_subset, train_subset_per_class=args.train_subset_per_class,
        holdout_per_class=args.holdout_per_class, train_eval_samples=args.train_eval_samples,
        val_subset=args.val_subset, area_images=args.log_area_ratio)


def cleanup(process: Process) -> None:
    if process.distributed:
        dist.destroy_process_group()


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch of images on `device`, in the memory format of the model."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def train(train_loader: Any, model: nn.Module, model_without_ddp: nn.Module, criterion: nn.Module,
          optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, amp_autocast: Callable[[], Any], epoch: int,
          process: Process, args: argparse.Namespace) -> dict[str, float]:
    """Train for one epoch; returns the loss and the accuracy of the (SGDrop-masked) training logits, and the means of
    the model's per-sample SGDrop diagnostics (``sgdrop_step_stats``)."""
    batch_time, data_time, losses, top1, top5 = (AverageMeter() for _ in range(5))
    device = process.device
    diagnostics = {name: AverageMeter() for name in STEP_STAT_NAMES}
    # the first step whose loss is not finite, kept on the device (no host read per step) and checked once an epoch
    no_step = len(train_loader)
    first_nonfinite_step = torch.tensor(no_step, device=device)
    progress = ProgressMeter(len(train_loader), {'Time': (batch_time, '6.3f'), 'Data': (data_time, '6.3f'),
                                                 'Loss': (losses, '.4e'), 'Acc@1': (top1, '6.2f'),
                                                 'Acc@5': (top5, '6.2f')},
                             prefix=f'Epoch: [{epoch}]', enabled=process.is_main)

    # switch to train mode
    model.train()

    end = time.time()
    for i, (images, target) in enumerate(train_loader):
        # measure data loading time
        data_time.update(time.time() - end)

        images = to_device(images, device, args.channels_last)
        target = target.to(device, non_blocking=True)

        # compute output: the logits of the SGDrop-masked latent features (the target picks the attributed class)
        with amp_autocast():
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

    if process.distributed:
        all_reduce_meters((losses, top1, top5, *diagnostics.values()), device)
        dist.all_reduce(first_nonfinite_step, dist.ReduceOp.MIN)
    step = first_nonfinite_step.item()
    if step < no_step:
        raise RecipeError(f'the training loss is not finite from epoch {epoch + 1}, step {step + 1} on: the weights '
                          f'have diverged, and nothing of this epoch was saved; start again with a lower --lr than '
                          f'{args.lr}')
    return {'loss': float(losses.avg), 'acc1': float(top1.avg), 'acc5': float(top5.avg), 'count': top1.count,
            **{name: float(meter.avg) for name, meter in diagnostics.items()}}


def validate(val_loader: Any, model: nn.Module, criterion: nn.Module, amp_autocast: Callable[[], Any],
             process: Process, args: argparse.Namespace, name: str = 'Test') -> dict[str, float]:
    """Evaluate the unwrapped eval-mode model on this process's shard, then sum the metrics over processes.

    The unwrapped model is used so that processes with one batch more or less than the others never wait on a DDP
    collective.
    """
    batch_time, losses, top1, top5 = (AverageMeter() for _ in range(4))
    progress = ProgressMeter(len(val_loader), {'Time': (batch_time, '6.3f'), 'Loss': (losses, '.4e'),
                                               'Acc@1': (top1, '6.2f'), 'Acc@5': (top5, '6.2f')},
                             prefix=f'{name}: ', enabled=process.is_main)

    # switch to evaluate mode
    model.eval()

    with torch.no_grad():
        end = time.time()
        for i, (images, target) in enumerate(val_loader):
            images = to_device(images, process.device, args.channels_last)
            target = target.to(process.device, non_blocking=True)

            # compute output
            with amp_autocast():
                output = model(images)
                loss = criterion(output, target)

            # measure accuracy and record loss
            record_batch((losses, top1, top5), output, target, loss)

            # measure elapsed time
            batch_time.update(time.time() - end)
            end = time.time()

            if i % args.print_freq == 0:
                progress.display(i + 1)

    if process.distributed:
        all_reduce_meters((losses, top1, top5), process.device)
    progress.display_summary(['Acc@1', 'Acc@5'])
    return {'loss': float(losses.avg), 'acc1': float(top1.avg), 'acc5': float(top5.avg), 'count': int(top1.count)}


def validate_area_ratio(loader: Any, model: nn.Module, device: torch.device, args: argparse.Namespace) -> float:
    """Mean attribution area ratio of the unwrapped `model` on all images of `loader` (a backward through a DDP
    wrapper would wait for the other processes)."""
    # imported here: Grad-CAM brings matplotlib, OpenCV and scikit-learn, seconds of start-up that runs without
    # --log-area-ratio should not pay
    from sgdrop_zoo.saliency import mean_area_ratio

    area_ratio, count = mean_area_ratio(model, ((to_device(images, device, args.channels_last), target)
                                                for images, target in loader))
    print(f' * Area ratio {area_ratio:.4f} ({count} images)', flush=True)
    return area_ratio


def evaluate(loaders: RecipeLoaders, model: nn.Module, criterion: nn.Module, amp_autocast: Callable[[], Any],
             process: Process, args: argparse.Namespace, epoch: Optional[int]) -> None:
    """`--evaluate`: validate the loaded weights (those of `epoch`, None for no checkpoint) and measure their area
    ratio, print the metrics, and write them to `--metrics-json` when given; nothing goes into `--output`."""
    metrics = validate(loaders.val, model, criterion, amp_autocast, process, args)
    area_ratio = validate_area_ratio(loaders.area, model, process.device, args) if loaders.area is not None else None
    if not process.is_main:
        return
    print(f"=> val Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f} on {metrics['count']} images "
          f"({args.resume or 'no checkpoint'})", flush=True)
    if args.metrics_json:
        record = {**{key: metrics[key] for key in ('acc1', 'acc5', 'loss', 'count')},
                  **({'area_ratio': area_ratio} if area_ratio is not None else {}),
                  'checkpoint': str(Path(args.resume).resolve()) if args.resume else None, 'epoch': epoch}
        atomic_write(Path(args.metrics_json), lambda f: f.write((json.dumps(record, indent=1) + '\n').encode()))


def save_checkpoint(checkpoint: RecipeCheckpoint, is_best: bool, output: Path) -> None:
    """Write `checkpoint` to `output`, and copy it to model_best.pth.tar when best.

    Each file is written to a temporary file in the same directory and renamed over the old one, so a run killed at any
    moment leaves the previous complete checkpoint in place.
    """
    path = output / CHECKPOINT_NAME
    checkpoint.write(path)
    if is_best:
        copy_file(path, output / BEST_NAME)


def export_for_hub(checkpoint_path: Path, output: Path, args: argparse.Namespace, class_names: list[str]) -> Path:
    """Export the weights of a checkpoint as `model.safetensors` + timm's `config.json`, in `output`.

    The model is rebuilt on the CPU from the checkpoint, so the export holds plain contiguous float32 weights whatever
    the training memory format or compile state.
    """
    checkpoint = RecipeCheckpoint.read(checkpoint_path)
    model = create_model(args, len(class_names))
    model.load_state_dict(checkpoint.state_dict)
    try:
        # model_best holds its own epoch and that epoch's top-1, the best one
        save_recipe_export(model, output, args.settings, class_names, checkpoint.epoch, checkpoint.acc1)
    except ValueError as e:  # weights that are not finite
        raise RecipeError(str(e)) from e
    except RunFileError as e:  # a full disk
        raise RecipeError(f'{e}, then resume the run, which exports again (the checkpoints are intact)') from e
    return output


if __name__ == '__main__':
    main()
