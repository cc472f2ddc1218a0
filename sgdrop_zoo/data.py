"""Image data shared by the training recipe and the fine-tuning and saliency tools.

ImageFolder checks that fail with one clear line before any work starts, and an in-memory dataset for small data: the
images are decoded once into a uint8 tensor (after the deterministic resize) and batches are normalised, cropped and
flipped on the device.
"""
import collections
import copy
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.data
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from PIL import Image
from timm.data import DEFAULT_CROP_PCT, create_transform
from timm.data.transforms import MaybePILToTensor

__all__ = [
    'EVAL_CROP', 'MAX_IMAGE_SIZE', 'DatasetError', 'InMemoryLoader', 'check_image_folders', 'check_links',
    'decode_images', 'eval_shard', 'eval_transform', 'fixed_order', 'image_header_error', 'load_rgb',
    'per_class_subset', 'random_resized_crop_flip', 'shuffled_order', 'smallest_class', 'stored_train_resize',
    'with_transform',
]

# the largest image side the recipe, fine-tuning and saliency take: larger sides are typos (the zoo's checkpoints take
# 64 to 224 px), whose first batch would exhaust the memory
MAX_IMAGE_SIZE = 4096
# crop_pct and crop_mode of the validation images, by training transform: the images only resized to a square, or
# the official Resize(256) + CenterCrop(224) at any image size (timm's DEFAULT_CROP_PCT is 224 / 256)
EVAL_CROP = {'resize': (1.0, 'squash'), 'crop-flip': (DEFAULT_CROP_PCT, 'center')}


def eval_transform(size: int, train_transform: str, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None) -> Callable:
    """The validation transform of images of side ``size``: timm's eval transform of its ``EVAL_CROP``.

    Exports record the same crop_pct and crop_mode, so timm's ``resolve_model_data_config`` + ``create_transform`` of
    an exported model preprocess exactly as its training validated.

    Args:
        size: Square side of the images.
        train_transform: 'resize' or 'crop-flip', the training transform it goes with.
        mean: Normalisation mean; with ``std``, the transform returns normalised float tensors. None: uint8 tensors,
            to be normalised per batch (``InMemoryLoader``).
        std: Normalisation std.
    """
    crop_pct, crop_mode = EVAL_CROP[train_transform]
    mean_std = {} if mean is None else dict(mean=tuple(mean), std=tuple(std))
    return create_transform(size, is_training=False, interpolation='bilinear', crop_pct=crop_pct, crop_mode=crop_mode,
                            normalize=mean is not None, **mean_std)


def stored_train_resize(size: int, train_transform: str) -> transforms.Resize:
    """The resize of training images decoded into memory (``decode_images``) for ``InMemoryLoader``.

    'resize' stores them at the training size; 'crop-flip' stores squares a crop_pct larger, from which the random
    crops are taken per batch.
    """
    side = size if train_transform == 'resize' else round(size / DEFAULT_CROP_PCT)
    return transforms.Resize((side, side))


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message says what is wrong and what to do, in one line."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's error reaches the main process raised again with the worker's traceback as its
        # message; its last line is the error's own.
        super().__init__(message.strip().splitlines()[-1].removeprefix(f'{__name__}.DatasetError: '))


def check_image_folders(root: Path, workers: int) -> list[str]:
    """Check the ImageFolder layout of `root`/train and `root`/val and that every image can be opened.

    Returns:
        The class names, in ImageFolder's (sorted) order.
    """
    layout = f'expected {root}/train/<class>/<image> and {root}/val/<class>/<image>'
    if not root.is_dir():
        raise DatasetError(f'data folder {root} does not exist; {layout}')
    classes = {}
    samples = []
    for split in ('train', 'val'):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DatasetError(f'data folder {split_dir} does not exist; {layout}')
        classes[split] = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
        if not classes[split]:
            raise DatasetError(f'{split_dir} has no class folders; {layout}')
        hidden = [name for name in classes[split] if name.startswith('.')]
        if hidden:
            # ImageFolder takes every folder as a class, .ipynb_checkpoints or .git included
            raise DatasetError(f'{split_dir / hidden[0]} is a hidden folder, which ImageFolder would take as a class; '
                               f'move it out of {split_dir}')
        for name in classes[split]:
            check_links(split_dir / name)
        class_to_idx = {name: i for i, name in enumerate(classes[split])}
        split_samples = datasets.folder.make_dataset(split_dir, class_to_idx, datasets.folder.IMG_EXTENSIONS,
                                                     allow_empty=True)
        if not split_samples:
            raise DatasetError(f"{split_dir} holds no images ({', '.join(datasets.folder.IMG_EXTENSIONS)}); {layout}")
        empty = sorted(set(classes[split]) - {classes[split][target] for _, target in split_samples})
        if empty:
            raise DatasetError(f"class folder {split_dir / empty[0]} holds no images "
                               f"({', '.join(datasets.folder.IMG_EXTENSIONS)}); add images or remove the folder")
        samples += split_samples
    if classes['train'] != classes['val']:
        only_train = sorted(set(classes['train']) - set(classes['val']))
        only_val = sorted(set(classes['val']) - set(classes['train']))
        raise DatasetError(f'class folders differ between {root}/train and {root}/val (only in train: {only_train}, '
                          f'only in val: {only_val}); every class needs a folder in both')

    # Only the headers are read: cheap even for ImageNet, and it catches files that are not images at all.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for path, error in zip((p for p, _ in samples), pool.map(image_header_error, (p for p, _ in samples))):
            if error:
                raise DatasetError(f'unreadable image {path} ({error}); delete or replace it and rerun')
    return classes['train']


def check_links(class_dir: Path) -> None:
    """Refuse a symbolic link inside ``class_dir`` that leads out of it or to a folder that holds it: ImageFolder
    follows links, so one to another class would label that class's images as this one, and one to a folder above it
    would list its images again (a loop). The class folder itself may be a link, to another disk say.

    Raises:
        DatasetError: Such a link, named with its target.
    """
    real_class_dir = class_dir.resolve()
    for folder, dirs, files in os.walk(class_dir):
        for name in dirs + files:
            path = Path(folder) / name
            if not path.is_symlink():
                continue
            target = path.resolve()
            if target == real_class_dir or real_class_dir not in target.parents:
                raise DatasetError(f'{path} is a link to {target}, outside its class folder {class_dir}: ImageFolder '
                                   f'would take what it leads to as images of this class; remove the link or copy the '
                                   f'images in')
            here = Path(folder).resolve()
            if target == here or target in here.parents:
                # inside the class folder, but to a folder that holds the link: ImageFolder would list it forever
                raise DatasetError(f'{path} is a link to {target}, a folder that holds it: ImageFolder would list '
                                   f'its images again and again; remove the link')


def image_header_error(path: str) -> Optional[str]:
    try:
        # opening reads and identifies the header; the pixels are decoded later, by the data loader
        with Image.open(path):
            pass
    except Exception as e:  # noqa: BLE001, Pillow raises many types for bad files
        return str(e) or type(e).__name__
    return None


def load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader, whose error names the file: the header check before training cannot see a file that is
    cut short after its header, which only decoding finds.

    Raises:
        DatasetError: The image cannot be decoded.
    """
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except Exception as e:  # noqa: BLE001, Pillow raises many types for bad files
        raise DatasetError(f'unreadable image {path} ({str(e) or type(e).__name__}); delete or replace it and '
                           f'rerun') from e


def fixed_order(num_images: int) -> list[int]:
    """The fixed seed-0 permutation of ``num_images`` indices, whatever the run's seed: the training subsets, the dev
    split, the validation subsets and the shipped checkpoints' check images are all taken from it, so that runs with
    different seeds, and the tools, see the same images."""
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(0)).tolist()


def smallest_class(split_dir: Path) -> tuple[str, int]:
    """The class folder of an ImageFolder split with the fewest images (the first by name of a tie), and how many it
    holds: the most images per class that a class-balanced subset of the split can take."""
    folder = datasets.ImageFolder(os.fspath(split_dir))
    sizes = collections.Counter(folder.targets)
    smallest = min(range(len(folder.classes)), key=lambda c: (sizes[c], c))
    return folder.classes[smallest], sizes[smallest]


def per_class_subset(order: Sequence[int], targets: Sequence[int], per_class: int, class_names: Sequence[str]
                     ) -> list[int]:
    """A class-balanced subset: the first ``per_class`` indices of each class in ``order``, kept in ``order``.

    Raises:
        DatasetError: A class has fewer than ``per_class`` images in ``order``, named by its ``class_names`` entry.
    """
    # the images of order only: those held out before (a dev split) cannot be taken
    sizes = collections.Counter(targets[index] for index in order)
    smallest = min(range(len(class_names)), key=lambda c: (sizes[c], c))
    if sizes[smallest] < per_class:
        raise DatasetError(f'{per_class} images per class asked for, but class {class_names[smallest]} has only '
                           f'{sizes[smallest]}; ask for at most {sizes[smallest]}.')
    taken = collections.Counter()
    subset = []
    for index in order:
        if taken[targets[index]] < per_class:
            taken[targets[index]] += 1
            subset.append(index)
    return subset


def eval_shard(num_images: int, rank: int, world_size: int) -> range:
    """The evaluation images of process `rank`: every `world_size`-th, so that each is counted exactly once."""
    return range(rank, num_images, world_size)


def with_transform(folder: datasets.ImageFolder, transform: Callable) -> datasets.ImageFolder:
    """A view of `folder` (same file list) with its own transform."""
    view = copy.copy(folder)
    view.transform = transform
    return view


def decode_images(dataset: datasets.ImageFolder, indices: Optional[list[int]], workers: int, device: torch.device,
                  verbose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode (a subset of) an ImageFolder into a uint8 [N, 3, H, W] tensor and its int64 targets."""
    # uint8 tensors; a transform that already gives them (eval_transform without mean and std) passes them through
    dataset = with_transform(dataset, transforms.Compose([dataset.transform, MaybePILToTensor()]))
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=workers)
    start = time.time()
    images, targets = [], []
    for batch_images, batch_targets in loader:
        images.append(batch_images.to(device))
        targets.append(batch_targets.to(device))
    images, targets = torch.cat(images), torch.cat(targets)
    if verbose:
        print(f'=> decoded {len(images)} images into memory ({images.numel() / 2 ** 20:.0f} MiB on {device}) '
              f'in {time.time() - start:.1f}s', flush=True)
    return images, targets


def shuffled_order(num: int, seed: int, epoch: int) -> torch.Tensor:
    """An epoch's order of ``num`` training samples: a permutation seeded by (seed, epoch), alike on every process."""
    return torch.randperm(num, generator=torch.Generator().manual_seed(seed + epoch))


class InMemoryLoader:
    """Batches of a uint8 image tensor, normalised on `device`; this process's shard when distributed.

    Training shards are shuffled with a generator seeded by (seed, epoch), identical on every process, and truncated to
    equal length so that all processes run the same number of steps. Evaluation shards are `eval_shard`'s.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int, shuffle: bool,
                 mean: Sequence[float], std: Sequence[float], rank: int, world_size: int, device: torch.device,
                 seed: int = 0, crop_flip_size: Optional[int] = None):
        self.images, self.targets = images, targets
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.crop_flip_size = crop_flip_size
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.epoch = 0
        num_images = len(images)
        self.num_samples = num_images // world_size if shuffle else len(eval_shard(num_images, rank, world_size))
        self.sampler = self  # the training loop calls loader.sampler.set_epoch, as for a DistributedSampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.shuffle:
            order = shuffled_order(len(self.images), self.seed, self.epoch)
            indices = order[self.rank::self.world_size][:self.num_samples]
        else:
            indices = torch.tensor(eval_shard(len(self.images), self.rank, self.world_size), dtype=torch.long)
        indices = indices.to(self.images.device)
        for start in range(0, self.num_samples, self.batch_size):
            batch = indices[start:start + self.batch_size]
            images = self.images[batch].to(self.device, non_blocking=True)
            # the same arithmetic as ToTensor + Normalize, so both data paths give identical inputs
            images = images.float().div_(255).sub_(self.mean).div_(self.std)
            if self.crop_flip_size:
                images = random_resized_crop_flip(images, self.crop_flip_size)
            yield images, self.targets[batch].to(self.device, non_blocking=True)


def random_resized_crop_flip(images: torch.Tensor, size: int, scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop(size) + RandomHorizontalFlip with an independent crop per image, as one batched op.

    Crops whose side would exceed the image are clipped to it, instead of torchvision's ten retries.
    """
    n = images.shape[0]
    area = torch.empty(n).uniform_(*scale)
    aspect = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    width = (area * aspect).sqrt().clamp(max=1.0)  # as fractions of the image side
    height = (area / aspect).sqrt().clamp(max=1.0)
    flip = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * flip
    theta[:, 1, 1] = height
    theta[:, 0, 2] = (torch.rand(n) * 2 - 1) * (1 - width)  # crop centre, in [-1, 1] coordinates
    theta[:, 1, 2] = (torch.rand(n) * 2 - 1) * (1 - height)
    # drawn on the CPU, so that a seed gives the same crops on any device; copied without making the host wait
    theta = theta.pin_memory() if images.is_cuda else theta
    grid = F.affine_grid(theta.to(images.device, non_blocking=True), [n, images.shape[1], size, size],
                         align_corners=False)
    return F.grid_sample(images, grid, mode='bilinear', padding_mode='border', align_corners=False)
