"""The SGDrop paper's CIFAR-10 network, with Saliency-Guided Dropout

SGDrop: `The Overfocusing Bias of Convolutional Neural Networks: A Saliency-Guided Regularization Approach`
    - https://arxiv.org/abs/2409.17370 (Appendix B, Table 12)

Three convolution blocks (96, 128 and 256 filters, 5x5, stride 1, padding 2, ReLU, then 3x3 max-pool stride 2) and
an MLP head (2048, 2048, classes). The paper does not give the pooling padding; padding 1 halves the map exactly, so
a 32x32 image gives a 256x4x4 latent map (4,096 features, of which rho = 0.01 drops 40).
Larger images are average-pooled to 4x4 before the head so the same weights accept any input size.

The head's pooling is that average-pool-and-flatten (``global_pool='avg'``). As in timm, ``global_pool=''`` turns the
pooling off; the MLP needs the flattened grid, so it goes with it and ``forward`` returns the feature map (for a
feature extractor, ``num_classes=0``).
"""
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..pretrained import build_model_with_checked_weights, pretrained_cfgs
from ..sgdrop import PAPER_NAME, SaliencyGuidedDropout

__all__ = ['CifarCNN', 'SGDropCifarCNN']

POOL_TYPES = ('avg', '')


def _check_global_pool(global_pool: str, num_classes: int) -> str:
    if global_pool not in POOL_TYPES:
        raise ValueError(
            f"CifarCNN global_pool must be 'avg' (pool to the head's grid) or '' (no pooling and no head), "
            f'got {global_pool!r}.')
    if not global_pool and num_classes > 0:
        raise ValueError(
            f"global_pool='' removes the MLP head, which needs the pooled grid, so it has no classifier: use "
            f"num_classes=0 with it (got {num_classes}), or global_pool='avg'.")
    return global_pool


class CifarCNN(nn.Module):
    """Small convolutional network used in the SGDrop paper for CIFAR-10."""

    def __init__(
            self,
            num_classes: int = 10,
            in_chans: int = 3,
            channels: Sequence[int] = (96, 128, 256),
            kernel_size: int = 5,
            hidden_size: int = 2048,
            head_grid: int = 4,
            drop_rate: float = 0.,
            act_layer: type[nn.Module] = nn.ReLU,
            global_pool: Optional[str] = 'avg',
    ):
        """
        Args:
            num_classes: Number of classes (0 for a feature extractor).
            in_chans: Number of input channels.
            channels: Filters of each convolution block.
            kernel_size: Convolution kernel size.
            hidden_size: Width of the two hidden layers of the head.
            head_grid: Side of the feature grid the head flattens.
            drop_rate: Dropout rate inside the head.
            act_layer: Activation layer.
            global_pool: 'avg' (average-pool to the head's grid, then the MLP) or '' (no pooling, no MLP, no
                classifier: forward returns the feature map; needs num_classes=0).
        """
        super().__init__()
        self.global_pool = _check_global_pool('avg' if global_pool is None else global_pool, num_classes)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.head_grid = head_grid
        self.feature_info = []

        stages = []
        prev_chs, reduction = in_chans, 1
        for i, chs in enumerate(channels):
            stages.append(nn.Sequential(
                nn.Conv2d(prev_chs, chs, kernel_size, stride=1, padding=kernel_size // 2),
                act_layer(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            ))
            prev_chs, reduction = chs, reduction * 2
            self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = prev_chs
        self.hidden_size = hidden_size
        self.head_hidden_size = hidden_size if self.global_pool else prev_chs
        self.pre_logits = nn.Sequential(OrderedDict([
            ('fc1', nn.Linear(prev_chs * head_grid * head_grid, hidden_size)),
            ('act1', act_layer(inplace=True)),
            ('drop1', nn.Dropout(drop_rate)),
            ('fc2', nn.Linear(hidden_size, hidden_size)),
            ('act2', act_layer(inplace=True)),
            ('drop2', nn.Dropout(drop_rate)),
        ]))
        self.fc = nn.Linear(hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r'^stages\.0', blocks=r'^stages\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        assert not enable, 'gradient checkpointing not supported'

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier; ``global_pool`` ('avg' or '') is kept when None."""
        global_pool = _check_global_pool(self.global_pool if global_pool is None else global_pool, num_classes)
        if global_pool and isinstance(self.pre_logits, nn.Identity):
            raise ValueError(
                "prune_intermediate_layers() removed the MLP head: only num_classes=0 with global_pool='' remains.")
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.head_hidden_size = self.hidden_size if global_pool else self.num_features
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, list[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """Forward features that also returns the outputs of the convolution blocks.

        Args:
            x: Input images.
            indices: Take the last n blocks if int, all if None, the listed blocks if a sequence.
            norm: Unused (no final norm), for timm API compatibility.
            stop_early: Stop after the last block taken.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return the intermediates alone.

        Returns:
            The ``forward_features`` output and the list of intermediates, or the intermediates alone.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, list[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last one taken; the head goes whenever a block does or ``prune_head``."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            # the MLP is sized for the last block's grid: without it the model is a pooling-free feature extractor
            self.pre_logits = nn.Identity()
            self.global_pool = ''
            self.num_classes = 0
            self.head_hidden_size = self.num_features
            self.fc = nn.Identity()
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if not self.global_pool:
            return x
        # exact at the head's grid size (one value per window), and without a shape test that tracing can't follow
        x = F.adaptive_avg_pool2d(x, self.head_grid).flatten(1)
        x = self.pre_logits(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)


class SGDropCifarCNN(SaliencyGuidedDropout, CifarCNN):
    """The paper's CIFAR-10 network trained with Saliency-Guided Dropout."""


def _create_sgdrop_cifar_cnn(variant: str, pretrained: bool = False, **kwargs: Any) -> SGDropCifarCNN:
    return build_model_with_checked_weights(
        SGDropCifarCNN,
        variant,
        pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2)),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs: Any) -> dict[str, Any]:
    return {
        'url': url,
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (4, 4),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stages.0.0', 'classifier': 'fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2409.17370', 'paper_name': PAPER_NAME,
        'origin_url': 'https://arxiv.org/abs/2409.17370',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(pretrained_cfgs({
    'sgdrop_cifar_cnn': _cfg(),
}))


@register_model
def sgdrop_cifar_cnn(pretrained: bool = False, **kwargs: Any) -> SGDropCifarCNN:
    """The SGDrop paper's CIFAR-10 network (3 conv blocks 96-128-256, MLP 2048-2048) trained with SGDrop."""
    return _create_sgdrop_cifar_cnn('sgdrop_cifar_cnn', pretrained, **kwargs)
