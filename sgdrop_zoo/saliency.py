"""Where a model looks: attribution area ratio, neuron coverage and Grad-CAM pictures (paper sections 4.1, 4.2).

- Attribution area ratio: the Grad-CAM map of the true class at the encoder's output z (the last convolutional feature
  map, the one SGDrop masks) is upsampled to the image (bilinear), divided by its maximum, and the share of its pixels
  above 0.5 is taken. Overfocused models light up a few pixels; the paper reports 0.01 (vanilla VGG16) vs 0.14 (SGDrop).
- Neuron coverage: the share of activations > 0, over the outputs of every ``nn.ReLU`` module of the network
  (``global``), and over z alone (``last_conv``).

Grad-CAM comes from pytorch-grad-cam (``grad-cam`` on PyPI): its hooks and channel weighting are used as they are; the
map is then normalised by its maximum as the paper defines, not by the library's min-max scaling, which would shrink
the area of maps that are positive everywhere.

    saliency_report(['runs/vanilla', 'runs/sgdrop'], 'data/imagenette', 'runs/saliency')   # `sgdrop-zoo saliency`
"""
import json
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from .data import MAX_IMAGE_SIZE, check_image_folders, fixed_order
from .errors import OptionError
from .loading import (
    check_input_channels,
    check_label_names,
    in_memory_loader,
    load_model,
    load_split,
    split_encoder_head,
)
from .run_files import atomic_write, check_output_folder, check_output_is_not_source

__all__ = [
    'attribution_area_ratio', 'grad_cam_maps', 'grid_figure', 'mean_area_ratio', 'neuron_coverage', 'saliency_grid',
    'saliency_report',
]

AREA_THRESHOLD = 0.5
GRID_CELL_PX = 160  # side of one picture of the grid, in pixels
GRID_DPI = 100
GRID_FONT_PT = 7
GRID_HEADER_LINES = 3  # a model's name takes at most this many lines above its column
GRID_TITLE_LINES = 2  # and a picture's title this many
# above the first row: the models' names and the first row's titles, lines of 7 pt (9.7 px at 100 dpi) and spacing
GRID_HEADER_PX = 72
OUTPUT_FILES = ('saliency.json', 'saliency_grid.png')  # what a report writes into its output folder


def attribution_area_ratio(maps: torch.Tensor, threshold: float = AREA_THRESHOLD) -> torch.Tensor:
    """Share of pixels above ``threshold`` of each max-normalised map.

    Args:
        maps: Non-negative attribution maps, shape (N, H, W).
        threshold: Level, relative to the map's maximum; the paper uses 0.5.

    Returns:
        Shape (N,); 0 for an all-zero map (it attributes nothing).
    """
    if maps.dim() != 3:
        raise ValueError(f'maps must have shape (N, H, W), got {tuple(maps.shape)}.')
    peak = maps.flatten(1).amax(1).view(-1, 1, 1)
    normalised = torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))
    return (normalised > threshold).flatten(1).float().mean(1)


class _Encoder(nn.Module):
    """``forward_features`` as a module, so that Grad-CAM can hook the latent map z."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class _EncoderHead(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder = _Encoder(model)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.encoder(x))


def check_grad_cam_support(model: nn.Module, image_size: int) -> None:
    """Grad-CAM needs a convolutional encoder whose output is a (C, H, W) feature map."""
    encoder, _ = split_encoder_head(model, image_size)
    check_input_channels(model, encoder)
    if not any(isinstance(m, nn.Conv2d) for m in encoder):
        raise ValueError(f'{type(model).__name__} has no convolutional layer in its encoder, so there is no feature '
                         f'map for Grad-CAM; use a CNN (the sgdrop_* models, resnet*, vgg*, convnext*).')


def grad_cam_maps(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps of ``targets`` at the latent map z, ReLU'd and upsampled to the image, not normalised.

    Returns:
        Shape (N, H, W), on the CPU.
    """
    wrapper = _EncoderHead(model).eval()
    cam = GradCAM(wrapper, target_layers=[wrapper.encoder])
    try:
        class_targets = [ClassifierOutputTarget(int(t)) for t in targets]
        cam(input_tensor=images, targets=class_targets)
        activations = cam.activations_and_grads.activations[0]
        gradients = cam.activations_and_grads.gradients[0]
        if activations.dim() != 4:
            raise ValueError(f'the encoder of {type(model).__name__} returns shape {tuple(activations.shape)}, not a '
                             f'(N, C, H, W) feature map; Grad-CAM needs a CNN.')
        raw = cam.get_cam_image(images, wrapper.encoder, class_targets, activations.numpy(), gradients.numpy())
    finally:
        cam.activations_and_grads.release()
    raw = torch.from_numpy(np.maximum(raw, 0)).float().unsqueeze(1)
    return F.interpolate(raw, size=images.shape[-2:], mode='bilinear', align_corners=False).squeeze(1)


def mean_area_ratio(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
    """Mean attribution area ratio of the eval-mode `model` over `batches` of (images, targets), and the image count.

    Computed in float32, outside autocast: bf16 or fp16 activations and gradients would shift which pixels clear the
    threshold. The model's train/eval mode is restored afterwards, and Grad-CAM's gradients on its weights removed.
    """
    was_training = model.training
    ratios = []
    try:
        with torch.autocast(next(model.parameters()).device.type, enabled=False):
            for images, targets in batches:
                # class indices on the CPU: Grad-CAM reads them one by one, which would sync a GPU each time
                ratios.append(attribution_area_ratio(grad_cam_maps(model, images, targets.cpu())))
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return torch.cat(ratios).mean().item(), sum(len(r) for r in ratios)


@torch.no_grad()
def neuron_coverage(model: nn.Module, loader: Any) -> dict[str, Optional[float]]:
    """Share of activations > 0 over every ``nn.ReLU`` output (``global``) and over the latent map z (``last_conv``).

    ``global`` is None when the network has no ``nn.ReLU`` module (e.g. ConvNeXt's GELUs can be negative).
    """
    counts = dict(relu_positive=0, relu_total=0, z_positive=0, z_total=0)

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        counts['relu_positive'] += int((output > 0).sum())
        counts['relu_total'] += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.ReLU)]
    model.eval()
    try:
        for images, _ in loader:
            z = model.forward_features(images)
            model.forward_head(z)
            counts['z_positive'] += int((z > 0).sum())
            counts['z_total'] += z.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return {
        'global': counts['relu_positive'] / counts['relu_total'] if counts['relu_total'] else None,
        'last_conv': counts['z_positive'] / counts['z_total'],
    }


def saliency_grid(images: torch.Tensor, maps: dict[str, torch.Tensor], predictions: dict[str, torch.Tensor],
                  targets: torch.Tensor, class_names: Sequence[str], path: Union[str, Path]) -> Path:
    """PNG grid: one row per image, the input then each model's Grad-CAM overlay, titled prediction vs truth.

    Args:
        images: uint8 images, shape (N, 3, H, W).
        maps: Model name -> non-negative maps (N, H, W).
        predictions: Model name -> predicted classes (N,).
        targets: True classes (N,).
        class_names: Names of the classes.
        path: Where the PNG goes; it is ``GRID_CELL_PX`` pixels per picture, below a header of the models' names.
    """
    figure = grid_figure(images, maps, predictions, targets, class_names)
    path = Path(path)
    atomic_write(path, lambda f: figure.savefig(f, dpi=GRID_DPI, format='png'))
    return path


def _fitted(text: str, max_lines: int) -> str:
    """``text`` wrapped into at most ``max_lines`` lines that fit one column of the grid at ``GRID_FONT_PT``."""
    # a character of the grid's font, in bold, is at most about 0.7 of its size wide
    width = int(GRID_CELL_PX / (GRID_FONT_PT * GRID_DPI / 72 * 0.7))
    lines = textwrap.wrap(text, width, break_on_hyphens=False)
    if len(lines) > max_lines:  # what does not fit is cut, and says so
        lines = [*lines[:max_lines - 1], lines[max_lines - 1][:width - 3] + '...']
    return '\n'.join(lines)


def grid_figure(images: torch.Tensor, maps: dict[str, torch.Tensor], predictions: dict[str, torch.Tensor],
                targets: torch.Tensor, class_names: Sequence[str]) -> Figure:
    """The figure of ``saliency_grid``: each model's name heads its column, each title fits its column."""
    rows, cols = len(images), 1 + len(maps)
    height_px = rows * GRID_CELL_PX + GRID_HEADER_PX
    figure = Figure(figsize=(cols * GRID_CELL_PX / GRID_DPI, height_px / GRID_DPI), dpi=GRID_DPI)
    axes = figure.subplots(rows, cols, squeeze=False)
    for col, name in enumerate(maps, start=1):
        figure.text((col + 0.5) / cols, 1 - 2 / height_px, _fitted(name, GRID_HEADER_LINES), ha='center', va='top',
                    fontsize=GRID_FONT_PT, fontweight='bold')
    for row in range(rows):
        picture = images[row].permute(1, 2, 0).numpy().astype(np.float32) / 255
        axes[row, 0].imshow(picture)
        axes[row, 0].set_title(_fitted(f'true: {class_names[targets[row]]}', GRID_TITLE_LINES), fontsize=GRID_FONT_PT)
        for col, (name, model_maps) in enumerate(maps.items(), start=1):
            peak = float(model_maps[row].max())
            mask = (model_maps[row] / peak).numpy() if peak > 0 else np.zeros(picture.shape[:2], np.float32)
            axes[row, col].imshow(show_cam_on_image(picture, mask, use_rgb=True))
            predicted = class_names[predictions[name][row]]
            axes[row, col].set_title(_fitted(f'pred: {predicted}', GRID_TITLE_LINES), fontsize=GRID_FONT_PT,
                                     color='black' if predictions[name][row] == targets[row] else '#D55E00')
    for axis in axes.flat:
        axis.axis('off')
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - GRID_HEADER_PX / height_px, wspace=0.05,
                           hspace=0.3)
    return figure


def saliency_report(
        model_names: Sequence[str],
        data: Union[str, Path],
        output: Union[str, Path],
        split: str = 'val',
        image_size: Optional[int] = None,
        batch_size: int = 32,
        grid_images: int = 8,
        workers: int = 2,
        num_images: Optional[int] = None,
        labels: Optional[Sequence[str]] = None,
        command: Optional[str] = None,
        overwrite: bool = False,
) -> dict[str, Any]:
    """Accuracy, attribution area ratio and neuron coverage of each model on ``data/split``, plus the PNG grid.

    Args:
        model_names: Anything ``finetune.load_model`` accepts; each must have the dataset's classes.
        data: Dataset root holding ``train/`` and ``val/`` ImageFolders.
        output: Folder for ``saliency.json`` and ``saliency_grid.png``.
        split: The split measured, a folder of ``data`` named as it is (``val``), not a path.
        image_size: Square input side; default: the first model's.
        batch_size: Images per batch.
        grid_images: Rows of the PNG grid (the first images measured).
        workers: Image decoding workers.
        num_images: Measure a fixed random subset of this many images of the split, the same for every model and
            every call (a permutation seeded with 0); default: the whole split, in folder order.
        labels: Names of the models in the JSON, the table and the grid; default: ``model_names``.
        command: The command line that asked for the report, recorded in ``saliency.json``.
        overwrite: Replace an earlier report in ``output`` instead of refusing to start.

    Returns:
        What ``saliency.json`` holds.
    """
    # a split is a folder of the dataset root: '../..', '/etc' or 'val/x' would measure whatever lies there
    if split in ('', '..') or Path(split).name != split or '\\' in split:
        raise OptionError('{split} must be the name of a folder of the dataset root, such as val or train, got '
                          '{value!r}.', value=split)
    if isinstance(model_names, str):  # a lone name would be read as a sequence of one-letter names
        raise OptionError('{model_names} must be a list of model names, got the string {value!r}.', value=model_names)
    if labels is not None and len(labels) != len(model_names):
        raise OptionError('{count} {labels} for {models} {model_names}: give one label per model.', count=len(labels),
                          models=len(model_names))
    if num_images is not None and num_images < 1:
        raise OptionError('{num_images} must be at least 1, got {value}.', value=num_images)
    if image_size is not None and not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise OptionError("{image_size} must be from 1 to {most} px, or unset for the first model's, got {value}.",
                          most=MAX_IMAGE_SIZE, value=image_size)
    for name, value, least in (('batch_size', batch_size, 1), ('grid_images', grid_images, 1), ('workers', workers, 0)):
        if value < least:
            raise OptionError('{' + name + '} must be at least {least}, got {value}.', least=least, value=value)
    data, output = Path(data), Path(output)
    for source in model_names:
        check_output_is_not_source(source, output)
    check_output_folder(output, OUTPUT_FILES, overwrite)
    class_names = check_image_folders(data, workers)
    if not (data / split).is_dir():
        splits = sorted(p.name for p in data.iterdir() if p.is_dir())
        raise OptionError('{data_path} has no {value!r} split; pass {split} as one of {splits}.', data_path=data,
                          value=split, splits=splits)
    results: dict[str, Any] = dict(command=command, data=str(data), split=split, area_threshold=AREA_THRESHOLD,
                                   models={})
    grid_maps, grid_predictions, shown, first_model_descriptions = {}, {}, None, None
    for source, name in zip(model_names, labels or model_names):
        model = load_model(source).eval()
        if shown is None:
            first_model_descriptions = model.pretrained_cfg.get('label_descriptions')
        size = image_size or model.pretrained_cfg['input_size'][-1]
        check_label_names(model, class_names, source)
        check_grad_cam_support(model, size)
        images, targets = load_split(data, split, class_names, size, False, 'resize', workers)
        if num_images is not None:
            if num_images > len(targets):
                raise OptionError('{num_images} {value} is more than the {count} images of {folder}; pass at most '
                                  '{count}.', value=num_images, count=len(targets), folder=data / split)
            subset = torch.tensor(fixed_order(len(targets))[:num_images])
            images, targets = images[subset], targets[subset]
        loader = in_memory_loader(images, targets, model, batch_size, False, torch.device('cpu'))
        correct, ratios = 0, []
        for batch_images, batch_targets in loader:
            with torch.no_grad():
                correct += int((model(batch_images).argmax(1) == batch_targets).sum())
            ratios.append(attribution_area_ratio(grad_cam_maps(model, batch_images, batch_targets)))
        coverage = neuron_coverage(model, loader)
        results['models'][name] = dict(source=source, acc1=100.0 * correct / len(targets),
                                       area_ratio=float(torch.cat(ratios).mean()),
                                       coverage_global=coverage['global'], coverage_last_conv=coverage['last_conv'],
                                       images=len(targets), image_size=size)
        first_batch, _ = next(iter(in_memory_loader(images[:grid_images], targets[:grid_images], model, grid_images,
                                                    False, torch.device('cpu'))))
        grid_maps[name] = grad_cam_maps(model, first_batch, targets[:grid_images])
        with torch.no_grad():
            grid_predictions[name] = model(first_batch).argmax(1)
        if shown is None:
            shown = images[:grid_images]
        elif shown.shape != images[:grid_images].shape:
            raise OptionError('{name} uses {size} px images, unlike the models before it: pass {image_size}.',
                              name=name, size=size)
    # the grid's titles in words ('tench', not 'n01440764') where the first model's config.json describes its labels
    descriptions = first_model_descriptions or {}
    titles = [descriptions.get(name, name).split(',')[0] for name in class_names]
    # created only now, so that a report stopped by a model or the data leaves no folder behind
    output.mkdir(parents=True, exist_ok=True)
    saliency_grid(shown, grid_maps, grid_predictions, targets[:grid_images], titles, output / 'saliency_grid.png')
    atomic_write(output / 'saliency.json', lambda f: f.write((json.dumps(results, indent=2) + '\n').encode()))
    return results


def format_table(results: dict[str, Any]) -> str:
    """The per-model metrics of ``saliency_report`` as an aligned text table."""
    header = f'{"model":40s} {"acc@1":>7s} {"area":>7s} {"cov.global":>10s} {"cov.last":>9s}'
    lines = [header]
    for name, m in results['models'].items():
        cov_global = f'{m["coverage_global"]:.4f}' if m['coverage_global'] is not None else 'n/a'
        lines.append(f'{name[-40:]:40s} {m["acc1"]:7.2f} {m["area_ratio"]:7.4f} {cov_global:>10s} '
                     f'{m["coverage_last_conv"]:9.4f}')
    return '\n'.join(lines)
