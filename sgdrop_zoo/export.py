"""The export of a model trained by the recipe: ``model.safetensors`` + timm ``config.json``, written in one place.

``train/main.py`` writes it at the end of training and ``sgdrop-zoo publish`` writes it from a ``*.pth.tar``
checkpoint, both with ``save_recipe_export``, so the two cannot drift. ``config.json`` is timm's (``save_for_hf``): its
preprocessing fields are the recipe's validation transform, so ``timm.data.resolve_model_data_config(model)`` +
``create_transform(**cfg)`` evaluate the model as the recipe did; the SGDrop settings are kept in ``"sgdrop"`` and the
training run in ``"training"``, both ignored by timm.
"""
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch.nn as nn
from timm.models import save_for_hf

from .data import CENTER_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD

__all__ = ['regularizer_settings', 'save_recipe_export']


def regularizer_settings(args: Mapping[str, Any]) -> Dict[str, Any]:
    """SGDrop constructor settings of the recipe's ``--regularizer``; the paper's baselines use rho = 0.

    Args:
        args: The recipe's arguments (``vars(args)``, or the ``args`` saved in its checkpoints).
    """
    if args.get('regularizer', 'sgdrop') == 'sgdrop':
        return dict(rho=args['sgdrop_rho'], attribution=args['sgdrop_attribution'], ema_decay=args['sgdrop_ema_decay'],
                    latent_drop_rate=0.0)
    # Online attribution keeps no EMA copy of the weights, which a run without SGDrop never reads.
    return dict(rho=0.0, attribution='online', ema_decay=args['sgdrop_ema_decay'],
                latent_drop_rate=args['dropout_p'] if args['regularizer'] == 'dropout' else 0.0)


def save_recipe_export(model: nn.Module, folder: Path, args: Mapping[str, Any], class_names: List[str], epoch: int,
                       val_acc1: Optional[float]) -> None:
    """Write ``model.safetensors`` and ``config.json`` of a recipe-trained model into ``folder``, both at once.

    Args:
        model: The trained model, on the CPU.
        folder: An existing folder; files of the same names are replaced atomically.
        args: The recipe's arguments.
        class_names: The dataset's classes, in label order.
        epoch: The number of epochs the weights were trained for.
        val_acc1: Their validation top-1 (%), or None when it is not known.
    """
    resize_only = args['train_transform'] == 'resize'
    size = args['image_size']
    data_config = {
        'input_size': (3, size, size),
        # torchvision's Resize, which the recipe's transforms use, is bilinear
        'interpolation': 'bilinear',
        'crop_pct': 1.0 if resize_only else CENTER_CROP_PCT,
        'crop_mode': 'squash' if resize_only else 'center',
        'mean': tuple(model.pretrained_cfg.get('mean', IMAGENET_MEAN)),
        'std': tuple(model.pretrained_cfg.get('std', IMAGENET_STD)),
    }
    settings = regularizer_settings(args)
    model_config = {
        'label_names': list(class_names),
        'sgdrop': {
            'regularizer': args.get('regularizer', 'sgdrop'),
            **settings,
            'rho_end': args.get('sgdrop_rho_end') if args.get('regularizer', 'sgdrop') == 'sgdrop' else None,
        },
        # informative only: a checkpoint written by another version of the recipe may lack some of them
        'training': {'epoch': epoch, 'val_acc1': val_acc1, 'data': str(args.get('data')),
                     **{key: args.get(key) for key in ('optimizer', 'lr', 'epochs')},
                     'train_transform': args['train_transform'], 'image_size': size},
    }
    with tempfile.TemporaryDirectory(dir=folder, prefix='.export.', suffix='.tmp') as tmp:
        save_for_hf(model, tmp, model_config=model_config, data_config=data_config, safe_serialization=True)
        for name in ('model.safetensors', 'config.json'):
            (Path(tmp) / name).chmod(0o644)  # safetensors writes the weights private
            os.replace(Path(tmp) / name, Path(folder) / name)
