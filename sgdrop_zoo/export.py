"""Exports of trained models: ``model.safetensors`` + timm ``config.json``, written and read in one place.

``train/main.py`` writes one at the end of training and ``sgdrop-zoo publish`` from a ``*.pth.tar`` checkpoint (both
with ``save_recipe_export``), ``sgdrop-zoo finetune`` after fine-tuning, all with ``save_export``, so they cannot
drift. ``config.json`` is timm's (``save_for_hf``): its preprocessing fields are the training's validation transform,
so ``timm.data.resolve_model_data_config(model)`` + ``create_transform(**cfg)`` evaluate the model as training did;
the SGDrop settings are kept in ``"sgdrop"``, by their names (``SGDropCfg.to_dict()``) with the
regularizer and the curriculum's ``sgdrop_rho_end``, and the training run in ``"training"``, both ignored by timm.
``to_published_config`` turns an export into a published repo's config, ``write_config`` writes it and
``read_config`` and ``sgdrop_settings`` read either back.
"""
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError
from timm.data import resolve_model_data_config
from timm.models import save_for_hf

from .data import EVAL_CROP
from .hub_files import CONFIG_NAME, WEIGHTS_NAME
from .pretrained import check_model_args, checkpoint_description
from .run_files import PARTIAL_WRITE_SUFFIX, write_error
from .run_settings import RunSettings
from .sgdrop import MODEL_SGDROP_SETTINGS, SGDropCfg, add_sgdrop

__all__ = [
    'base_architecture', 'measured_split', 'read_config', 'save_export',
    'save_recipe_export', 'sgdrop_settings', 'to_published_config', 'write_config',
]


def save_export(model: nn.Module, folder: Path, class_names: list[str], image_size: int, train_transform: str,
                regularizer: str, sgdrop: SGDropCfg, training: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``config.json`` of a trained SGDrop model into ``folder``, both at once.

    Args:
        model: The trained model, on the CPU.
        folder: An existing folder; files of the same names are replaced atomically.
        class_names: The dataset's classes, in label order.
        image_size: The square input side it was trained and validated at.
        train_transform: 'resize' (images only resized, the paper's low-data protocol) or 'crop-flip'.
        regularizer: 'sgdrop', or the paper's baseline it was trained as ('none', 'dropout').
        sgdrop: The SGDrop settings it was trained with (a rho curriculum included).
        training: What trained it (epochs, data, optimizer, ...), informative only.

    Raises:
        ValueError: A weight is not finite; nothing is written.
        RunFileError: The system refused the write (a full disk); nothing is written.
    """
    nonfinite = next((name for name, tensor in model.state_dict().items()
                      if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if nonfinite is not None:
        raise ValueError(f'{nonfinite} holds NaN or infinite values: the weights diverged in training and are not '
                         f'exported; train again (with a lower learning rate)')
    crop_pct, crop_mode = EVAL_CROP[train_transform]
    data_config = {
        # what data.eval_transform, the validation transform of the recipe, finetune and saliency, is made of
        'input_size': (3, image_size, image_size),
        'interpolation': 'bilinear',
        'crop_pct': crop_pct,
        'crop_mode': crop_mode,
        **{key: resolve_model_data_config(model)[key] for key in ('mean', 'std')},
    }
    sgdrop = {'regularizer': regularizer, **sgdrop.to_dict()}
    dataset = Path(training['data']).name if training.get('data') else 'unnamed data'
    model_config = {
        'label_names': list(class_names),
        'sgdrop': sgdrop,
        'training': dict(training, image_size=image_size, train_transform=train_transform),
        # this checkpoint's own description, not that of the tag the architecture's default cfg names
        'pretrained_cfg': {'description': checkpoint_description(sgdrop, dataset, training.get('val_acc1'),
                                                                 measured_split(training))},
    }
    try:
        with tempfile.TemporaryDirectory(dir=folder, prefix='.export.', suffix=PARTIAL_WRITE_SUFFIX) as tmp:
            save_for_hf(model, tmp, model_config=model_config, data_config=data_config, safe_serialization=True)
            write_config(_without_num_classes_argument(read_config(Path(tmp) / CONFIG_NAME)), Path(tmp))
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                (Path(tmp) / name).chmod(0o644)  # safetensors writes the weights private
                os.replace(Path(tmp) / name, Path(folder) / name)
    except (OSError, SafetensorError) as e:
        raise write_error(Path(folder) / WEIGHTS_NAME, e, 'nothing of the export was written') from e


def _without_num_classes_argument(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` without ``num_classes`` among its ``model_args``: timm records it there and as the config's own
    ``num_classes``, which both timm and transformers' timm wrapper read; transformers would pass it twice."""
    config.get('model_args', {}).pop('num_classes', None)
    return config


def measured_split(training: dict[str, Any]) -> str:
    """The images an export's ``val_acc1`` was measured on: 'dev' (held out of the training folder) or 'val'."""
    return 'dev' if training.get('holdout_per_class') else 'val'


def save_recipe_export(model: nn.Module, folder: Path, settings: RunSettings, class_names: list[str], epoch: int,
                       val_acc1: Optional[float]) -> None:
    """``save_export`` of a model trained by ``train/main.py``, with the SGDrop settings of its run.

    Args:
        model: The trained model (SGDrop or plain timm), on the CPU; it is given the run's SGDrop settings.
        folder: An existing folder.
        settings: The run's settings (those its checkpoints store).
        class_names: The dataset's classes, in label order.
        epoch: The number of epochs the weights were trained for.
        val_acc1: Their validation top-1 (%), or None when it is not known.
    """
    add_sgdrop(model, **settings.sgdrop_cfg.model_args())
    # holdout_per_class: a run validated on a dev split measured val_acc1 on images of the training folder
    training = {'epoch': epoch, 'val_acc1': val_acc1, 'data': settings.data, 'optimizer': settings.optimizer,
                'lr': settings.lr, 'epochs': settings.epochs, 'holdout_per_class': settings.holdout_per_class}
    save_export(model, folder, class_names, settings.image_size, settings.train_transform, settings.regularizer,
                settings.sgdrop_cfg, training)


def write_config(config: dict[str, Any], folder: Path) -> None:
    """Write ``config`` as the ``config.json`` of ``folder`` (readable by all, as a Hub repo's files are)."""
    path = Path(folder) / CONFIG_NAME
    path.write_text(json.dumps(config, indent=2) + '\n', encoding='utf-8')
    path.chmod(0o644)


def read_config(path: Path) -> dict[str, Any]:
    """Read an export's or a published repo's ``config.json``.

    Raises:
        ValueError: The file is no JSON object with timm's ``architecture`` and ``pretrained_cfg``; in one line.
    """
    try:
        config = json.loads(Path(path).read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path}: not valid JSON ({e}).') from e
    if not isinstance(config, dict) or 'architecture' not in config or 'pretrained_cfg' not in config:
        raise ValueError(f'{path}: not a timm config (no architecture / pretrained_cfg).')
    check_model_args(config.get('model_args', {}), path)
    return config


def sgdrop_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The SGDrop settings a config records, by their constructor names, from its ``sgdrop`` section.

    An export of a plain ``sgdrop_*`` model that kept its SGDrop arguments in ``model_args`` gives those.
    """
    settings = dict(config.get('sgdrop') or {})
    model_args = config.get('model_args') or {}
    for key in MODEL_SGDROP_SETTINGS:
        if key in model_args:
            settings.setdefault(key, model_args[key])
    return settings


def base_architecture(name: str) -> str:
    """The plain timm architecture an SGDrop model is, e.g. ``sgdrop_vgg16`` -> ``vgg16``.

    Families without a timm counterpart (``sgdrop_vgg_tiny``, ``sgdrop_cifar_cnn``) keep their own name and need
    ``import sgdrop_zoo`` to load.
    """
    base = name.removeprefix('sgdrop_')
    return base if base != name and timm.is_model(base) else name


def to_published_config(config: dict[str, Any], label_descriptions: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Turn an export's config into a published repo's: base timm architecture, SGDrop settings in ``sgdrop``.

    Args:
        config: What ``read_config`` read from an export (or from a published folder).
        label_descriptions: Human-readable class names by label name, for timm's ``label_descriptions`` field.

    Raises:
        ValueError: The config records no SGDrop settings.
    """
    config = _without_num_classes_argument(json.loads(json.dumps(config)))  # a deep copy
    # a published folder already names its SGDrop architecture; the recipe's export names it as its architecture
    sgdrop_architecture = (config.get('sgdrop') or {}).get('architecture') or config['architecture']
    settings = sgdrop_settings(config)
    if settings.get('sgdrop_rho') is None:
        raise ValueError('config.json records no SGDrop settings (no "sgdrop" section and no sgdrop_rho argument): '
                         'publish the export of a model trained with SGDrop (train/main.py writes them).')
    model_args = config.get('model_args', {})
    for key in MODEL_SGDROP_SETTINGS:
        model_args.pop(key, None)
    config['architecture'] = base_architecture(sgdrop_architecture)
    config['sgdrop'] = dict(settings, architecture=sgdrop_architecture if sgdrop_architecture.startswith('sgdrop_')
                            else config['architecture'])
    config['pretrained_cfg'].pop('tag', None)
    if label_descriptions is not None:
        config['label_descriptions'] = {name: label_descriptions[name] for name in config['label_names']}
    return config
