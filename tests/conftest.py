"""Fixtures shared by the recipe, fine-tuning and saliency tests."""
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from sgdrop_zoo.checkpoint import RecipeCheckpoint
from sgdrop_zoo.run_settings import RunSettings

# the recipe's own modules (train/recipe_data.py, ...), found as `python train/main.py` finds them
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'train'))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'cifar10_subset'
SMALL_CLASSES = ('airplane', 'automobile', 'bird')


def make_image_folder(root: Path, classes=SMALL_CLASSES, per_split=(('train', 4), ('val', 2))) -> Path:
    """Copy a few images per class of ../shared/data/cifar10_subset into ``root``/{train,val}/<class>/."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f'shared data not found at {SHARED_DATA}')
    for split, count in per_split:
        for name in classes:
            target = root / split / name
            target.mkdir(parents=True)
            for image in sorted((SHARED_DATA / split / name).iterdir())[:count]:
                shutil.copyfile(image, target / image.name)
    return root


def recipe_checkpoint(model: nn.Module, settings: RunSettings, class_names: list[str], epoch: int = 1,
                      acc1: float = 50.0, best_acc1: float = 50.0) -> RecipeCheckpoint:
    """A checkpoint of ``train/main.py`` holding ``model``'s weights after ``epoch`` epochs, with an empty training
    state (the state that the readers other than the resume do not look at)."""
    return RecipeCheckpoint(epoch=epoch, acc1=acc1, best_acc1=best_acc1, best_epoch=epoch, class_names=class_names,
                            settings=settings, state_dict=model.state_dict(), sgdrop_ema=None, optimizer={},
                            scheduler={}, scaler={}, rng_state={})


@pytest.fixture(scope='session')
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three CIFAR-10 classes, 4 training and 2 validation images each (32 px)."""
    return make_image_folder(tmp_path_factory.mktemp('small_data'))


class RecordOps(TorchDispatchMode):
    """Records the name of every aten op run inside it, e.g. aten._local_scalar_dense (a tensor read on the host)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def folder_held_by_another_process(folder: Path) -> Iterator[int]:
    """A second process that holds ``folder`` as a running training run does (``hold_folder``); yields its pid and
    kills it (kill -9) at the end."""
    code = ('import sys, time; from sgdrop_zoo.run_files import hold_folder\n'
            'with hold_folder(sys.argv[1]):\n    print("held", flush=True); time.sleep(600)')
    holder = subprocess.Popen([sys.executable, '-c', code, str(folder)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    try:
        assert holder.stdout.readline().strip() == 'held'
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
