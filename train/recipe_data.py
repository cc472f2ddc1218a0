"""The data loaders of the training recipe: fixed subsets, sharded validation, ImageFolder or in memory.

The subsets (``--train-subset``, ``--train-subset-per-class``, ``--holdout-per-class``, ``--val-subset``, the images
of ``--log-area-ratio``) are taken from permutations that do not depend on the seed, so that runs with different seeds
train and are measured on the same images. Validation gives each process every ``world_size``-th image, so that each
image is counted exactly once when the metrics are summed over the processes.
"""
import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
import torch.utils.data
import torch.utils.data.distributed
import torchvision.datasets as datasets
import torchvision.transforms as transforms

from sgdrop_zoo.data import (
    DatasetError,
    InMemoryLoader,
    decode_images,
    eval_shard,
    eval_transform,
    fixed_order,
    load_rgb,
    per_class_subset,
    stored_train_resize,
    with_transform,
)

__all__ = [
    'DUMMY_TRAIN_IMAGES', 'DUMMY_VAL_IMAGES', 'RecipeLoaders', 'ShardSampler', 'build_loaders', 'fixed_val_indices',
    'make_loader', 'num_val_images',
]

DUMMY_TRAIN_IMAGES, DUMMY_VAL_IMAGES = 1281167, 50000  # ImageNet's sizes


class RecipeLoaders(NamedTuple):
    """The loaders of a run; each yields (images, targets)."""
    train: Any
    val: Any
    # fixed training images with the validation transform, or None
    train_eval: Optional[Any]
    # the fixed validation images of the area ratio, or None (when off, and on every process but the main one)
    area: Optional[Any]


def build_loaders(data: Path, image_size: int, train_transform: str, mean: Sequence[float], std: Sequence[float],
                  batch_size: int, workers: int, device: torch.device, rank: int = 0, world_size: int = 1,
                  distributed: bool = False, shuffle_seed: int = 0, dummy: bool = False, in_memory: bool = False,
                  train_subset: int = 0, train_subset_per_class: int = 0, holdout_per_class: int = 0,
                  train_eval_samples: int = 0, val_subset: int = 0, area_images: int = 0) -> RecipeLoaders:
    """The loaders of a run: train and val, fixed training images with the val transform, the area ratio's images.

    Loaders yield (images, targets); the in-memory ones yield batches already normalised on `device`.

    Args:
        data: The dataset folder, holding train/<class>/* and val/<class>/*.
        image_size: Square side of the training and validation images.
        train_transform: 'crop-flip' (RandomResizedCrop + flip; val resize + center crop) or 'resize' (train and val
            images only resized to a square).
        mean: Normalisation mean of the model.
        std: Normalisation std of the model.
        batch_size: Batch size of this process.
        workers: Data loading workers of this process.
        device: Where the in-memory loaders normalise their batches.
        rank: This process's rank.
        world_size: Number of processes.
        distributed: Whether the training images are sharded over the processes.
        shuffle_seed: Seed of the training shuffle of the distributed and in-memory loaders.
        dummy: Fake data of ImageNet's sizes instead of `data`.
        in_memory: Decode the images once into uint8 tensors (on `device` when it is a GPU).
        train_subset: Train on the first N images of the fixed order (0: all).
        train_subset_per_class: Train on the first N images of each class in the fixed order (0: off).
        holdout_per_class: Validate on the last N images of each class of the training folder instead of val/ (0: off).
        train_eval_samples: Number of the fixed training images of the train_eval loader (0: none).
        val_subset: Validate on N fixed validation images (0: all).
        area_images: Number of fixed validation images of the area ratio loader (0: none).
    """
    size = image_size
    is_main = rank == 0
    loader = functools.partial(make_loader, batch_size=batch_size, workers=workers, rank=rank, world_size=world_size,
                               distributed=distributed, shuffle_seed=shuffle_seed)
    normalize = transforms.Normalize(mean=mean, std=std)
    if train_transform == 'resize':
        train_resize = [transforms.Resize((size, size))]
    else:
        train_resize = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]

    if dummy:
        if is_main:
            print('=> Dummy data is used!', flush=True)
        train_dataset = datasets.FakeData(DUMMY_TRAIN_IMAGES, (3, size, size), 1000, transforms.ToTensor())
        val_dataset = datasets.FakeData(DUMMY_VAL_IMAGES, (3, size, size), 1000, transforms.ToTensor())
        val_indices, area_indices = fixed_val_indices(len(val_dataset), val_subset, area_images if is_main else 0)
        area_loader = loader(torch.utils.data.Subset(val_dataset, area_indices), False, shard=False) \
            if area_indices else None
        val_loader = loader(torch.utils.data.Subset(val_dataset, val_indices), False)
        return RecipeLoaders(loader(train_dataset, True), val_loader, None, area_loader)

    # scanned once: listing the files of a large dataset takes a while
    train_folder = datasets.ImageFolder(os.path.join(data, 'train'), loader=load_rgb)
    val_folder = datasets.ImageFolder(os.path.join(data, 'val'), loader=load_rgb)
    num_train = len(train_folder)
    # Fixed subsets, independent of the seed, so that runs with different seeds see the same images.
    train_indices = fixed_order(num_train)
    val_pool = range(len(val_folder))
    if holdout_per_class:
        # the dev split: the last images of each class in the fixed order, so that the training subset, taken from
        # its front, is the same as without a holdout whenever both fit in every class
        holdout = set(per_class_subset(train_indices[::-1], train_folder.targets, holdout_per_class,
                                       train_folder.classes))
        train_indices = [index for index in train_indices if index not in holdout]
        val_folder, val_pool = train_folder, sorted(holdout)
    if train_subset:
        if train_subset > len(train_indices):
            raise DatasetError(f'{train_subset} training images asked for, but the training split has only '
                               f'{len(train_indices)}; ask for at most that many, or for all of them with 0')
        train_indices = train_indices[:train_subset]
    elif train_subset_per_class:
        train_indices = per_class_subset(train_indices, train_folder.targets, train_subset_per_class,
                                         train_folder.classes)
    train_eval_indices = train_indices[:train_eval_samples]
    val_positions, area_positions = fixed_val_indices(len(val_pool), val_subset, area_images if is_main else 0)
    val_indices, area_indices = [val_pool[i] for i in val_positions], [val_pool[i] for i in area_positions]

    if not in_memory:
        to_tensor = [transforms.ToTensor(), normalize]
        train_dataset = with_transform(train_folder, transforms.Compose(train_resize + to_tensor))
        if len(train_indices) < num_train:
            train_dataset = torch.utils.data.Subset(train_dataset, sorted(train_indices))
        train_loader = loader(train_dataset, True)
        val_transform = eval_transform(size, train_transform, mean, std)
        val_dataset = with_transform(val_folder, val_transform)
        val_loader = loader(torch.utils.data.Subset(val_dataset, val_indices), False)
        train_eval_loader = None
        if train_eval_indices:
            train_eval_dataset = with_transform(train_folder, val_transform)
            train_eval_loader = loader(torch.utils.data.Subset(train_eval_dataset, train_eval_indices), False)
        area_loader = loader(torch.utils.data.Subset(val_dataset, area_indices), False, shard=False) \
            if area_indices else None
        return RecipeLoaders(train_loader, val_loader, train_eval_loader, area_loader)

    # In memory: decode every image once, after the deterministic part of the transform; the random crop and flip
    # run per batch on `device`.
    store_device = device if device.type == 'cuda' else torch.device('cpu')
    decode = dict(workers=workers, device=store_device, verbose=is_main)
    train_images = decode_images(with_transform(train_folder, stored_train_resize(size, train_transform)),
                                 sorted(train_indices), **decode)
    val_images = decode_images(with_transform(val_folder, eval_transform(size, train_transform)), val_indices,
                               **decode)
    common = dict(mean=mean, std=std, rank=rank, world_size=world_size, device=device)
    train_loader = InMemoryLoader(*train_images, batch_size, shuffle=True, seed=shuffle_seed,
                                  crop_flip_size=size if train_transform == 'crop-flip' else None, **common)
    val_loader = InMemoryLoader(*val_images, batch_size, shuffle=False, **common)
    train_eval_loader = None
    if train_eval_indices:
        train_eval_images = decode_images(with_transform(train_folder, eval_transform(size, train_transform)),
                                          train_eval_indices, **decode)
        train_eval_loader = InMemoryLoader(*train_eval_images, batch_size, shuffle=False, **common)
    area_loader = None
    if area_indices:
        # all N images on the main process alone: no shard
        position = {index: i for i, index in enumerate(val_indices)}
        subset = torch.tensor([position[index] for index in area_indices], device=store_device)
        area_loader = InMemoryLoader(val_images[0][subset], val_images[1][subset], batch_size, shuffle=False,
                                     **{**common, 'rank': 0, 'world_size': 1})
    return RecipeLoaders(train_loader, val_loader, train_eval_loader, area_loader)


def fixed_val_indices(num_val: int, val_subset: int = 0, area_images: int = 0) -> tuple[list[int], list[int]]:
    """The validation images: all, or the first `val_subset` of a permutation independent of the seed, so that runs
    with different seeds are measured on the same images (sorted, in folder order); and the images of the area ratio,
    the first `area_images` of the same permutation (none when 0).
    """
    order = fixed_order(num_val)
    val_indices = sorted(order[:val_subset]) if val_subset else list(range(num_val))
    area_indices = order[:area_images] if area_images else []
    return val_indices, area_indices


def num_val_images(data: Path, class_names: list[str], dummy: bool = False, holdout_per_class: int = 0) -> int:
    """The number of images `build_loaders` validates on without a `val_subset`, without decoding any."""
    if dummy:
        return DUMMY_VAL_IMAGES
    if holdout_per_class:
        return holdout_per_class * len(class_names)
    # the images ImageFolder will list
    class_to_idx = {name: i for i, name in enumerate(class_names)}
    return len(datasets.folder.make_dataset(os.path.join(data, 'val'), class_to_idx, datasets.folder.IMG_EXTENSIONS))


def make_loader(dataset: torch.utils.data.Dataset, train: bool, batch_size: int, workers: int, rank: int = 0,
                world_size: int = 1, distributed: bool = False, shuffle_seed: int = 0, shard: bool = True
                ) -> torch.utils.data.DataLoader:
    """Training: shuffled (one shard per process when `distributed`). Evaluation: in order, this process's shard, or
    all of `dataset` when not `shard`.
    """
    if train:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, seed=shuffle_seed) if distributed else None
    else:
        sampler = ShardSampler(len(dataset), rank, world_size) if shard else None
    # Starting an iteration draws a base seed from the global RNG unless the loader has its own generator; an
    # unsharded loader (the area ratio's) gets one, so measuring leaves the training's random stream as it was.
    generator = None if shard else torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler, num_workers=workers,
        pin_memory=torch.cuda.is_available(), generator=generator)


class ShardSampler(torch.utils.data.Sampler):
    """The indices of `eval_shard`, without the padding of DistributedSampler; the metrics are summed over processes."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = eval_shard(num_samples, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
