"""SGDrop training task for timm's ``timm.task`` API

timm's ``ClassificationTask`` calls ``model(input)``, so an SGDrop model would train as its base architecture (and
warn once). ``SGDropClassificationTask`` passes the labels, ``model(input, target=target)``, and advances the model's
attribution EMA in ``update_ema()``, which a ``timm.task`` training loop calls after each optimizer step.

``sgdrop_zoo.SGDropClassificationTask`` (every timm release this package supports has ``timm.task``).
"""
from typing import Any, Optional

import torch
from timm.task import ClassificationTask
from timm.utils import unwrap_model

from .sgdrop import is_sgdrop_model

__all__ = ['SGDropClassificationTask']


class SGDropClassificationTask(ClassificationTask):
    """``timm.task.ClassificationTask`` for SGDrop models.

    The loop is timm's: ``result = task(input, target)``, ``result['loss'].backward()``, ``optimizer.step()``, then
    ``task.update_ema()`` after every optimizer step, whether or not ``setup_ema()`` was called: SGDrop's EMA
    attribution network depends on it. Targets are class indices; soft (mixup / cutmix) targets are rejected by the
    model, because SGDrop needs the true class of each image.

    Args:
        model: An SGDrop model (``sgdrop_*`` from the registry, or any model after ``add_sgdrop``).
        **kwargs: ``ClassificationTask`` arguments (criterion, criterion_kwargs, device, dtype, verbose).
    """

    def __init__(self, model: torch.nn.Module, **kwargs: Any):
        if not is_sgdrop_model(model):
            raise TypeError(
                f'{type(unwrap_model(model)).__name__} does not train with SGDrop: create an sgdrop_* model or call '
                f'sgdrop_zoo.add_sgdrop(model) first, or use timm.task.ClassificationTask for a plain model.')
        super().__init__(model, **kwargs)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Masked-feature logits and their loss: ``{'loss': ..., 'output': ...}``."""
        output = self.trainable_module(input, target=target)
        loss = self.criterion(output, target)
        return {'loss': loss, 'output': output}

    def update_ema(self, step: Optional[int] = None) -> None:
        """Advance SGDrop's attribution EMA, then the task's evaluation EMA if ``setup_ema()`` created one."""
        unwrap_model(self.get_trainable_module()).update_ema()
        super().update_ema(step)
