"""ResNet with Saliency-Guided Dropout

ResNet: `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385
SGDrop: `The Overfocusing Bias of Convolutional Neural Networks: A Saliency-Guided Regularization Approach`
    - https://arxiv.org/abs/2409.17370

The architecture is timm's ``ResNet`` unchanged, so weights load both ways with ``resnet50`` and its tags.
"""
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ..pretrained import build_model_with_checked_weights, pretrained_cfgs
from ..sgdrop import PAPER_NAME, SaliencyGuidedDropout

__all__ = ['SGDropResNet']


class SGDropResNet(SaliencyGuidedDropout, ResNet):
    """timm ``ResNet`` trained with Saliency-Guided Dropout on the last stage's feature map."""


def _create_sgdrop_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> SGDropResNet:
    return build_model_with_checked_weights(SGDropResNet, variant, pretrained, **kwargs)


def _cfg(url: str = '', **kwargs: Any) -> dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2409.17370', 'paper_name': PAPER_NAME,
        'origin_url': 'https://arxiv.org/abs/2409.17370',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(pretrained_cfgs({
    'sgdrop_resnet50': _cfg(),
    'sgdrop_resnet10t': _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0, first_conv='conv1.0'),
    'sgdrop_resnet18': _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0),
}))


@register_model
def sgdrop_resnet50(pretrained: bool = False, **kwargs: Any) -> SGDropResNet:
    """ResNet-50 trained with SGDrop."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_sgdrop_resnet('sgdrop_resnet50', pretrained, **dict(model_args, **kwargs))


@register_model
def sgdrop_resnet10t(pretrained: bool = False, **kwargs: Any) -> SGDropResNet:
    """ResNet-10-T (deep tiered stem, avg-pool downsampling) trained with SGDrop, for CPU-scale runs."""
    model_args = dict(block=BasicBlock, layers=(1, 1, 1, 1), stem_width=32, stem_type='deep_tiered', avg_down=True)
    return _create_sgdrop_resnet('sgdrop_resnet10t', pretrained, **dict(model_args, **kwargs))


@register_model
def sgdrop_resnet18(pretrained: bool = False, **kwargs: Any) -> SGDropResNet:
    """ResNet-18 trained with SGDrop."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2))
    return _create_sgdrop_resnet('sgdrop_resnet18', pretrained, **dict(model_args, **kwargs))
