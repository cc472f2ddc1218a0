"""The SGDrop paper's CIFAR-10 network, with Saliency-Guided Dropout

SGDrop: `The Overfocusing Bias of Convolutional Neural Networks: A Saliency-Guided Regularization Approach`
    - https://arxiv.org/abs/2409.17370 (Appendix B, Table 12)

Three convolution blocks (96, 128 and 256 filters, 5x5, stride 1, padding 2, ReLU, then 3x3 max-pool stride 2) and
an MLP head (2048, 2048, classes). The paper does not give the pooling padding; padding 1 halves the map exactly, so
a 32x32 image gives a 256x4x4 latent map (4,096 features, of which rho = 0.01 drops 40).
Larger images are average-pooled to 4x4 before the head so the same weights accept any input size.
"""
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from ..pretrained import build_model_with_checked_weights, pretrained_cfgs
from ..sgdrop import SaliencyGuidedDropout

__all__ = ['CifarCNN', 'SGDropCifarCNN']


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
            act_layer: Type[nn.Module] = nn.ReLU,
            global_pool: Optional[str] = None,
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
            global_pool: Accepted for timm API compatibility; the head flattens a fixed grid and does not pool.
        """
        super().__init__()
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
        self.head_hidden_size = hidden_size
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
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stages\.0', blocks=r'^stages\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        assert not enable, 'gradient checkpointing not supported'

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if x.shape[-2:] != (self.head_grid, self.head_grid):
            x = F.adaptive_avg_pool2d(x, self.head_grid)
        x = self.pre_logits(x.flatten(1))
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


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (4, 4),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stages.0.0', 'classifier': 'fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2409.17370',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(pretrained_cfgs({
    'sgdrop_cifar_cnn': _cfg(),
}, _cfg))


@register_model
def sgdrop_cifar_cnn(pretrained: bool = False, **kwargs: Any) -> SGDropCifarCNN:
    """The SGDrop paper's CIFAR-10 network (3 conv blocks 96-128-256, MLP 2048-2048) trained with SGDrop."""
    return _create_sgdrop_cifar_cnn('sgdrop_cifar_cnn', pretrained, **kwargs)
