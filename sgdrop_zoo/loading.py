"""Loading models and data for fine-tuning and saliency: model ids, recipe checkpoints, encoder/head split, splits.

``finetune`` and ``saliency`` both read models and ImageFolder splits the same way; the helpers live here so neither
depends on the other.
"""
import os
from pathlib import Path
from typing import Optional

import timm
import torch
import torch.nn as nn
import torchvision.datasets as datasets
from timm.data import resolve_model_data_config

from .checkpoint import RecipeCheckpoint
from .data import (
    DatasetError,
    InMemoryLoader,
    decode_images,
    eval_transform,
    fixed_order,
    load_rgb,
    per_class_subset,
    stored_train_resize,
    with_transform,
)
from .export import read_config
from .hub_files import CONFIG_NAME, WEIGHTS_NAME, hub_download
from .pretrained import check_shipped_folder, retired_tag

__all__ = [
    'check_input_channels', 'check_label_names', 'in_memory_loader', 'input_size', 'load_model', 'load_split',
    'split_encoder_head',
]


def load_model(name_or_path: str) -> nn.Module:
    """Build a model from a zoo name, a ``hf-hub:`` / ``local-dir:`` id, or a file written by the recipe.

    Args:
        name_or_path: ``sgdrop_vgg16`` (random init), ``sgdrop_vgg16.TAG`` (zoo weights), ``hf-hub:ORG/NAME``,
            ``local-dir:PATH``, a folder holding ``model.safetensors`` + ``config.json``, such a
            ``model.safetensors`` file, or a ``*.pth.tar`` checkpoint of ``train/main.py``.

    Returns:
        The model, with ``pretrained_cfg['label_names']`` set when the source records them.
    """
    # the SGDrop settings a checkpoint was trained with do not matter here: fine-tuning sets its own
    if name_or_path.startswith('hf-hub:'):
        repo_id, _, revision = name_or_path.removeprefix('hf-hub:').partition('@')
        # fetched before timm asks for them: one-line errors, a checked config, and safetensors weights for timm to
        # find, so that it never falls back to a pickle
        read_config(hub_download(repo_id, CONFIG_NAME, revision or None, name=name_or_path))
        hub_download(repo_id, WEIGHTS_NAME, revision or None, name=name_or_path, repo_exists=True)
        return _create_model(name_or_path, pretrained=True)
    path = Path(name_or_path.removeprefix('local-dir:'))
    if path.is_file() and path.suffix == '.safetensors':
        path = path.parent
    if path.is_dir() or name_or_path.startswith('local-dir:'):
        # a folder's weights are its model.safetensors, never a pickle beside it
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise ValueError(f'{path}: expected {WEIGHTS_NAME} and {CONFIG_NAME} (the export of train/main.py or '
                             f'sgdrop-zoo finetune), or pass a model_best.pth.tar.')
        read_config(path / CONFIG_NAME)
        check_shipped_folder(path)
        return _create_model(f'local-dir:{path}', pretrained=True)
    if path.is_file():
        return _load_recipe_checkpoint(path)
    if timm.is_model(name_or_path) or timm.is_model(name_or_path.split('.')[0]):
        return _create_model(name_or_path, pretrained='.' in name_or_path)
    raise ValueError(f'{name_or_path!r} is neither a file, a folder nor a timm model name; `sgdrop-zoo models` lists '
                     f'the zoo, and hf-hub:ORG/NAME or local-dir:PATH load published checkpoints.')


def _create_model(name: str, pretrained: bool) -> nn.Module:
    """``timm.create_model``, its errors for a bad tag, folder or Hub id turned into one line saying what exists."""
    try:
        return timm.create_model(name, pretrained=pretrained)
    except (RuntimeError, OSError) as e:  # timm: no such tag / no weights; a missing folder; a failed download
        architecture = name.split('.')[0]
        tags = timm.list_pretrained(f'{architecture}.*') if timm.is_model(architecture) else []
        hint = f' Its pretrained tags: {", ".join(tags)}.' if tags else ''
        reason = retired_tag(name) or (str(e).splitlines()[0].rstrip('.') if str(e) else type(e).__name__)
        raise ValueError(f'cannot load {name}: {reason}.{hint}') from e


def _load_recipe_checkpoint(path: Path) -> nn.Module:
    checkpoint = RecipeCheckpoint.read(path)
    model = checkpoint.build_model(path)
    model.pretrained_cfg = dict(model.pretrained_cfg, label_names=list(checkpoint.class_names))
    return model


def input_size(model: nn.Module) -> int:
    return model.pretrained_cfg['input_size'][-1]


def split_encoder_head(model: nn.Module, image_size: Optional[int] = None) -> tuple[list[nn.Module], set[str]]:
    """The modules ``forward_features`` calls (encoder) and the names of the parameters ``forward_head`` uses.

    Found by running both on one blank image with forward hooks, so it holds for any timm classifier whatever its
    attribute names (VGG's ``pre_logits`` MLP is part of the head, ResNet's head is ``fc`` alone).

    Returns:
        Encoder modules in call order, and the head's parameter names.
    """
    for name in ('forward_features', 'forward_head'):
        if not hasattr(model, name):
            raise TypeError(f'{type(model).__name__} has no {name}: fine-tuning and saliency need a timm classifier '
                            f'split into forward_features (encoder) and forward_head (classifier).')
    called: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda module, inputs, output: called.append(module)) for m in model.modules()]
    size = image_size or input_size(model)
    device = next(model.parameters()).device
    # the blank image must fit the stem, which may not take RGB: check_input_channels reports that case
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    in_chans = first_conv.in_channels if first_conv is not None else 3
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            features = model.forward_features(torch.zeros(1, in_chans, size, size, device=device))
            encoder = list(dict.fromkeys(called))
            called.clear()
            model.forward_head(features)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    head_modules = set(called)
    head_params = {f'{module_name}.{param_name}' if module_name else param_name
                   for module_name, module in model.named_modules() if module in head_modules
                   for param_name, _ in module.named_parameters(recurse=False)}
    return encoder, head_params


def check_input_channels(model: nn.Module, encoder: list[nn.Module]) -> None:
    """Images are decoded as RGB; stop with a clear line when the model's first convolution expects otherwise."""
    first_conv = next((m for m in encoder if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != 3:
        raise DatasetError(f'the model takes {first_conv.in_channels}-channel images, but the images are read as RGB '
                           f'(3 channels); use a model built with in_chans=3.')


def load_split(root: Path, split: str, class_names: list[str], size: int, train: bool, train_transform: str,
               workers: int = 2, per_class: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one split (or ``per_class`` images of each class of it) into uint8 images and targets, after the
    recipe's deterministic resize.

    The subset is the recipe's ``--train-subset-per-class``: the first images of each class in a permutation of the
    split that does not depend on any seed.
    """
    resize = stored_train_resize(size, train_transform) if train else eval_transform(size, train_transform)
    folder = datasets.ImageFolder(os.fspath(root / split), loader=load_rgb)
    if folder.classes != class_names:
        raise DatasetError(f'{root / split} has classes {folder.classes}, expected {class_names}.')
    indices = None
    if per_class:
        indices = sorted(per_class_subset(fixed_order(len(folder)), folder.targets, per_class, folder.classes))
    return decode_images(with_transform(folder, resize), indices, workers=workers, device=torch.device('cpu'),
                         verbose=False)


def in_memory_loader(images: torch.Tensor, targets: torch.Tensor, model: nn.Module, batch_size: int, shuffle: bool,
                     device: torch.device, seed: int = 0, crop_flip_size: Optional[int] = None) -> InMemoryLoader:
    """Batches of decoded images on ``device``, normalised with ``model``'s mean and std (timm's data config)."""
    data_config = resolve_model_data_config(model)
    return InMemoryLoader(images.to(device), targets.to(device), batch_size, shuffle=shuffle, mean=data_config['mean'],
                          std=data_config['std'], rank=0, world_size=1, device=device, seed=seed,
                          crop_flip_size=crop_flip_size)


def _short(names: list[str], limit: int = 10) -> str:
    names = list(names)
    return str(names[:limit])[:-1] + (', ...]' if len(names) > limit else ']')


def check_label_names(model: nn.Module, class_names: list[str], source: str) -> None:
    """Evaluating a model as it is needs the dataset's classes to be the ones its head was trained on."""
    label_names = model.pretrained_cfg.get('label_names')
    if label_names is not None and list(label_names) != class_names:
        raise DatasetError(f'{source} was trained on classes {_short(label_names)} but the dataset has '
                           f'{_short(class_names)}; fine-tune it first (sgdrop-zoo finetune, which '
                           f'gives it a new head), or evaluate on data with the same classes.')
    if model.num_classes != len(class_names):
        raise DatasetError(f'{source} has {model.num_classes} outputs but the dataset has {len(class_names)} classes; '
                           f'fine-tune it first (sgdrop-zoo finetune gives it a new head).')
