"""Fine-tune a zoo model on a new ImageFolder dataset: a linear probe on the frozen encoder, or full fine-tuning.

The encoder is what ``forward_features`` runs (the paper's f, whose output z SGDrop masks); the classifier is what
``forward_head`` runs (g). ``linear-probe`` is the paper's transfer protocol (section 4.4): the encoder trained on one
dataset stays frozen, parameters and batch-norm statistics included, and only the classifier, resized to the new
classes, is trained. ``full`` trains everything, with SGDrop when ``sgdrop_rho > 0``. A linear probe on resized images
without SGDrop runs the encoder once per image, not once per epoch: its features are fixed, so they are computed once
and the classifier trains on them (held in memory: the latent map of every image, larger than the decoded images for
a wide encoder).

    finetune('sgdrop_vgg_tiny', 'data/eurosat', 'runs/probe', mode='linear-probe')   # what `sgdrop-zoo finetune` runs

The output folder gets the best weights as ``model.safetensors`` + timm ``config.json`` (with the new label names and
the SGDrop settings, ready for ``sgdrop-zoo publish``), ``metrics.json`` and ``log.jsonl`` (one line per epoch).
"""
import copy
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .data import MAX_IMAGE_SIZE, InMemoryLoader, check_image_folders, shuffled_order, smallest_class
from .errors import OptionError
from .export import save_export
from .loading import (
    check_input_channels,
    check_label_names,
    in_memory_loader,
    input_size,
    load_model,
    load_split,
    split_encoder_head,
)
from .hub_files import CONFIG_NAME, WEIGHTS_NAME
from .run_files import LOG_NAME, append_log, check_output_folder, check_output_is_not_source, hold_folder
from .sgdrop import SGDropCfg, add_sgdrop, is_sgdrop_model

__all__ = ['MODES', 'TRAIN_TRANSFORMS', 'evaluate', 'finetune']

MODES = ('linear-probe', 'full')
TRAIN_TRANSFORMS = ('resize', 'crop-flip')
# Adam, as in the paper's low-data runs; a new linear head on frozen features learns faster at a larger rate
DEFAULT_LR = {'linear-probe': 1e-3, 'full': 1e-4}
# what a fine-tuning writes into its output folder (an evaluation writes metrics.json only)
OUTPUT_FILES = (WEIGHTS_NAME, CONFIG_NAME, 'metrics.json', LOG_NAME)


class FeatureLoader:
    """Batches of features computed beforehand and their targets, shuffled per epoch as ``InMemoryLoader`` shuffles
    its images (by ``shuffled_order``)."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0):
        self.features, self.targets = features, targets
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        num = len(self.targets)
        order = shuffled_order(num, self.seed, self.epoch) if self.shuffle else torch.arange(num)
        order = order.to(self.features.device)
        for start in range(0, num, self.batch_size):
            batch = order[start:start + self.batch_size]
            yield self.features[batch], self.targets[batch]


class Classifier(nn.Module):
    """The classifier of ``model`` alone, run on its encoder's features (``forward_head``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        # target is taken, and unused, so that the training loop calls this as it calls an SGDrop model
        return self.model.forward_head(features)


@torch.no_grad()
def encode(model: nn.Module, loader: InMemoryLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode encoder's features (``forward_features``) of every image of an unshuffled loader, in order."""
    model.eval()
    batches = [(model.forward_features(images), target) for images, target in loader]
    return torch.cat([features for features, _ in batches]), torch.cat([target for _, target in batches])


@torch.no_grad()
def evaluate(model: nn.Module, loader: Union[InMemoryLoader, FeatureLoader]) -> dict[str, float]:
    """Loss and top-1 accuracy (%) of the eval-mode model (or ``Classifier``, on a ``FeatureLoader``)."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, target in loader:
        output = model(inputs)
        loss_sum += F.cross_entropy(output, target, reduction='sum').item()
        correct += (output.argmax(1) == target).sum().item()
        count += target.numel()
    return {'loss': loss_sum / count, 'acc1': 100.0 * correct / count, 'count': count}


def _train_mode(model: nn.Module, mode: str, encoder: list[nn.Module]) -> None:
    model.train()
    if mode == 'linear-probe':
        # a frozen encoder must not update its batch-norm statistics either
        for module in encoder:
            module.eval()


def finetune(
        model_name: str,
        data: Union[str, Path],
        output: Union[str, Path],
        mode: str = 'linear-probe',
        epochs: int = 10,
        lr: Optional[float] = None,
        batch_size: int = 64,
        image_size: Optional[int] = None,
        sgdrop_rho: float = 0.0,
        train_transform: str = 'resize',
        evaluate_only: bool = False,
        seed: int = 0,
        workers: int = 2,
        progress: bool = True,
        train_subset_per_class: int = 0,
        val_subset_per_class: int = 0,
        overwrite: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``model_name`` on ``data`` (``train/`` and ``val/`` ImageFolders) and export the best epoch.

    Args:
        model_name: Anything ``load_model`` accepts.
        data: Dataset root holding ``train/<class>/*`` and ``val/<class>/*``.
        output: Folder for ``model.safetensors``, ``config.json``, ``metrics.json`` and ``log.jsonl``.
        mode: 'linear-probe' (frozen encoder, new classifier) or 'full' (everything trains).
        epochs: Training epochs.
        lr: Adam learning rate; default 1e-3 for a linear probe, 1e-4 for full fine-tuning.
        batch_size: Images per step.
        image_size: Square input side; default: the model's.
        sgdrop_rho: Share of latent features SGDrop drops per image while training (0: plain fine-tuning).
        train_transform: 'resize' (the paper's low-data protocol) or 'crop-flip' (the recipe's default).
        evaluate_only: Only measure the model as it is on ``val/``; its classes must be the dataset's.
        seed: Seed of the new head, the shuffling and the crops.
        workers: Image decoding threads.
        progress: Show a progress bar.
        train_subset_per_class: Train on a fixed, class-balanced subset of this many images per class (0: all).
        val_subset_per_class: Validate on a fixed, class-balanced subset of this many images per class (0: all).
        overwrite: Replace the files of an earlier run in ``output`` instead of refusing to start.

    Returns:
        The metrics written to ``metrics.json``.
    """
    if mode not in MODES:
        raise OptionError('{mode} must be one of {modes}, got {value!r}.', modes=', '.join(MODES), value=mode)
    if train_transform not in TRAIN_TRANSFORMS:
        raise OptionError('{train_transform} must be one of {transforms}, got {value!r}.',
                          transforms=', '.join(TRAIN_TRANSFORMS), value=train_transform)
    if epochs < 1:
        raise OptionError('{epochs} must be at least 1, got {value}.', value=epochs)
    if batch_size < 1:
        raise OptionError('{batch_size} must be at least 1, got {value}.', value=batch_size)
    if image_size is not None and not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise OptionError("{image_size} must be from 1 to {most} px, or unset for the model's, got {value}.",
                          most=MAX_IMAGE_SIZE, value=image_size)
    if lr is not None and not lr > 0:
        raise OptionError('{lr} must be positive, e.g. {default} for {mode_name}, got {value}.',
                          default=DEFAULT_LR[mode], mode_name=mode, value=lr)
    for name, value in (('train_subset_per_class', train_subset_per_class),
                        ('val_subset_per_class', val_subset_per_class)):
        if value < 0:
            raise OptionError('{' + name + '} must be 0 (all images) or a number of images per class, got {value}.',
                              value=value)
    if workers < 0:
        raise OptionError('{workers} must be 0 or more, got {value}.', value=workers)
    SGDropCfg(sgdrop_rho=sgdrop_rho)  # checked before any work
    data, output = Path(data), Path(output)
    check_output_is_not_source(model_name, output)
    check_output_folder(output, ('metrics.json',) if evaluate_only else OUTPUT_FILES, overwrite)
    class_names = check_image_folders(data, workers)
    for split, per_class, parameter in (('train', train_subset_per_class, 'train_subset_per_class'),
                                        ('val', val_subset_per_class, 'val_subset_per_class')):
        if not per_class:  # the whole split: no folder listing to read
            continue
        name, count = smallest_class(data / split)
        if per_class > count:
            raise OptionError('{' + parameter + '} {value}: class {name} of {folder} holds only {count} images; pass '
                              'at most {count}, or 0 for all.', value=per_class, name=name, folder=data / split,
                              count=count)
    torch.manual_seed(seed)
    model = load_model(model_name)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model.to(device)
    size = image_size or input_size(model)
    encoder, _ = split_encoder_head(model, size)
    check_input_channels(model, encoder)
    val_images = load_split(data, 'val', class_names, size, False, train_transform, workers, val_subset_per_class)
    val_loader = in_memory_loader(*val_images, model, batch_size, False, device)
    with hold_folder(output):
        # again, now that no other fine-tune can write there: one may have finished into the folder since
        check_output_folder(output, ('metrics.json',) if evaluate_only else OUTPUT_FILES, overwrite)
        if evaluate_only:
            check_label_names(model, class_names, model_name)
            metrics = dict(model=model_name, data=str(data), evaluate=True, val=evaluate(model, val_loader))
            (output / 'metrics.json').write_text(json.dumps(metrics, indent=2) + '\n')
            return metrics

        # a new head for the new classes; timm re-initialises the last layer, SGDrop restarts its EMA
        model.reset_classifier(len(class_names))
        model.to(device)
        if not is_sgdrop_model(model):
            add_sgdrop(model)
        # the only regularizer here is SGDrop at sgdrop_rho, with the model's other settings; without it, no EMA copy
        # is needed for attribution
        regularizer = 'sgdrop' if sgdrop_rho > 0 else 'none'
        model.sgdrop_cfg = dataclasses.replace(model.sgdrop_cfg, sgdrop_rho=sgdrop_rho).of_regularizer(regularizer)
        encoder, head_params = split_encoder_head(model, size)
        for name, param in model.named_parameters():
            param.requires_grad_(mode == 'full' or name in head_params)
        train_images = load_split(data, 'train', class_names, size, True, train_transform, workers,
                                  train_subset_per_class)
        net: nn.Module = model
        train_loader: Union[InMemoryLoader, FeatureLoader]
        if mode == 'linear-probe' and train_transform == 'resize' and sgdrop_rho == 0:
            # a frozen eval-mode encoder gives fixed inputs the same features every epoch: they are computed once, and
            # only the classifier runs per step (with SGDrop the mask needs the images for its attribution)
            train_features = encode(model, in_memory_loader(*train_images, model, batch_size, False, device))
            train_loader = FeatureLoader(*train_features, batch_size, shuffle=True, seed=seed)
            val_loader = FeatureLoader(*encode(model, val_loader), batch_size, shuffle=False)
            net = Classifier(model)
        else:
            train_loader = in_memory_loader(*train_images, model, batch_size, True, device, seed=seed,
                                            crop_flip_size=size if train_transform == 'crop-flip' else None)
        lr = lr if lr is not None else DEFAULT_LR[mode]
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)

        log_path = output / LOG_NAME
        log_path.unlink(missing_ok=True)  # an earlier run's, which the caller asked to replace (overwrite)
        best: dict[str, Any] = {}
        for epoch in range(epochs):
            train_loader.set_epoch(epoch)
            _train_mode(model, mode, encoder)
            start, loss_sum, correct, count = time.time(), 0.0, 0, 0
            bar = tqdm(train_loader, desc=f'epoch {epoch + 1}/{epochs}', leave=False, disable=not progress)
            for inputs, target in bar:
                output_logits = net(inputs, target=target)
                loss = F.cross_entropy(output_logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                model.update_ema()
                loss_sum += loss.item() * target.numel()
                correct += (output_logits.argmax(1) == target).sum().item()
                count += target.numel()
                bar.set_postfix(loss=f'{loss_sum / count:.3f}')
            val_metrics = evaluate(net, val_loader)
            record = dict(epoch=epoch + 1, train_loss=loss_sum / count, train_acc1=100.0 * correct / count,
                          val_loss=val_metrics['loss'], val_acc1=val_metrics['acc1'], val_count=val_metrics['count'],
                          lr=lr, sgdrop_rho=sgdrop_rho, epoch_time_s=time.time() - start)
            append_log(log_path, record)
            if progress:
                print(f'epoch {epoch + 1}/{epochs}: train loss {record["train_loss"]:.4f}, val acc@1 '
                      f'{record["val_acc1"]:.2f}%', flush=True)
            if not best or record['val_acc1'] > best['val_acc1']:
                best = dict(record, state_dict=copy.deepcopy(model.state_dict()))

        model.load_state_dict(best.pop('state_dict'))
        model.cpu()
        save_export(model, output, class_names, size, train_transform, regularizer, model.sgdrop_cfg, dict(
            source=model_name, data=str(data), mode=mode, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
            epoch=best['epoch'], val_acc1=best['val_acc1']))
        metrics = dict(model=model_name, data=str(data), mode=mode, classes=class_names, best_epoch=best['epoch'],
                       val_acc1=best['val_acc1'], val_count=best['val_count'],
                       trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                       total_params=sum(p.numel() for p in model.parameters()))
        (output / 'metrics.json').write_text(json.dumps(metrics, indent=2) + '\n')
        return metrics
