"""ConvNeXt with Saliency-Guided Dropout

ConvNeXt: `A ConvNet for the 2020s` - https://arxiv.org/abs/2201.03545
SGDrop: `The Overfocusing Bias of Convolutional Neural Networks: A Saliency-Guided Regularization Approach`
    - https://arxiv.org/abs/2409.17370

The architecture is timm's ``ConvNeXt`` unchanged, so weights load both ways with ``convnext_tiny`` and its tags.
The latent features are the last stage's output, before the head's pooling and LayerNorm, so they can be negative:
those have a non-positive attribution and are never dropped.
"""
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt, checkpoint_filter_fn

from ..pretrained import build_model_with_checked_weights, pretrained_cfgs
from ..sgdrop import PAPER_NAME, SaliencyGuidedDropout

__all__ = ['SGDropConvNeXt']


class SGDropConvNeXt(SaliencyGuidedDropout, ConvNeXt):
    """timm ``ConvNeXt`` trained with Saliency-Guided Dropout on the last stage's feature map."""


def _create_sgdrop_convnext(variant: str, pretrained: bool = False, **kwargs: Any) -> SGDropConvNeXt:
    return build_model_with_checked_weights(
        SGDropConvNeXt,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs: Any) -> dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head.fc',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2409.17370', 'paper_name': PAPER_NAME,
        'origin_url': 'https://arxiv.org/abs/2409.17370',
        **kwargs,
    }


default_cfgs = generate_default_cfgs(pretrained_cfgs({
    'sgdrop_convnext_tiny': _cfg(),
    'sgdrop_convnext_atto': _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0),
    'sgdrop_convnext_femto': _cfg(input_size=(3, 64, 64), pool_size=(2, 2), crop_pct=1.0),
}))


@register_model
def sgdrop_convnext_tiny(pretrained: bool = False, **kwargs: Any) -> SGDropConvNeXt:
    """ConvNeXt-Tiny trained with SGDrop."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
    return _create_sgdrop_convnext('sgdrop_convnext_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def sgdrop_convnext_atto(pretrained: bool = False, **kwargs: Any) -> SGDropConvNeXt:
    """ConvNeXt-Atto (3.7M parameters) trained with SGDrop, for CPU-scale runs."""
    model_args = dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True)
    return _create_sgdrop_convnext('sgdrop_convnext_atto', pretrained, **dict(model_args, **kwargs))


@register_model
def sgdrop_convnext_femto(pretrained: bool = False, **kwargs: Any) -> SGDropConvNeXt:
    """ConvNeXt-Femto trained with SGDrop."""
    model_args = dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), conv_mlp=True)
    return _create_sgdrop_convnext('sgdrop_convnext_femto', pretrained, **dict(model_args, **kwargs))
