"""The checks of the training recipe's inputs, made before any work: each problem stops it with one line.

Each check takes the values of the options it checks and raises ``RecipeError`` with a message that names the option,
says what is wrong and what to pass instead. ``train/main.py`` runs them in order in ``check_inputs``; the checks of a
``--resume`` checkpoint also refuse one of another model, dataset or run.
"""
import contextlib
import difflib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import timm
import torch

from sgdrop_zoo.checkpoint import RecipeCheckpoint
from sgdrop_zoo.data import MAX_IMAGE_SIZE, smallest_class
from sgdrop_zoo.errors import OptionError
from sgdrop_zoo.run_files import CHECKPOINT_NAME, RUN_FILES, check_writable_folder
from sgdrop_zoo.sgdrop import MODEL_SGDROP_SETTINGS, SGDropCfg

__all__ = [
    'RecipeError', 'check_arch', 'check_counts', 'check_fits_val_split',
    'check_gpu', 'check_holdout', 'check_launcher', 'check_metrics_json', 'check_model_kwargs', 'check_output',
    'check_resumed', 'check_sgdrop_flags', 'check_start_epoch', 'check_subset_options', 'check_training_numbers',
    'check_val_subset', 'load_checkpoint',
]

class RecipeError(Exception):
    """A run that cannot start or go on (bad input, diverged weights, a refused export); the message says what is
    wrong and what to do, in one line."""


def check_arch(arch: str, pretrained: bool) -> None:
    """`arch` must be a timm model name, with a tag timm knows, and with weights when `pretrained`."""
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ''
        raise RecipeError(f"unknown --arch {arch!r}: not a timm model; {hint}"
                          f"list names with timm.list_models('*{arch.split('_')[-1]}*')")
    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError:  # timm's "Invalid pretrained tag"
        tags = timm.list_pretrained(f"{arch.split('.')[0]}.*")
        raise RecipeError(f"--arch {arch}: no such pretrained tag; the tags of {arch.split('.')[0]} are "
                          f"{', '.join(tags) if tags else 'none'}") from None
    if pretrained and not (pretrained_cfg and pretrained_cfg.has_weights):
        tags = timm.list_pretrained(f"{arch.split('.')[0]}*")
        raise RecipeError(f"--pretrained: {arch} has no pretrained weights; "
                          f"{'pass one of ' + ', '.join(tags) if tags else 'leave --pretrained out'}")


def check_launcher(dist_url: str, world_size: int, rank: int, multiprocessing_distributed: bool) -> None:
    """The distributed options must name their processes: torchrun's environment, or the nodes of a spawn."""
    if dist_url == 'env://' and 'WORLD_SIZE' not in os.environ:
        raise RecipeError('--dist-url env:// reads WORLD_SIZE and RANK from the launcher; start the script with '
                          'torchrun, e.g. torchrun --nproc-per-node 2 train/main.py DATA --dist-url env://')
    if multiprocessing_distributed and (world_size < 1 or rank < 0):
        raise RecipeError('--multiprocessing-distributed needs --world-size (number of nodes) and --rank (node rank), '
                          'e.g. --world-size 1 --rank 0 on one machine')


def check_counts(positive: Sequence[tuple[str, int]], not_negative: Sequence[tuple[str, int]]) -> None:
    """Whole-number options, as (flag, value): those of `positive` at least 1, those of `not_negative` 0 or more."""
    for flag, value in positive:
        if value < 1:
            raise RecipeError(f'{flag} {value}: pass a positive number')
    for flag, value in not_negative:
        if value < 0:
            raise RecipeError(f'{flag} {value} is negative; pass 0 or more')


def check_training_numbers(lr: float, momentum: float, weight_decay: float, lr_gamma: float, seed: Optional[int],
                           image_size: int) -> None:
    """Finite, in-range optimizer settings, a seed that seeds every RNG, and an image size that fits in memory."""
    if not 0 < lr < math.inf:
        raise RecipeError(f'--lr {lr}: the learning rate must be a positive number, e.g. 0.1 for SGD or 1e-4 for '
                          f'Adam')
    if not 0 <= momentum < 1:
        raise RecipeError(f'--momentum {momentum}: pass a number in [0, 1), e.g. 0.9')
    if not 0 <= weight_decay < math.inf:
        raise RecipeError(f'--wd {weight_decay}: pass 0 or a positive number, e.g. 1e-4')
    if not 0 < lr_gamma < math.inf:
        raise RecipeError(f'--lr-gamma {lr_gamma}: pass a positive factor, e.g. 0.1, or 1.0 for a constant lr')
    if seed is not None and not 0 <= seed < 2 ** 32:
        raise RecipeError(f'--seed {seed}: pass a number in [0, 2**32)')
    if image_size > MAX_IMAGE_SIZE:
        raise RecipeError(f'--image-size {image_size}: larger than {MAX_IMAGE_SIZE} px, which no batch of these '
                          f'models fits in memory; pass the side the model is trained at, e.g. 224')


def check_sgdrop_flags(settings: Mapping[str, Any]) -> SGDropCfg:
    """The SGDrop settings of the command line by their names, each judged by the method's rule whatever the
    regularizer (every run builds its rho schedule from them) and named by its flag."""
    for name, value in settings.items():
        try:
            SGDropCfg(**{name: value})
        except ValueError as e:
            raise RecipeError(f"--{name.replace('_', '-')} {value}: {e}") from e
    return SGDropCfg(**settings)


def check_gpu(gpu: Optional[int]) -> None:
    """--gpu needs a visible CUDA GPU."""
    if gpu is not None and not torch.cuda.is_available():
        raise RecipeError(f'--gpu {gpu}: no CUDA GPU is visible; leave --gpu out to train on the CPU')


def check_start_epoch(start_epoch: int, epochs: int, evaluate: bool, resume: bool) -> None:
    """A new run must have epochs left to train (a resumed one starts at its checkpoint's epoch)."""
    if start_epoch >= epochs and not evaluate and not resume:
        raise RecipeError(f'--start-epoch {start_epoch} leaves nothing to train with --epochs {epochs}; '
                          f'pass a larger --epochs')


def check_output(output: Path, resume: str, evaluate: bool, overwrite: bool, pretrained: bool, dummy: bool) -> None:
    """--output must be a writable folder that holds no other run, unless resuming it or told to overwrite it.

    --evaluate writes nothing (and needs weights: `resume`, `pretrained`, or the fake data of `dummy`), and --resume
    writes only into the resumed run's own folder or into a new one.
    """
    if evaluate:
        if overwrite:
            raise RecipeError('--evaluate writes nothing, so --overwrite would only delete the run in --output; leave '
                              '--overwrite out')
        if not (resume or pretrained or dummy):
            raise RecipeError('--evaluate needs weights to evaluate: pass --resume CHECKPOINT or --pretrained (a '
                              'freshly initialised model scores at chance)')
        return
    try:
        check_writable_folder(output)
    except OptionError as e:
        raise RecipeError(e.for_command_line()) from e
    previous = [name for name in RUN_FILES if (output / name).exists()]
    resumed_folder = Path(resume).resolve().parent if resume else None
    if previous and resumed_folder is not None and resumed_folder != output.resolve():
        raise RecipeError(f"--output {output} holds another run ({', '.join(previous)}) than the resumed "
                          f"{resume}; resume into its own folder (--output {Path(resume).parent}) or into "
                          f"a new one")
    if previous and not (resume or overwrite):
        # a folder without a checkpoint (a run killed in its first epoch) has nothing to resume
        resumable = (f'continue it with --resume {output / CHECKPOINT_NAME}, '
                     if (output / CHECKPOINT_NAME).is_file() else '')
        raise RecipeError(f"--output {output} holds another run ({', '.join(previous)}); {resumable}choose a new "
                          f"--output, or pass --overwrite to replace it")


def check_metrics_json(path: Optional[str], evaluate: bool) -> None:
    """--metrics-json writes the metrics of --evaluate to a new file, in a folder that exists and can be written."""
    if path is None:
        return
    if not evaluate:
        raise RecipeError(f'--metrics-json {path} writes the metrics of --evaluate; pass --evaluate, or leave it out '
                          f'(a training run logs its metrics to log.jsonl in --output)')
    if os.path.lexists(path):
        raise RecipeError(f'--metrics-json {path} exists; an evaluation replaces no file: pass a new file name, or '
                          f'delete that one')
    folder = Path(path).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise RecipeError(f'--metrics-json {path}: {folder} is not a folder you can write to; pass a file in one')


def check_subset_options(train_subset: int, train_subset_per_class: int, log_area_ratio: int) -> None:
    """One way of choosing the training images at most, and a number of area ratio images that is not negative."""
    if train_subset and train_subset_per_class:
        raise RecipeError('--train-subset and --train-subset-per-class both choose the training images; pass one')
    if log_area_ratio < 0:
        raise RecipeError(f'--log-area-ratio {log_area_ratio} is negative; pass a number of validation images, '
                          f'or 0 to turn it off')


def check_model_kwargs(arch: str, model_kwargs: dict[str, Any], build: Callable[[], Any], image_size: int) -> None:
    """--model-kwargs must leave the input channels and the recipe's own settings alone, and be taken by `arch`.

    Args:
        arch: The architecture.
        model_kwargs: Its extra constructor arguments.
        build: Builds the model with them; called on the meta device, where it builds nothing but the module tree.
        image_size: The input side of the eval-mode forward also run there: some arguments (a drop rate, say) are
            only used in the forward.
    """
    if model_kwargs.get('in_chans', 3) != 3:
        raise RecipeError(f"--model-kwargs in_chans={model_kwargs['in_chans']}: the recipe reads every image as "
                          f"RGB, 3 channels; leave in_chans out")
    reserved = sorted(set(model_kwargs) & {'num_classes', 'pretrained', *MODEL_SGDROP_SETTINGS})
    if reserved:
        raise RecipeError(f"--model-kwargs sets {', '.join(reserved)}, which the recipe sets from its own options; "
                          f"leave them out")
    try:
        with torch.device('meta'):
            model = build().eval()
            with contextlib.suppress(NotImplementedError):  # an op without a meta kernel: the forward checks nothing
                try:
                    model(torch.empty(2, 3, image_size, image_size))
                except RuntimeError as e:  # a shape the network cannot take
                    raise RecipeError(f'{arch} with --model-kwargs {model_kwargs} cannot run at --image-size '
                                      f'{image_size} ({str(e).splitlines()[0][:200]}); pass a larger --image-size or '
                                      f'other --model-kwargs') from e
    except TypeError as e:
        raise RecipeError(f'--model-kwargs {model_kwargs}: {arch} does not take them ({e})') from e
    except ValueError as e:  # a value of the wrong kind, which the model's own code trips over
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise RecipeError(f'--model-kwargs {model_kwargs}: {arch} cannot be built with these values ({reason}); '
                          f'pass values of the types its arguments take') from e


def check_holdout(data: Path, holdout_per_class: int, train_subset_per_class: int, dummy: bool) -> None:
    """Every class must hold its --holdout-per-class images besides its --train-subset-per-class ones."""
    if dummy:
        raise RecipeError('--holdout-per-class holds out images of the training folder, and --dummy has none; '
                          'leave one of them out')
    needed = holdout_per_class + train_subset_per_class
    smallest, size = smallest_class(Path(data) / 'train')
    if size < needed + (0 if train_subset_per_class else 1):
        train_part = f' + --train-subset-per-class {train_subset_per_class}' if train_subset_per_class \
            else ' and at least one to train on'
        raise RecipeError(f'--holdout-per-class {holdout_per_class}{train_part} needs {needed or 1} training '
                          f'images of each class, but class {smallest} has only {size}; pass a smaller '
                          f'--holdout-per-class')


def check_val_subset(val_subset: int, log_area_ratio: int) -> None:
    """--val-subset is a number of images, and the area ratio's images are taken among them."""
    if val_subset < 0:
        raise RecipeError(f'--val-subset {val_subset} is negative; pass a number of validation images, or 0 for '
                          f'all of them')
    if val_subset and log_area_ratio > val_subset:
        raise RecipeError(f'--log-area-ratio {log_area_ratio} is larger than --val-subset {val_subset}; its '
                          f'images are taken among the validated ones, so pass at most {val_subset}')


def check_fits_val_split(val_subset: int, log_area_ratio: int, num_val: int) -> None:
    """Neither number of validation images may exceed the `num_val` of the validation split."""
    for flag, value in (('--log-area-ratio', log_area_ratio), ('--val-subset', val_subset)):
        if value > num_val:
            raise RecipeError(f'{flag} {value} asks for more images than the {num_val} of the validation split; '
                              f'pass at most {num_val}')


def load_checkpoint(path: str) -> RecipeCheckpoint:
    """The --resume checkpoint, read and checked (``RecipeCheckpoint.read``)."""
    if not os.path.isfile(path):
        raise RecipeError(f'--resume {path}: no such checkpoint file; pass a checkpoint.pth.tar written by this script')
    try:
        return RecipeCheckpoint.read(Path(path))
    except ValueError as e:
        raise RecipeError(f'--resume {e}') from e


def check_resumed(checkpoint: RecipeCheckpoint, resume: str, arch: str, model_kwargs: dict[str, Any],
                  class_names: list[str], data: str) -> None:
    """The --resume checkpoint must hold the model of `arch` and `model_kwargs`, trained on the classes of `data`."""
    saved = checkpoint.settings
    if saved.arch != arch:
        raise RecipeError(f'--resume {resume} holds a {saved.arch!r} model, not {arch!r}; pass -a {saved.arch} or a '
                          f'checkpoint of {arch}')
    if saved.model_kwargs != model_kwargs:
        raise RecipeError(f'--resume {resume} was built with --model-kwargs {saved.model_kwargs}, not '
                          f'{model_kwargs}; pass the same --model-kwargs')
    if checkpoint.class_names != class_names:
        raise RecipeError(f'--resume {resume} was trained on {len(checkpoint.class_names)} other classes than the '
                          f'{len(class_names)} in {data}; resume on the same dataset')
