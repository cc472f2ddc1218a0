"""Exports of trained models: ``model.safetensors`` + timm ``config.json``, written in one place.

``train/main.py`` writes one at the end of training and ``sgdrop-zoo publish`` from a ``*.pth.tar`` checkpoint (both
with ``save_recipe_export``), ``sgdrop-zoo finetune`` after fine-tuning, all with ``save_export``, so they cannot
drift. ``config.json`` is timm's (``save_for_hf``): its preprocessing fields are the training's validation transform,
so ``timm.data.resolve_model_data_config(model)`` + ``create_transform(**cfg)`` evaluate the model as training did;
the SGDrop settings are kept in ``"sgdrop"`` and the training run in ``"training"``, both ignored by timm.
"""
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch.nn as nn
from timm.models import save_for_hf

from .data import CENTER_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from .sgdrop import add_sgdrop

__all__ = ['regularizer_settings', 'save_export', 'save_recipe_export']


def regularizer_settings(args: Mapping[str, Any]) -> Dict[str, Any]:
    """The SGDrop constructor arguments of the recipe's ``--regularizer``; the paper's baselines use rho = 0.

    Args:
        args: The recipe's arguments (``vars(args)``, or the ``args`` saved in its checkpoints).
    """
    if args.get('regularizer', 'sgdrop') == 'sgdrop':
        return dict(sgdrop_rho=args['sgdrop_rho'], sgdrop_attribution=args['sgdrop_attribution'],
                    sgdrop_ema_decay=args['sgdrop_ema_decay'], latent_drop_rate=0.0)
    # Online attribution keeps no EMA copy of the weights, which a run without SGDrop never reads.
    return dict(sgdrop_rho=0.0, sgdrop_attribution='online', sgdrop_ema_decay=args['sgdrop_ema_decay'],
                # dropout_p: the setting's name in checkpoints of older versions of the recipe
                latent_drop_rate=args.get('latent_drop_rate', args.get('dropout_p')) if args['regularizer'] == 'dropout'
                else 0.0)


def save_export(model: nn.Module, folder: Path, class_names: List[str], image_size: int, train_transform: str,
                regularizer: str, training: Dict[str, Any], rho_end: Optional[float] = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` of a trained SGDrop model into ``folder``, both at once.

    Args:
        model: The trained SGDrop model, on the CPU; ``config.json`` records its ``sgdrop_config``.
        folder: An existing folder; files of the same names are replaced atomically.
        class_names: The dataset's classes, in label order.
        image_size: The square input side it was trained and validated at.
        train_transform: 'resize' (images only resized, the paper's low-data protocol) or 'crop-flip'.
        regularizer: 'sgdrop', or the paper's baseline it was trained as ('none', 'dropout').
        training: What trained it (epochs, data, optimizer, ...), informative only.
        rho_end: The end of a rho curriculum, if one was used.
    """
    resize_only = train_transform == 'resize'
    data_config = {
        'input_size': (3, image_size, image_size),
        # torchvision's Resize, which the recipe's and finetune's transforms use, is bilinear
        'interpolation': 'bilinear',
        'crop_pct': 1.0 if resize_only else CENTER_CROP_PCT,
        'crop_mode': 'squash' if resize_only else 'center',
        'mean': tuple(model.pretrained_cfg.get('mean', IMAGENET_MEAN)),
        'std': tuple(model.pretrained_cfg.get('std', IMAGENET_STD)),
    }
    model_config = {
        'label_names': list(class_names),
        # config.json's schema names the settings without their constructor prefix (rho, attribution, ema_decay)
        'sgdrop': {
            'regularizer': regularizer,
            **{key.removeprefix('sgdrop_'): value for key, value in model.sgdrop_config.items()},
            'rho_end': rho_end,
        },
        'training': dict(training, image_size=image_size, train_transform=train_transform),
    }
    with tempfile.TemporaryDirectory(dir=folder, prefix='.export.', suffix='.tmp') as tmp:
        save_for_hf(model, tmp, model_config=model_config, data_config=data_config, safe_serialization=True)
        for name in ('model.safetensors', 'config.json'):
            (Path(tmp) / name).chmod(0o644)  # safetensors writes the weights private
            os.replace(Path(tmp) / name, Path(folder) / name)


def save_recipe_export(model: nn.Module, folder: Path, args: Mapping[str, Any], class_names: List[str], epoch: int,
                       val_acc1: Optional[float]) -> None:
    """``save_export`` of a model trained by ``train/main.py``, with the SGDrop settings of its arguments.

    Args:
        model: The trained model (SGDrop or plain timm), on the CPU; it is given the arguments' SGDrop settings.
        folder: An existing folder.
        args: The recipe's arguments (``vars(args)``, or the ``args`` saved in its checkpoints).
        class_names: The dataset's classes, in label order.
        epoch: The number of epochs the weights were trained for.
        val_acc1: Their validation top-1 (%), or None when it is not known.
    """
    add_sgdrop(model, **regularizer_settings(args))
    regularizer = args.get('regularizer', 'sgdrop')
    # informative only: a checkpoint written by another version of the recipe may lack some of them
    training = {'epoch': epoch, 'val_acc1': val_acc1, 'data': str(args.get('data')),
                **{key: args.get(key) for key in ('optimizer', 'lr', 'epochs')}}
    save_export(model, folder, class_names, args['image_size'], args['train_transform'], regularizer, training,
                rho_end=args.get('sgdrop_rho_end') if regularizer == 'sgdrop' else None)
