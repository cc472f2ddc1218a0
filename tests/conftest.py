"""Fixtures shared by the fine-tuning and saliency tests."""
import shutil
from pathlib import Path

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

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
